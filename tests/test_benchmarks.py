"""The pipeline benchmark still runs end to end (a tiny paired run; the figures themselves are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_paired_smoke(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_1f1b.py"), "--pp", "2", "--systems",
                    "ours-untied", "torch", "--steps", "1", "--warmup", "1", "--paired", "--json", str(out)],
                   check=True, timeout=300, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    [ratio] = result["ratios"]
    assert (ratio["ours"], ratio["peer"], ratio["pp"], ratio["paired"]) == ("ours-untied", "torch", 2, True)
    assert ratio["ratio"] > 0
    losses = {row["system"]: row["loss"] for row in result["rows"]}
    assert all(5.0 < loss < 8.0 for loss in losses.values()), losses  # ln(1024) ~ 6.9 at the start
