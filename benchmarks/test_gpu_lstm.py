"""The classifier's LSTM stack on the GPU: ``rnn_fast.LSTM(backend="triton" | "cuda")`` vs ``torch.nn.LSTM``
(cuDNN), in the same process with the same weights.

    python -m pytest benchmarks/test_gpu_lstm.py --benchmark-only

2 layers, input 160, hidden 128, T=100, batch-first ``[B, 100, 160]`` input that does not require grad,
B in {256, 768, 2048}; Triton unidirectional and bidirectional, the CUDA backend bidirectional (its target), in
two precisions:

- ``tf32``: float32 with TF32 allowed for cuDNN's RNNs (its default), which both fused recurrences and the driver's
  GEMMs follow (``rnn_fast.ops.lstm.precision.cudnn_fp32_precision``), so that both sides use tensor cores throughout;
- ``bf16``: parameters and input in bfloat16 (state in fp32 on both sides).

Passes: ``forward`` (a training forward, building the autograd graph), ``backward`` (of a forward run in the
round's untimed setup) and ``forward+backward``; the loss is a fixed random weighting of the output. Every timed
call ends with a device synchronisation, and every setup with one before the clock starts. Medians, p20/p80 and
the speedups (cuDNN median / fused median) go to ``benchmarks/results/<device>-<backend>-<date>.json``. A
fallback from a fused backend to nn.LSTM warns, and warnings fail these benchmarks, so a figure is never filed
under the wrong name.
"""
import os
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import (TRAINING_PASSES, report, summary, synchronize, synchronized, training_passes,
                     write_results)

INPUT_SIZE, HIDDEN, LAYERS, SEQ_LEN = 160, 128, 2, 100
BATCHES = (256, 768, 2048)
PRECISIONS = {"tf32": torch.float32, "bf16": torch.bfloat16}
# fused backend -> the directions it is benchmarked with
FUSED = {"triton": (False, True), "cuda": (True,)}
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "30"))
WARMUP_ROUNDS = 3
DEVICE = torch.device("cuda")

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("error::UserWarning"),
]

_records = []


def _case(record: dict) -> Tuple:
    return record["batch"], record["bidirectional"], record["precision"], record["pass"]


@pytest.fixture(scope="module", autouse=True)
def results_files():
    """Writes, per fused backend, its cases, their cuDNN twins and the speedups to one JSON file."""
    yield
    medians: Dict[Tuple, float] = {_case(record) + (record["implementation"],): record["median_ms"]
                                   for record in _records}
    for backend in FUSED:
        cases = [case for case in dict.fromkeys(_case(record) for record in _records)
                 if case + (backend,) in medians and case + ("cudnn",) in medians]
        if not cases:
            continue
        path = write_results(backend, DEVICE, {
            "config": {"input_size": INPUT_SIZE, "hidden": HIDDEN, "layers": LAYERS, "seq_len": SEQ_LEN,
                       "batch_first": True, "input_requires_grad": False, "rounds": ROUNDS,
                       "warmup_rounds": WARMUP_ROUNDS},
            "results": [record for record in _records
                        if _case(record) in cases and record["implementation"] in (backend, "cudnn")],
            "speedups": [dict(zip(("batch", "bidirectional", "precision", "pass"), case),
                              speedup_vs_cudnn=medians[case + ("cudnn",)] / medians[case + (backend,)])
                         for case in cases],
        })
        for batch, bidirectional, precision, pass_name in cases:
            fused_ms, cudnn_ms = (medians[(batch, bidirectional, precision, pass_name, name)]
                                  for name in (backend, "cudnn"))
            report(f"{backend} {'bi' if bidirectional else 'uni'} B={batch} {precision} {pass_name}: cuDNN "
                   f"{cudnn_ms:.2f} ms, {backend} {fused_ms:.2f} ms, {cudnn_ms / fused_ms:.2f}x")
        report(f"wrote {path}")


@pytest.fixture
def precision_flags(precision):
    """cuDNN's RNN precision: TF32 in the ``tf32`` cases, IEEE otherwise; the previous setting comes back after."""
    previous = torch.backends.cudnn.rnn.fp32_precision
    torch.backends.cudnn.rnn.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    yield
    torch.backends.cudnn.rnn.fp32_precision = previous


def _stack(implementation: str, bidirectional: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)  # the same weights for every implementation
    kwargs = dict(num_layers=LAYERS, batch_first=True, bidirectional=bidirectional, device=DEVICE, dtype=dtype)
    if implementation == "cudnn":
        return nn.LSTM(INPUT_SIZE, HIDDEN, **kwargs)
    return rnn_fast.LSTM(INPUT_SIZE, HIDDEN, backend=implementation, **kwargs)


def _rounds(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, pass_name: str):
    """``(timed call, untimed setup)`` of one pass, as pytest-benchmark takes them; every call ends synchronised."""
    call, setup = training_passes(module, x, weight)[pass_name]
    return synchronized(call, DEVICE), None if setup is None else synchronized(lambda: (setup(), {}), DEVICE)


def _implementations():
    bidirectional_cases = {bi for directions in FUSED.values() for bi in directions}
    for bidirectional in sorted(bidirectional_cases):
        direction = "bi" if bidirectional else "uni"
        yield pytest.param("cudnn", bidirectional, id=f"cudnn-{direction}")
        for backend, directions in FUSED.items():
            if bidirectional in directions:
                reason = unavailable_reason(backend)
                yield pytest.param(backend, bidirectional, id=f"{backend}-{direction}",
                                   marks=pytest.mark.skipif(reason is not None, reason=f"{backend}: {reason}"))


@pytest.mark.parametrize("implementation, bidirectional", list(_implementations()))
@pytest.mark.parametrize("pass_name", TRAINING_PASSES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda batch: f"B{batch}")
def test_lstm_stack(benchmark, precision_flags, batch, precision, pass_name, implementation, bidirectional):
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
    _records.append({"batch": batch, "bidirectional": bidirectional, "precision": precision, "pass": pass_name,
                     "implementation": implementation, **summary(benchmark.stats.stats.data)})
