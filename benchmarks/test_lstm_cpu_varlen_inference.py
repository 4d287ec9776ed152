"""Variable-length training, inference and streaming on CPU: ``rnn_fast.LSTM(backend="cpu")`` vs ``torch.nn.LSTM``.

    python -m pytest benchmarks/test_lstm_cpu_varlen_inference.py --benchmark-only

The classifier's stack (2 layers, input 160, hidden 128, batch-first), on 2 threads, with the same weights on
both sides. Cases:

- ``train``: one forward and one backward of a random weighting of the output (input not requiring grad), padded
  ``[B, T, 160]`` or a ``PackedSequence`` (packed once, outside the clock, with ``enforce_sorted=False``) whose
  lengths are uniform in [10, T], or lognormal (median 30, sigma 0.8, clipped to [1, T]); T=100, B=256, and
  T=1000, B=32 for the long case; LSTM and BLSTM;
- ``inference``: one forward under ``torch.no_grad``, padded, T=100, B in {1, 16, 256};
- ``streaming``: 100 calls of one step (``[1, 1, 160]``), B=1, each carrying the previous call's ``(h, c)``,
  under ``torch.no_grad``: one round is the 100 calls;
- ``memory``: peak memory of one inference call above what was resident before it, each implementation in a
  fresh process (``_timing.peak_memory_probe``: RSS high-water mark, reset through ``/proc/self/clear_refs``).

The fused backend and nn.LSTM alternate round by round and share whatever load the machine has
(``_timing.alternating``). Medians, p20/p80, the speedup (nn.LSTM
median / fused median) and, for the packed cases, the cost relative to rnn_fast's own padded run of the same
model and batch go to ``benchmarks/results/cpu-varlen-inference-<date>.json``, with the host's load average
before and after (the 2-core machine is shared).
"""
import datetime
import math
import multiprocessing
import os
from typing import Callable, NamedTuple, Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_fast
from rnn_fast.ops.lstm import unavailable_reason

from _timing import RESULTS_DIR, alternating, peak_memory_probe, report, threads_then_results

INPUT_SIZE, HIDDEN, LAYERS = 160, 128, 2
NUM_THREADS = 2
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "10"))
WARMUP_ROUNDS = 1
STREAM_CALLS = 100

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                                reason=f"cpu backend: {unavailable_reason('cpu')}")

_records = []
_load_before = os.getloadavg()


class Case(NamedTuple):
    kind: str  # train, inference, streaming
    batch: int
    seq_len: int
    bidirectional: bool = False
    lengths: Optional[str] = None  # None (padded), "uniform" or "lognormal"
    rounds: int = ROUNDS

    def __str__(self):
        return (f"{self.kind}-{'blstm' if self.bidirectional else 'lstm'}-B{self.batch}-T{self.seq_len}"
                f"{'-' + self.lengths if self.lengths else ''}")


