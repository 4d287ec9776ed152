"""The cpu backend's paths, each forced so that all of them run on any CI machine:

- the two work partitions (csrc/cpu/work_partition.h), through ``RNN_FAST_CPU_SPLIT``: rows split among the
  threads, or a direction's hidden units split among a crew of threads that meet after every step;
- the step GEMMs (csrc/cpu/streamed_gemm.h), through ``RNN_FAST_CPU_GEMM``: BLAS, or the streamed kernel for
  AVX-512 or AVX2 (where this CPU has the instruction set).

Every combination gives nn.LSTM's outputs and gradients on every path the backend has (training forward and
backward, padded with per-row lengths, packed, the whole-stack inference) at thread counts that make crews of 2, 3
and 4, hidden sizes that do and do not divide into the 16-unit grain and the 16-column panels, batches of more rows
than one register block holds, and an odd number of steps (a crew's state alternates between two buffers)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason
from rnn_fast.testing import assert_lstm_matches, cpu_features, torch_threads

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="needs the cpu backend")



@pytest.fixture
def threads(request):
    with torch_threads(request.param):
        yield request.param


# The streamed kernels run float32 only: the comparisons run in float32 at its tolerance.
F32 = dict(dtype=torch.float32)
TOLERANCE = 2e-5
GEMMS = ["blas"] + [name for name, feature in (("avx512", "avx512f"), ("avx2", "avx2")) if feature in cpu_features()]


def _input(packed, batch):
    generator = torch.Generator().manual_seed(0)
    if packed:
        lengths = [5 - row % 4 for row in range(batch)]
        return pack_sequence([torch.randn(length, 6, generator=generator, **F32) for length in lengths],
                             enforce_sorted=False)
    return torch.randn(5, batch, 6, generator=generator, **F32)


CASES = [pytest.param(hidden, bidirectional, packed, batch, id=f"H{hidden}-B{batch}-{'bi' if bidirectional else 'uni'}"
                      f"{'-packed' if packed else ''}")
         for hidden, batch in ((40, 3), (96, 13)) for bidirectional in (False, True) for packed in (False, True)]


@pytest.mark.parametrize("threads", [1, 2, 3, 4], indirect=True)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("hidden, bidirectional, packed, batch", CASES)
def test_paths_match_nn_lstm(monkeypatch, threads, split, gemm, hidden, bidirectional, packed, batch):
    monkeypatch.setenv("RNN_FAST_CPU_SPLIT", split)
    monkeypatch.setenv("RNN_FAST_CPU_GEMM", gemm)
    torch.manual_seed(1)
    reference = nn.LSTM(6, hidden, 2, bidirectional=bidirectional, **F32)
    candidate = rnn_fast.LSTM(6, hidden, 2, bidirectional=bidirectional, backend="cpu", **F32)
    input = _input(packed, batch)
    states = 4 if bidirectional else 2
    hx = tuple(torch.randn(states, batch, hidden, **F32) for _ in range(2))
    assert_lstm_matches(reference, candidate, input, hx, atol=TOLERANCE, rtol=TOLERANCE)
    # The whole-stack inference op, which projects each chunk of steps per work item.
    with torch.no_grad():
        expected, (h_expected, c_expected) = reference(input, hx)
        actual, (h_actual, c_actual) = candidate(input, hx)
    for got, want in ((actual, expected), (h_actual, h_expected), (c_actual, c_expected)):
        torch.testing.assert_close(getattr(got, "data", got), getattr(want, "data", want), atol=TOLERANCE,
                                   rtol=TOLERANCE)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("variable, value, message", [
    ("RNN_FAST_CPU_SPLIT", "columns", 'RNN_FAST_CPU_SPLIT must be "rows" or "units", got "columns"'),
    ("RNN_FAST_CPU_GEMM", "sse", 'RNN_FAST_CPU_GEMM must be "blas", "avx512" or "avx2", got "sse"')])
def test_unknown_setting_is_an_error(monkeypatch, threads, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError, match=message):
        rnn_fast.LSTM(6, 40, backend="cpu", **F32)(_input(False, 3))
