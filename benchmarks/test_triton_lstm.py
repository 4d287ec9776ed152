"""The classifier's LSTM stack on the GPU: ``rnn_fast.LSTM(backend="triton")`` vs ``torch.nn.LSTM`` (cuDNN).

    python -m pytest benchmarks/test_triton_lstm.py --benchmark-only

2 layers, input 160, hidden 128, T=100, batch-first ``[B, 100, 160]`` input that does not require grad,
B in {256, 768, 2048}, unidirectional and bidirectional, in two precisions:

- ``tf32``: float32 with TF32 allowed for cuDNN (its default, which the Triton recurrence follows) and for the
  driver's matmuls (``torch.backends.cuda.matmul.allow_tf32``), so that both sides use tensor cores throughout;
- ``bf16``: parameters and input in bfloat16 (state in fp32 on both sides).

Passes: ``forward`` (a training forward, building the autograd graph), ``backward`` (of a forward run in the
round's untimed setup) and ``forward+backward``; the loss is a fixed random weighting of the output. Both
implementations run in this process with the same weights. Every timed call ends with a device synchronisation,
and every setup with one before the clock starts. The medians, p20/p80 and the speedups (cuDNN median / Triton
median) go to ``benchmarks/results/<device>-triton-<date>.json``. A fallback from the Triton backend to nn.LSTM
warns, and warnings fail these benchmarks, so a figure is never filed under the wrong name.
"""
import os
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import summary, synchronize, synchronized, write_results

INPUT_SIZE, HIDDEN, LAYERS, SEQ_LEN = 160, 128, 2, 100
BATCHES = (256, 768, 2048)
PRECISIONS = {"tf32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("forward", "backward", "forward+backward")
IMPLEMENTATIONS = ("triton", "cudnn")
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "30"))
WARMUP_ROUNDS = 3
DEVICE = torch.device("cuda")

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(unavailable_reason("triton") is not None, reason=f"triton: {unavailable_reason('triton')}"),
    pytest.mark.filterwarnings("error::UserWarning"),
]

_records = []


@pytest.fixture(scope="module", autouse=True)
def results_file():
    """Writes every case's figures, and the speedup of each Triton case over its cuDNN twin, to one JSON file."""
    yield
    if not _records:
        return
    medians: Dict[Tuple, float] = {}
    for record in _records:
        medians[_case_key(record) + (record["implementation"],)] = record["median_ms"]
    speedups = [dict(zip(("batch", "bidirectional", "precision", "pass"), key),
                     speedup_vs_cudnn=medians[key + ("cudnn",)] / medians[key + ("triton",)])
                for key in dict.fromkeys(_case_key(record) for record in _records)
                if key + ("cudnn",) in medians and key + ("triton",) in medians]
    path = write_results("triton", DEVICE, {
        "config": {"input_size": INPUT_SIZE, "hidden": HIDDEN, "layers": LAYERS, "seq_len": SEQ_LEN,
                   "batch_first": True, "input_requires_grad": False, "rounds": ROUNDS,
                   "warmup_rounds": WARMUP_ROUNDS},
        "results": _records,
        "speedups": speedups,
    })
    print(f"\nwrote {path}")


def _case_key(record: dict) -> Tuple:
    return record["batch"], record["bidirectional"], record["precision"], record["pass"]


@pytest.fixture
def precision_flags(precision):
    """TF32 for cuDNN and for matmuls in the ``tf32`` cases; the previous flags come back afterwards."""
    allow_tf32 = precision == "tf32"
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _stack(implementation: str, bidirectional: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(num_layers=LAYERS, batch_first=True, bidirectional=bidirectional, device=DEVICE, dtype=dtype)
    if implementation == "cudnn":
        return nn.LSTM(INPUT_SIZE, HIDDEN, **kwargs)
    return rnn_fast.LSTM(INPUT_SIZE, HIDDEN, backend="triton", **kwargs)


def _rounds(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, pass_name: str):
    """``(timed call, untimed setup)`` of one pass; every call ends synchronised."""

    def loss():
        output, _ = module(x)
        return (output * weight).float().sum()

    def backward(value):
        value.backward()
        module.zero_grad(set_to_none=True)

    if pass_name == "forward":
        return synchronized(loss, DEVICE), None
    if pass_name == "backward":
        return synchronized(backward, DEVICE), synchronized(lambda: ((loss(),), {}), DEVICE)
    return synchronized(lambda: backward(loss()), DEVICE), None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda batch: f"B{batch}")
def test_lstm_stack(benchmark, precision_flags, batch, bidirectional, precision, pass_name, implementation):
    dtype = PRECISIONS[precision]
    module = _stack(implementation, bidirectional, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(batch)
    x = torch.randn(batch, SEQ_LEN, INPUT_SIZE, device=DEVICE, dtype=dtype, generator=generator)
    weight = torch.randn(batch, SEQ_LEN, HIDDEN * (2 if bidirectional else 1), device=DEVICE, dtype=dtype,
                         generator=generator)
    target, setup = _rounds(module, x, weight, pass_name)
    synchronize(DEVICE)
    benchmark.group = f"lstm-B{batch}-{'bi' if bidirectional else 'uni'}-{precision}-{pass_name}"
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    stats = summary(benchmark.stats.stats.data)
    _records.append({"batch": batch, "bidirectional": bidirectional, "precision": precision, "pass": pass_name,
                     "implementation": implementation, **stats})
