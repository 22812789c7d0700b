import pytest

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
