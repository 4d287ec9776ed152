"""The classifier's LSTM stack on the GPU: ``rnn_fast.LSTM(backend="triton" | "cuda")`` vs ``torch.nn.LSTM``
(cuDNN), in the same process with the same weights.

    python -m pytest benchmarks/test_gpu_lstm.py --benchmark-only

2 layers, input 160, hidden 128, T=100, batch-first ``[B, 100, 160]`` input that does not require grad,
B in {256, 768, 2048} (``RNN_FAST_BENCH_BATCHES=768`` picks some); each fused backend unidirectional (LSTM) and
bidirectional (BLSTM), in two precisions:

- ``tf32``: float32 with TF32 allowed for cuDNN's RNNs (its default), which both fused recurrences and the driver's
  GEMMs follow (``rnn_fast.ops.lstm.precision.cudnn_fp32_precision``), so that both sides use tensor cores throughout;
- ``bf16``: parameters and input in bfloat16 (state in fp32 on both sides).

Passes: ``forward`` (a training forward, building the autograd graph), ``backward`` (of a forward run in the
round's untimed setup) and ``forward+backward``; the loss is a fixed random weighting of the output. Every timed
call ends with a device synchronisation, and every setup with one before the clock starts. Medians, p20/p80 and
the speedups (cuDNN median / fused median) go to ``benchmarks/results/<device>-<backend>-<date>.json`` (or
``$RNN_FAST_RESULTS_DIR``), with the settings they ran under (``RNN_FAST_CUDA_VARIANTS``, ``RNN_FAST_TRITON_TILE``)
and, for Triton, the tile each kernel ran with and what the autotuner measured of the others. A fallback from a
fused backend to nn.LSTM warns, and warnings fail these benchmarks, so a figure is never filed under the wrong name.

``RNN_FAST_BENCH_DRY_RUN=1`` runs the same flow on the CPU at a tiny size, the Triton kernels in the interpreter
and the ``cpu`` backend in place of ``cuda``, in float32: it checks the GPU session's flow (tools/gpu_session.py
--dry-run); its figures mean nothing.
"""
import os
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import load_backend, unavailable_reason
from rnn_fast.testing import PRECISIONS, cudnn_tf32

from _timing import (TRAINING_PASSES, report, summary, synchronize, synchronized, training_passes,
                     write_results)

DRY_RUN = os.environ.get("RNN_FAST_BENCH_DRY_RUN") == "1"
INPUT_SIZE, HIDDEN, LAYERS, SEQ_LEN = (5, 4, 2, 3) if DRY_RUN else (160, 128, 2, 100)
BATCHES = tuple(int(batch) for batch in os.environ.get("RNN_FAST_BENCH_BATCHES", "256,768,2048").split(","))
TIMED_PRECISIONS = ("fp32",) if DRY_RUN else ("tf32", "bf16")
# fused backend -> the directions it is benchmarked with
FUSED = {"triton": (False, True), "cpu" if DRY_RUN else "cuda": (False, True)}
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "1" if DRY_RUN else "30"))
WARMUP_ROUNDS = 0 if DRY_RUN else 3
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")

pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("error::UserWarning"),
]

_records = []
# What the Triton autotuner measured when it tuned each case's kernels.
_tile_timings: List[dict] = []


def _case(record: dict) -> Tuple:
    return record["batch"], record["bidirectional"], record["precision"], record["pass"]


def _triton_tiles() -> dict:
    triton_backend = load_backend("triton")
    return {"triton_tiles": triton_backend.tile_choices(), "triton_tile_timings": _tile_timings}


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
            "dry_run": DRY_RUN,
            **(_triton_tiles() if backend == "triton" else {}),
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
    with cudnn_tf32(PRECISIONS[precision].tf32):
        yield


@pytest.fixture
def autotuner_record(implementation, request):
    """After a Triton case: what the autotuner measured if it compared tiles for this case's kernels."""
    yield
    if implementation != "triton":
        return
    for kernel, ms_by_tile in load_backend("triton").latest_tile_timings().items():
        if not any(entry["kernel"] == kernel and entry["ms_by_tile"] == ms_by_tile for entry in _tile_timings):
            _tile_timings.append({"case": request.node.callspec.id, "kernel": kernel, "ms_by_tile": ms_by_tile})


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
@pytest.mark.parametrize("precision", TIMED_PRECISIONS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda batch: f"B{batch}")
def test_lstm_stack(benchmark, precision_flags, autotuner_record, batch, precision, pass_name, implementation,
                    bidirectional):
    dtype = PRECISIONS[precision].dtype
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
