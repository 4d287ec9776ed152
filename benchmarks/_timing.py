"""Timing and recording helpers for the benchmarks: synchronised calls, median/p20/p80, the environment a figure
was measured in, and the results JSON (``benchmarks/results/<device>-<kind>-<date>.json``)."""
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
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


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the body on ``count`` intra-op threads, the figure's stated machine, then restores the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{os.cpu_count()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set features that decide which kernels a CPU can run fast (fp32 FMA width, bf16 and int8 dot
# products, AMX tiles), as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> List[str]:
    """Which of :data:`CPU_FEATURES` this CPU has."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [feature for feature in CPU_FEATURES if feature in flags]


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


def environment(device: torch.device) -> dict:
    """Device, library versions, date and the exact command, recorded with every result; on CPU also the
    thread count and the instruction-set features (:data:`CPU_FEATURES`)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "-m", "pytest"] + sys.argv[1:]) if "pytest" in sys.argv[0]
        else shlex.join(["python"] + sys.argv),
        **({"cpu_features": cpu_features()} if device.type == "cpu" else {}),
    }


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
        slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
        path = RESULTS_DIR / f"{slug}-{kind}-{record['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
