"""The classifier's bidirectional LSTM stack on the GPU: ``rnn_fast.LSTM(backend="cuda")`` vs ``torch.nn.LSTM``
(cuDNN), in the same process with the same weights.

    python -m pytest benchmarks/test_cuda_blstm.py --benchmark-only

2 layers, input 160, hidden 128, bidirectional, T=100, batch-first ``[B, 100, 160]`` input that does not require
grad, B in {256, 768, 2048}, in two precisions:

- ``tf32``: float32 with TF32 allowed for cuDNN (which the CUDA recurrence follows) and for the driver's matmuls;
- ``bf16``: parameters and input in bfloat16 (state in fp32 on both sides).

Passes: ``forward`` (a training forward, building the autograd graph), ``backward`` (of a forward run in the
round's untimed setup) and ``forward+backward``; the loss is a fixed random weighting of the output. Every timed
call ends with a device synchronisation, and so does every setup, before the clock starts. Medians, p20/p80 and
the speedups (cuDNN median / CUDA-backend median) go to ``benchmarks/results/<device>-cuda-<date>.json``
(timing and recording helpers: ``_timing.py``). A fallback from the CUDA backend to nn.LSTM warns, and warnings
fail these benchmarks, so a figure is never filed under the wrong name.
"""
import os
from typing import Callable, Dict, Optional, Tuple

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
IMPLEMENTATIONS = ("cuda", "cudnn")
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "30"))
WARMUP_ROUNDS = 3
DEVICE = torch.device("cuda")

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(unavailable_reason("cuda") is not None, reason=f"cuda backend: {unavailable_reason('cuda')}"),
    pytest.mark.filterwarnings("error::UserWarning"),
]

_records = []


@pytest.fixture(scope="module", autouse=True)
def results_file():
    """Writes every case's figures, and each CUDA-backend case's speedup over its cuDNN twin, to one JSON file."""
    yield
    if not _records:
        return
    medians: Dict[Tuple, float] = {_case(record) + (record["implementation"],): record["median_ms"]
                                   for record in _records}
    speedups = [dict(zip(("batch", "precision", "pass"), case),
                     speedup_vs_cudnn=medians[case + ("cudnn",)] / medians[case + ("cuda",)])
                for case in dict.fromkeys(_case(record) for record in _records)
                if case + ("cudnn",) in medians and case + ("cuda",) in medians]
    path = write_results("cuda", DEVICE, {
        "config": {"input_size": INPUT_SIZE, "hidden": HIDDEN, "layers": LAYERS, "seq_len": SEQ_LEN,
                   "bidirectional": True, "batch_first": True, "input_requires_grad": False, "rounds": ROUNDS,
                   "warmup_rounds": WARMUP_ROUNDS},
        "results": _records,
        "speedups": speedups,
    })
    print(f"\nwrote {path}")


def _case(record: dict) -> Tuple:
    return record["batch"], record["precision"], record["pass"]


@pytest.fixture
def precision_flags(precision):
    """TF32 for cuDNN and for matmuls in the ``tf32`` cases, IEEE float32 never; the previous flags come back."""
    allow_tf32 = precision == "tf32"
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _blstm(implementation: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)  # the same weights for both implementations
    kwargs = dict(num_layers=LAYERS, batch_first=True, bidirectional=True, device=DEVICE, dtype=dtype)
    if implementation == "cudnn":
        return nn.LSTM(INPUT_SIZE, HIDDEN, **kwargs)
    return rnn_fast.LSTM(INPUT_SIZE, HIDDEN, backend="cuda", **kwargs)


def _timed_pass(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                pass_name: str) -> Tuple[Callable, Optional[Callable]]:
    """``(timed call, untimed setup)`` of one pass; both end synchronised."""

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
@pytest.mark.parametrize("batch", BATCHES, ids=lambda batch: f"B{batch}")
def test_blstm_stack(benchmark, precision_flags, batch, precision, pass_name, implementation):
    dtype = PRECISIONS[precision]
    module = _blstm(implementation, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(batch)
    x = torch.randn(batch, SEQ_LEN, INPUT_SIZE, device=DEVICE, dtype=dtype, generator=generator)
    weight = torch.randn(batch, SEQ_LEN, 2 * HIDDEN, device=DEVICE, dtype=dtype, generator=generator)
    target, setup = _timed_pass(module, x, weight, pass_name)
    synchronize(DEVICE)
    benchmark.group = f"blstm-B{batch}-{precision}-{pass_name}"
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    _records.append({"batch": batch, "precision": precision, "pass": pass_name, "implementation": implementation,
                     **summary(benchmark.stats.stats.data)})
