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
    keys = list(EQUIVALENCE_REPORT[0][1])
    terminalreporter.write_line(f"{'case':<40}" + "".join(f"{k:>12}" for k in keys))
    for case, errors in EQUIVALENCE_REPORT:
        terminalreporter.write_line(f"{case:<40}" + "".join(f"{errors[k]:>12.2e}" for k in keys))
