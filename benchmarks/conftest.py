"""Every file here measures; none is a test. They run under ``--benchmark-only``, the README's command, and skip
otherwise: a plain or ``--benchmark-disable`` run would time nothing and record nothing."""
import pytest


@pytest.fixture(autouse=True)
def benchmark_only(request):
    if not request.config.getoption("benchmark_only"):
        pytest.skip("a benchmark; run with --benchmark-only")
