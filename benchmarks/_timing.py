"""Timing and recording helpers for the benchmarks: synchronised calls, median/p20/p80, and the results JSON
(``benchmarks/results/<device>-<kind>-<date>.json``, with the environment the figure was measured in)."""
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

from rnn_fast.testing import environment, results_file_name, torch_threads

# RNN_FAST_RESULTS_DIR moves the results files elsewhere: the GPU session collects them from its own folder, and
# its CPU dry run must not file figures in the repository.
RESULTS_DIR = Path(os.environ.get("RNN_FAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
# Lines for the end of the session (benchmarks/conftest.py prints them): pytest captures what tests print.
_REPORT: List[str] = []


def report(line: str) -> None:
    _REPORT.append(line)


def reported_lines() -> List[str]:
    return list(_REPORT)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device synchronisation, so that a clock read after it sees the work finished."""

    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        synchronize(device)
        return result

    return call


def _rss_high_water_kib() -> int:
    return int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_probe(device: torch.device) -> Callable[[], float]:
    """Starts a peak-memory measurement; the returned function gives the MiB of peak growth since then."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        return lambda: (torch.cuda.max_memory_allocated(device) - resident) / 2 ** 20
    # "5" resets the high-water mark to the current RSS (Linux), so earlier peaks do not count.
    Path("/proc/self/clear_refs").write_text("5")
    resident = _rss_high_water_kib()
    return lambda: (_rss_high_water_kib() - resident) / 2 ** 10


TRAINING_PASSES = ("forward", "backward", "forward+backward")


def training_passes(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> Dict[str, tuple]:
    """``pass -> (call, setup or None)`` for a training forward (building the graph), its backward (``setup``
    returns the arguments: a loss from an untimed forward) and both; the loss is ``output * weight`` summed."""

    def loss():
        output, _ = module(x)
        return (output * weight).float().sum()

    def backward(value):
        value.backward()
        module.zero_grad(set_to_none=True)

    return {"forward": (loss, None), "backward": (backward, lambda: (loss(),)),
            "forward+backward": (lambda: backward(loss()), None)}


def summary(seconds: Iterable[float]) -> dict:
    """Median, p20 and p80 in milliseconds, and the number of rounds."""
    milliseconds = [1000 * value for value in seconds]
    if len(milliseconds) == 1:
        p20 = p80 = milliseconds[0]
    else:
        p20, _, _, p80 = statistics.quantiles(milliseconds, n=5, method="inclusive")
    return {"median_ms": statistics.median(milliseconds), "p20_ms": p20, "p80_ms": p80,
            "rounds": len(milliseconds)}


def alternating(benchmark, fused_step: Callable[[], None], reference_step: Callable[[], None], rounds: int,
                warmup_rounds: int) -> Dict[str, dict]:
    """Times ``fused_step`` through pytest-benchmark and ``reference_step`` by hand in each round's setup, so that
    the two alternate round by round and share whatever load the machine has. Returns both summaries (after
    the warm-up rounds) and the speedup, reference median over fused median."""
    reference_seconds = []

    def time_reference_round():
        start = time.perf_counter()
        reference_step()
        reference_seconds.append(time.perf_counter() - start)

    benchmark.pedantic(fused_step, setup=time_reference_round, rounds=rounds, warmup_rounds=warmup_rounds,
                       iterations=1)
    fused = summary(benchmark.stats.stats.data)
    reference = summary(reference_seconds[warmup_rounds:warmup_rounds + rounds])
    speedup = reference["median_ms"] / fused["median_ms"]
    benchmark.extra_info.update(torch_median_ms=reference["median_ms"], speedup_vs_torch=speedup)
    return {"fused": fused, "torch": reference, "speedup": speedup}


def threads_then_results(kind: str, threads: int, records: List[dict], payload: Callable[[], dict],
                         path: Path) -> Iterator[None]:
    """The body of a module-scoped fixture: runs the module on ``threads`` CPU threads, then writes what its
    benchmarks appended to ``records``, with ``payload()``'s keys, to ``path`` (nothing when none ran)."""
    with torch_threads(threads):
        yield
    if records:
        written = write_results(kind, torch.device("cpu"), {"threads": threads, **payload(), "results": records}, path)
        report(f"wrote {written}")


def write_results(kind: str, device: torch.device, payload: dict, path: Optional[Path] = None) -> Path:
    """Writes ``environment(device)`` plus ``payload`` to ``path``, by default
    ``results/<device>-<kind>-<date>.json``."""
    record = {**environment(device), **payload}
    if path is None:
        path = RESULTS_DIR / results_file_name(record, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
