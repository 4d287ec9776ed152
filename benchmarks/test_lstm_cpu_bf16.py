"""bf16 on CPU: ``rnn_fast.LSTM(backend="cpu")`` vs ``torch.nn.LSTM``, both under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` (nn.LSTM then runs oneDNN's bf16 LSTM).

    python -m pytest benchmarks/test_lstm_cpu_bf16.py --benchmark-only

Two parts:

- ``test_classifier_inference``: the classifier's stack (I=160, H=128, 2 layers, T=100) under ``no_grad`` at B=1, 16
  and 256: nn.LSTM fp32, nn.LSTM bf16 and rnn_fast bf16 alternating, with each one's largest error against a float64
  nn.LSTM on the same weights and input;
- ``test_shape``: the shape sweep of test_lstm_cpu_shapes.py (its SHAPES, timing and summary), under autocast bf16.

Results, with the CPU model and its flags (``avx512_bf16``, ``amx_bf16``), go to
``benchmarks/results/cpu-bf16-<date>.json``. It runs only where the cpu backend multiplies in bf16 natively.
"""
import contextlib
import datetime
import time

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import RESULTS_DIR, alternating, report, summary, threads_then_results
from test_lstm_cpu_shapes import MODES, NUM_THREADS, ROUNDS, SHAPES, WARMUP_ROUNDS, _summary, shape_case

CLASSIFIER_BATCHES = (1, 16, 256)
CLASSIFIER_ROUNDS = 15


def _native_bf16() -> bool:
    if unavailable_reason("cpu") is not None:
        return False
    from rnn_fast.ops.lstm import cpu
    return cpu.bf16_kernel() == "avx512_bf16"


pytestmark = pytest.mark.skipif(not _native_bf16(), reason="the cpu backend has no native bf16 kernel here")

_records = []
_classifier = []


@pytest.fixture(scope="module", autouse=True)
def results_file():
    generator = threads_then_results(
        "cpu-bf16", NUM_THREADS, _records,
        lambda: {"classifier_inference": _classifier, "summary": _summary(_records),
                 "config": {"autocast": "cpu bfloat16", "input_size": "= hidden", "rounds": ROUNDS}},
        RESULTS_DIR / f"cpu-bf16-{datetime.date.today().isoformat()}.json")
    next(generator)
    yield
    next(generator, None)


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("batch", CLASSIFIER_BATCHES, ids=lambda b: f"B{b}")
def test_classifier_inference(benchmark, batch):
    torch.manual_seed(0)
    reference = nn.LSTM(160, 128, 2)
    fused = rnn_fast.LSTM(160, 128, 2, backend="cpu")
    fused.load_state_dict(reference.state_dict())
    exact = nn.LSTM(160, 128, 2).double()
    exact.load_state_dict(reference.state_dict())
    x = torch.randn(100, batch, 160)
    runs = {"torch_fp32": lambda: reference(x), "torch_bf16": lambda: reference(x), "rnn_fast_bf16": lambda: fused(x)}
    seconds = {name: [] for name in runs}
    with torch.no_grad():
        truth = exact(x.double())[0]
        errors = {"torch_fp32": (reference(x)[0].double() - truth).abs().max().item()}
        with _autocast():
            errors["torch_bf16"] = (reference(x)[0].double() - truth).abs().max().item()
            errors["rnn_fast_bf16"] = (fused(x)[0].double() - truth).abs().max().item()
        for round_index in range(CLASSIFIER_ROUNDS + 2):
            for name, run in runs.items():
                with _autocast() if name.endswith("bf16") else contextlib.nullcontext():
                    start = time.perf_counter()
                    run()
                    if round_index >= 2:
                        seconds[name].append(time.perf_counter() - start)
    benchmark.pedantic(lambda: None, rounds=1)
    figures = {name: {**summary(values), "max_abs_error_vs_float64": errors[name]} for name, values in seconds.items()}
    _classifier.append({"batch": batch, **figures,
                        "speedup_vs_torch_bf16": figures["torch_bf16"]["median_ms"]
                        / figures["rnn_fast_bf16"]["median_ms"]})
    report(f"classifier B={batch} no_grad: " + ", ".join(
        f"{name} {f['median_ms']:.2f} ms (error {f['max_abs_error_vs_float64']:.1e})" for name, f in figures.items())
        + f"; rnn_fast bf16 {_classifier[-1]['speedup_vs_torch_bf16']:.2f}x nn.LSTM bf16")


def _step(module, x, mode, weight):
    if mode == "inference":
        def infer():
            with torch.no_grad(), _autocast():
                module(x)
        return infer

    def train():
        module.zero_grad(set_to_none=True)
        with _autocast():
            output, _ = module(x)
        (output.float() * weight).sum().backward()
    return train


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape(benchmark, shape, mode):
    reference, fused, x, weight = shape_case(shape)
    benchmark.group = f"lstm-cpu-bf16-{shape}-{mode}"
    timed = alternating(benchmark, _step(fused, x, mode, weight), _step(reference, x, mode, weight), ROUNDS,
                        WARMUP_ROUNDS)
    with torch.no_grad() if mode == "inference" else contextlib.nullcontext(), _autocast():
        auto = rnn_fast.LSTM(shape.hidden, shape.hidden, shape.layers,
                             bidirectional=shape.bidirectional).resolved_backend(x)
    _records.append({"case": f"{shape}-{mode}", "mode": mode, **shape._asdict(), "cpu": timed["fused"],
                     "torch": timed["torch"], "speedup_vs_torch": timed["speedup"], "auto_backend": auto,
                     "auto_speedup_vs_torch": timed["speedup"] if auto == "cpu" else 1.0})
    report(f"{shape}-{mode} bf16: nn.LSTM {timed['torch']['median_ms']:.2f} ms, cpu "
           f"{timed['fused']['median_ms']:.2f} ms, {timed['speedup']:.2f}x")
