import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def no_outer_slurm_job():
    """Run inside a SLURM allocation, the processes the tests start would take the job's SLURM_*
    variables for their own (joining, or requeueing, the outer job); the tests start clean."""
    outer = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("SLURM_")}
    yield
    os.environ.update(outer)

# Largest relative errors seen by the serial-equivalence tests, printed as a table at the end.
EQUIVALENCE_REPORT: list[tuple[str, dict[str, float]]] = []


@pytest.fixture
def equivalence_report():
    return EQUIVALENCE_REPORT


def pytest_terminal_summary(terminalreporter):
    if not EQUIVALENCE_REPORT:
        return
    terminalreporter.section("serial equivalence: largest relative error per case (fp32)")
    keys = list(dict.fromkeys(k for _, errors in EQUIVALENCE_REPORT for k in errors))
    width = max(len(case) for case, _ in EQUIVALENCE_REPORT) + 2
    terminalreporter.write_line(f"{'case':<{width}}" + "".join(f"{k:>11}" for k in keys))
    for case, errors in EQUIVALENCE_REPORT:
        cells = "".join(f"{errors[k]:>11.2e}" if k in errors else f"{'-':>11}" for k in keys)
        terminalreporter.write_line(f"{case:<{width}}" + cells)
