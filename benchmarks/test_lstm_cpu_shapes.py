"""The shapes users run, on CPU: ``rnn_fast.LSTM(backend="cpu")`` vs ``torch.nn.LSTM``, training and inference.

    python -m pytest benchmarks/test_lstm_cpu_shapes.py --benchmark-only

:data:`SHAPES` is a fixed sample of the grid hidden size H in {32, 64, 128, 256, 512, 650, 1024, 1536} x 1-3 layers
x uni/bidirectional x batch B in {1, 4, 16, 64, 256} x sequence length T in {35, 100, 400} (input size = H), each
value of each axis present, at most about 20 GFLOP per forward so that the sweep fits a CI-sized machine; plus the
shapes named in the issues (word-LM medium, large-H encoders). Each shape runs twice:

- ``train``: one forward and one backward of a random weighting of the output (input not requiring grad);
- ``inference``: one forward under ``torch.no_grad``.

The two implementations, with the same weights, alternate round by round in one process on 2 threads
(``_timing.alternating``); medians of ROUNDS rounds after a warm-up round. Each case also records the machine's two
floors: the FLOP floor (the case's GEMM FLOPs at the fp32 GEMM rate measured here) and the weight-bandwidth floor
(T x the bytes of ``w_hh`` every step reads, forward and, in training, backward, at the measured memory read
bandwidth), and what ``backend="auto"`` picks for the call (nn.LSTM's implementation where the cpu backend's
measured rule, ``rnn_fast.ops.lstm.cpu.auto_declines``, leaves it). The results, with the CPU model and its
instruction-set features, go to ``benchmarks/results/cpu-shapes-<date>.json``; the summary prints the worst, median
and geometric-mean speedups of ``backend="cpu"`` and of ``backend="auto"`` and the worst shapes.
"""
import contextlib
import datetime
import math
import os
import statistics
import time
from typing import NamedTuple

import pytest
import torch
from torch import nn

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import RESULTS_DIR, alternating, report, threads_then_results

NUM_THREADS = 2
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "5"))
WARMUP_ROUNDS = 1
MODES = ("train", "inference")

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                                reason=f"cpu backend: {unavailable_reason('cpu')}")


class Shape(NamedTuple):
    hidden: int
    layers: int
    bidirectional: bool
    batch: int
    seq_len: int

    def __str__(self):
        return f"H{self.hidden}-L{self.layers}-{'bi' if self.bidirectional else 'uni'}-B{self.batch}-T{self.seq_len}"

    def forward_flops(self) -> int:
        """GEMM FLOPs of one forward: every step's input projection and recurrent product, all layers."""
        directions = 2 if self.bidirectional else 1
        inputs = [self.hidden] + [directions * self.hidden] * (self.layers - 1)
        return sum(directions * 2 * self.seq_len * self.batch * 4 * self.hidden * (width + self.hidden)
                   for width in inputs)

    def recurrent_weight_bytes(self) -> int:
        """Bytes of fp32 ``w_hh`` one step reads, all layers and directions."""
        return self.layers * (2 if self.bidirectional else 1) * 4 * self.hidden * self.hidden * 4


SHAPES = [
    Shape(32, 1, False, 1, 35), Shape(32, 2, True, 16, 400), Shape(32, 3, False, 256, 100),
    Shape(32, 1, True, 64, 35),
    Shape(64, 1, True, 4, 100), Shape(64, 2, False, 64, 400), Shape(64, 3, True, 256, 35),
    Shape(64, 2, False, 1, 100),
    Shape(128, 1, False, 16, 35), Shape(128, 2, False, 256, 100), Shape(128, 2, True, 64, 100),
    Shape(128, 3, False, 1, 400),
    Shape(256, 1, False, 64, 100), Shape(256, 2, True, 4, 35), Shape(256, 3, False, 16, 400),
    Shape(256, 1, True, 256, 35),
    Shape(512, 1, False, 16, 100), Shape(512, 2, False, 1, 400), Shape(512, 1, True, 64, 35),
    Shape(512, 3, True, 4, 35),
    Shape(650, 2, False, 16, 35), Shape(650, 1, True, 4, 100), Shape(650, 3, False, 1, 35),
    Shape(1024, 1, False, 4, 100), Shape(1024, 2, False, 1, 35), Shape(1024, 1, True, 16, 35),
    Shape(1024, 1, False, 16, 35),
    Shape(1536, 1, False, 1, 100), Shape(1536, 2, False, 4, 35), Shape(1536, 1, False, 16, 35),
    Shape(1536, 3, False, 1, 35),
    # Named in the issues: pytorch/examples' medium word LM, and the large-H shapes that lost.
    Shape(650, 2, False, 20, 35), Shape(1024, 1, False, 8, 50), Shape(512, 3, True, 8, 100),
]

_records = []
_floors = {}


