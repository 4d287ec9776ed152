"""Every file here measures; none is a test. They run under ``--benchmark-only``, the README's command, and skip
otherwise: a plain or ``--benchmark-disable`` run would time nothing and record nothing."""
import pytest

from _timing import reported_lines


@pytest.fixture(autouse=True)
def benchmark_only(request):
    if not request.config.getoption("benchmark_only"):
        pytest.skip("a benchmark; run with --benchmark-only")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """The comparisons (speedups, throughputs) and the results files of this session, after pytest-benchmark's
    tables, which show each implementation's own times only."""
    lines = reported_lines()
    if lines:
        terminalreporter.section("rnn_fast benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
