"""Plan a layout: `python scripts/plan.py model=llama2_70b cluster=a100_nvlink_4 workload=inference`.

Prints the ranked layouts (memory per GPU and its terms, predicted time) and why the others were
rejected; `json=PATH` writes the whole plan, `png=PATH` draws memory per GPU against time with the
chosen layout marked. `layout.tp=8 layout.pp=35 layout.dp=12` evaluates one layout instead. Exit
codes: 0 a plan, 2 bad input (unknown preset, non-positive size, nothing fits: the message says why).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import megatron_lite  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.planner.cli import main  # noqa: E402

if __name__ == "__main__":
    start = time.perf_counter()
    code = main(sys.argv[1:])
    print(f"({time.perf_counter() - start:.2f} s)", file=sys.stderr)
    sys.exit(code)