CASES = [
    Case("train", 256, 100),
    Case("train", 256, 100, lengths="uniform"),
    Case("train", 256, 100, lengths="lognormal"),
    Case("train", 32, 1000, lengths="uniform", rounds=max(3, ROUNDS // 2)),
    Case("train", 256, 100, bidirectional=True),
    Case("train", 256, 100, bidirectional=True, lengths="uniform"),
    Case("inference", 1, 100, rounds=10 * ROUNDS),
    Case("inference", 16, 100, rounds=5 * ROUNDS),
    Case("inference", 256, 100, rounds=ROUNDS),
    Case("inference", 16, 100, bidirectional=True, rounds=5 * ROUNDS),
    Case("inference", 256, 100, bidirectional=True, lengths="uniform", rounds=ROUNDS),
    Case("streaming", 1, 1, rounds=3 * ROUNDS),
]


@pytest.fixture(scope="module", autouse=True)
def results_file():
    """Runs the module on NUM_THREADS threads, then writes every case's figures to one JSON file."""

    def payload():
        _add_packed_over_padded(_records)
        return {
            "load_average": {"before": _load_before, "after": os.getloadavg()},
            "shared_host": "other engineers' jobs may run on this 2-core machine; the ratios are measured in one "
                           "process, alternating round by round, so both sides share that load",
            "config": {"input_size": INPUT_SIZE, "hidden": HIDDEN, "layers": LAYERS, "batch_first": True,
                       "input_requires_grad": False, "warmup_rounds": WARMUP_ROUNDS, "stream_calls": STREAM_CALLS,
                       "lengths": {"uniform": "uniform integers in [10, T]",
                                   "lognormal": "exp(N(log 30, 0.8^2)) rounded, clipped to [1, T]"}},
        }

    yield from threads_then_results("cpu-varlen-inference", NUM_THREADS, _records, payload,
                                    RESULTS_DIR / f"cpu-varlen-inference-{datetime.date.today().isoformat()}.json")


def _add_packed_over_padded(records):
    """Each packed training case's fused median over the fused median of the padded case of the same model."""
    padded = {(r["bidirectional"], r["batch"], r["seq_len"]): r["cpu"]["median_ms"] for r in records
              if r["kind"] == "train" and r["lengths"] is None}
    for record in records:
        key = (record["bidirectional"], record["batch"], record["seq_len"])
        if record["kind"] == "train" and record["lengths"] is not None and key in padded:
            record["cpu_packed_over_padded"] = record["cpu"]["median_ms"] / padded[key]
            report(f"  {record['case']}: rnn_fast packed / padded = {record['cpu_packed_over_padded']:.2f} "
                   f"({record['tokens_over_padded']:.2f} of the padded tokens)")


def _lengths(case: Case, generator: torch.Generator) -> torch.Tensor:
    if case.lengths == "uniform":
        return torch.randint(10, case.seq_len + 1, (case.batch,), generator=generator)
    normal = torch.randn(case.batch, generator=generator, dtype=torch.float64)
    lengths = torch.exp(math.log(30) + 0.8 * normal).round().clamp(1, case.seq_len).long()
    lengths[0] = case.seq_len  # the padded batch is T long
    return lengths


def _input(case: Case, generator: torch.Generator):
    x = torch.randn(case.batch, case.seq_len, INPUT_SIZE, generator=generator)
    if case.lengths is None:
        return x, 1.0
    lengths = _lengths(case, generator)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return packed, lengths.sum().item() / (case.batch * case.seq_len)


def _training_step(module: nn.Module, x, generator: torch.Generator) -> Callable[[], None]:
    output, _ = module(x)
    data = output.data if isinstance(output, PackedSequence) else output
    weight = torch.randn(data.shape, generator=generator)

    def step():
        module.zero_grad(set_to_none=True)
        out, _ = module(x)
        ((out.data if isinstance(out, PackedSequence) else out) * weight).sum().backward()

    return step


def _inference_step(module: nn.Module, x) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            module(x)

    return step


def _streaming_step(module: nn.Module, steps: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            state = None
            for t in range(steps.shape[0]):
                _, state = module(steps[t], state)

    return step


def _step(case: Case, module: nn.Module, x, generator: torch.Generator) -> Callable[[], None]:
    if case.kind == "train":
        return _training_step(module, x, generator)
    if case.kind == "inference":
        return _inference_step(module, x)
    return _streaming_step(module, x)


def _pair(bidirectional: bool):
    torch.manual_seed(0)
    kwargs = dict(num_layers=LAYERS, batch_first=True, bidirectional=bidirectional)
    reference = nn.LSTM(INPUT_SIZE, HIDDEN, **kwargs)
    fused = rnn_fast.LSTM(INPUT_SIZE, HIDDEN, backend="cpu", **kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@pytest.mark.filterwarnings("error::UserWarning")  # a fallback to nn.LSTM would be filed under the wrong name
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_and_inference(benchmark, case):
    reference, fused = _pair(case.bidirectional)
    generator = torch.Generator().manual_seed(1)
    if case.kind == "streaming":
        x, tokens = torch.randn(STREAM_CALLS, 1, 1, INPUT_SIZE, generator=generator), 1.0
    else:
        x, tokens = _input(case, generator)
    reference_step = _step(case, reference, x, torch.Generator().manual_seed(2))
    fused_step = _step(case, fused, x, torch.Generator().manual_seed(2))
    benchmark.group = f"lstm-cpu-{case}"
    timed = alternating(benchmark, fused_step, reference_step, case.rounds, WARMUP_ROUNDS)
    fused_stats, torch_stats, speedup = timed["fused"], timed["torch"], timed["speedup"]
    _records.append({"case": str(case), **case._asdict(), "tokens_over_padded": tokens, "cpu": fused_stats,
                     "torch": torch_stats, "speedup_vs_torch": speedup})
    report(f"{case}: nn.LSTM {torch_stats['median_ms']:.2f} ms, cpu {fused_stats['median_ms']:.2f} ms, "
           f"{speedup:.2f}x (medians of {case.rounds} rounds, {NUM_THREADS} threads)")


MEMORY_CASES = [Case("inference", 256, 100), Case("inference", 256, 100, bidirectional=True),
                Case("inference", 32, 1000, lengths="uniform")]


def _inference_peak_mib(case: Case, implementation: str) -> float:
    """In a fresh process: the peak memory of one inference call above what was resident before it."""
    torch.set_num_threads(NUM_THREADS)
    reference, fused = _pair(case.bidirectional)
    module = fused if implementation == "cpu" else reference
    x, _ = _input(case, torch.Generator().manual_seed(1))
    with torch.no_grad():
        module(torch.randn(1, 2, INPUT_SIZE))  # loads the code either side runs, at a negligible size
        probe = peak_memory_probe(torch.device("cpu"))
        module(x)
        return probe()


@pytest.mark.parametrize("case", MEMORY_CASES, ids=str)
def test_inference_peak_memory(benchmark, case):
    context = multiprocessing.get_context("spawn")
    peaks = {}
    with context.Pool(1, maxtasksperchild=1) as pool:
        for implementation in ("torch", "cpu"):
            peaks[implementation] = pool.apply(_inference_peak_mib, (case, implementation))
    benchmark.group = f"lstm-cpu-memory-{case}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figure is the peak, not a time
    _records.append({"case": f"memory-{case}", **case._asdict(), "kind": "memory",
                     "peak_mib": peaks, "torch_over_cpu": peaks["torch"] / max(peaks["cpu"], 1e-3)})
    report(f"memory-{case}: peak above resident, nn.LSTM {peaks['torch']:.1f} MiB, cpu {peaks['cpu']:.1f} MiB")