def _gemm_flops_per_second() -> float:
    """The best of a few 1024^3 fp32 GEMMs on this machine's threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = []
    for _ in range(12):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * 1024 ** 3 / min(seconds[2:])


def _read_bytes_per_second() -> float:
    """The best of a few sums over 512 MiB: a read far larger than any cache."""
    data = torch.ones(2 ** 27)
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return data.numel() * 4 / min(seconds[1:])


@pytest.fixture(scope="module", autouse=True)
def results_file():
    """Runs the module on NUM_THREADS threads (the floors measured on them first), then writes every case's
    figures and the summary to one JSON file."""

    def payload():
        return {"floors": _floors, "summary": _summary(_records),
                "config": {"input_size": "= hidden", "batch_first": False, "input_requires_grad": False,
                           "rounds": ROUNDS, "warmup_rounds": WARMUP_ROUNDS}}

    generator = threads_then_results("cpu-shapes", NUM_THREADS, _records, payload,
                                     RESULTS_DIR / f"cpu-shapes-{datetime.date.today().isoformat()}.json")
    next(generator)
    _floors.update(gemm_gflops=_gemm_flops_per_second() / 1e9, read_gb_per_s=_read_bytes_per_second() / 1e9)
    report(f"floors: fp32 GEMM {_floors['gemm_gflops']:.0f} GFLOP/s, memory read {_floors['read_gb_per_s']:.1f} "
           f"GB/s ({NUM_THREADS} threads)")
    yield
    next(generator, None)


def _floor_ms(shape: Shape, mode: str) -> dict:
    """The case's FLOP floor and weight-bandwidth floor in milliseconds; training counts three GEMMs per forward
    one (forward, input gradient, weight gradient) and reads ``w_hh`` twice per step."""
    passes = 3 if mode == "train" else 1
    reads = 2 if mode == "train" else 1
    flop = 1e3 * passes * shape.forward_flops() / (_floors["gemm_gflops"] * 1e9)
    bandwidth = 1e3 * reads * shape.seq_len * shape.recurrent_weight_bytes() / (_floors["read_gb_per_s"] * 1e9)
    return {"flop_ms": flop, "weight_bandwidth_ms": bandwidth, "binding": "flop" if flop >= bandwidth else
            "weight_bandwidth"}


def _step(module: nn.Module, x: torch.Tensor, mode: str, weight: torch.Tensor):
    if mode == "inference":
        def infer():
            with torch.no_grad():
                module(x)
        return infer

    def train():
        module.zero_grad(set_to_none=True)
        output, _ = module(x)
        (output * weight).sum().backward()
    return train


def shape_case(shape: Shape):
    """``(nn.LSTM, rnn_fast.LSTM(backend="cpu") with its weights, input x, output weighting)`` for ``shape``."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    reference = nn.LSTM(shape.hidden, shape.hidden, **kwargs)
    fused = rnn_fast.LSTM(shape.hidden, shape.hidden, backend="cpu", **kwargs)
    fused.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.seq_len, shape.batch, shape.hidden, generator=generator)
    weight = torch.randn(shape.seq_len, shape.batch, shape.hidden * (2 if shape.bidirectional else 1),
                         generator=generator)
    return reference, fused, x, weight


@pytest.mark.filterwarnings("error::UserWarning")  # a fallback to nn.LSTM would be timed under the wrong name
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape(benchmark, shape, mode):
    reference, fused, x, weight = shape_case(shape)
    benchmark.group = f"lstm-cpu-shapes-{shape}-{mode}"
    timed = alternating(benchmark, _step(fused, x, mode, weight), _step(reference, x, mode, weight), ROUNDS,
                        WARMUP_ROUNDS)
    floors = _floor_ms(shape, mode)
    floor = max(floors["flop_ms"], floors["weight_bandwidth_ms"])
    with torch.no_grad() if mode == "inference" else contextlib.nullcontext():
        auto = rnn_fast.LSTM(shape.hidden, shape.hidden, shape.layers,
                             bidirectional=shape.bidirectional).resolved_backend(x)
    _records.append({"case": f"{shape}-{mode}", "mode": mode, **shape._asdict(), "cpu": timed["fused"],
                     "torch": timed["torch"], "speedup_vs_torch": timed["speedup"], "floors": floors,
                     "cpu_over_floor": timed["fused"]["median_ms"] / floor, "auto_backend": auto,
                     # What backend="auto" gets: this backend's speedup, or nn.LSTM's own where it leaves the call.
                     "auto_speedup_vs_torch": timed["speedup"] if auto == "cpu" else 1.0})
    report(f"{shape}-{mode}: nn.LSTM {timed['torch']['median_ms']:.2f} ms, cpu {timed['fused']['median_ms']:.2f} ms, "
           f"{timed['speedup']:.2f}x; floor {floor:.2f} ms ({floors['binding']})")


def _summary(records) -> dict:
    """Per mode, for backend="cpu" and for backend="auto": worst, median and geometric-mean speedup over the
    shapes, and the five worst shapes."""
    result = {}
    for mode in MODES:
        for backend, key in (("cpu", "speedup_vs_torch"), ("auto", "auto_speedup_vs_torch")):
            rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r[key])
            if not rows:
                continue
            speedups = [r[key] for r in rows]
            summary = {"shapes": len(rows), "worst": speedups[0], "median": statistics.median(speedups),
                       "geomean": math.exp(statistics.fmean(math.log(s) for s in speedups)),
                       "worst_shapes": [(r["case"], round(r[key], 3)) for r in rows[:5]]}
            result[f"{mode}-{backend}"] = summary
            report(f"{mode}, backend={backend}: {len(rows)} shapes, speedup worst {speedups[0]:.2f}x, median "
                   f"{summary['median']:.2f}x, geomean {summary['geomean']:.2f}x; worst: "
                   + ", ".join(f"{name} {value:.2f}x" for name, value in summary["worst_shapes"]))
    return result
