#!/usr/bin/env python
"""Seconds per training epoch of the NSynth classifiers, per model and LSTM backend.

The seed configuration: 369 iterations of batch 768 over ``[100, 160]`` frames (the first second of NSynth
audio), a 2-layer LSTM or BLSTM with hidden size 128 or the M5 CNN baseline, cross-entropy and Adam (lr 0.003).

What one epoch is: draw a random order of the examples, then per iteration gather the batch by index, forward,
loss, backward and optimizer step. The examples live on the device (random int16 samples scaled to float32,
like the real cache, generated there once per model), so the gather is the epoch's whole data path; it is also
timed alone to give its share of the epoch. The clocks are read after synchronising the device.

All backends of one model share the dataset and run in this one process. Each gets an untimed warm-up epoch
(kernel compilation, cuDNN plans), then the timed epochs go round-robin over the backends, so a slow spell of a
shared machine hits them alike and the speedup over the torch backend compares like with like. Peak memory is
what one backend's epoch needs above what was resident before it (the dataset, every model and optimizer state):
``torch.cuda.max_memory_allocated`` on CUDA, the process's RSS high-water mark on CPU (reset through
``/proc/self/clear_refs``), taken over each backend's first timed epoch.

    python benchmarks/epoch.py --device cuda --models lstm blstm cnn --backends torch triton cuda
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from rnn_fast import model_backend, resolve_backend
from rnn_fast.nsynth.models import MODEL_NAMES, build_model
from rnn_fast.nsynth.training.engine import PRECISIONS, forward_precision
from rnn_fast.ops.lstm import BACKENDS

from _timing import peak_memory_probe, summary, synchronize, write_results

SEED_ITERS, SEED_BATCH_SIZE = 369, 768
FRAMES, FRAME_SIZE, NUM_CLASSES = 100, 160, 10
LSTM_MODELS = ("lstm", "blstm")
# The models without a recurrence run once, under this name, whatever --backends says.
CNN_BACKEND = "torch"
BASELINE_BACKEND = "torch"
BASELINE = {"cuda": "torch backend of the same model (cuDNN)",
            "cpu": "torch backend of the same model (ATen's CPU LSTM)"}
DEFAULT_BACKENDS = {"cuda": ("torch", "triton", "cuda"), "cpu": ("torch", "cpu")}


@dataclass(frozen=True)
class EpochConfig:
    """One (model, backend) to time, and the training setup it is timed in."""
    model: str
    backend: str
    device: str
    iters: int = SEED_ITERS
    epochs: int = 5
    batch_size: int = SEED_BATCH_SIZE
    hidden: int = 128
    cnn_width: int = 128
    layers: int = 2
    lr: float = 3e-3
    seed: int = 0
    matmul_precision: str = "highest"
    precision: str = "fp32"


class DeviceDataset:
    """``iters * batch_size`` random examples and labels, resident on the device."""

    def __init__(self, config: EpochConfig):
        self.device = torch.device(config.device)
        self.batch_size = config.batch_size
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        count = config.iters * config.batch_size
        self.frames = torch.randint(-32768, 32768, (count, FRAMES, FRAME_SIZE), generator=self.generator,
                                    device=self.device, dtype=torch.float32).div_(32768)
        self.labels = torch.randint(0, NUM_CLASSES, (count,), generator=self.generator, device=self.device)

    def batches(self):
        """An epoch's ``(frames, labels)`` batches in a fresh random order, gathered on the device."""
        order = torch.randperm(len(self.labels), generator=self.generator, device=self.device)
        for index in order.split(self.batch_size):
            yield self.frames.index_select(0, index), self.labels.index_select(0, index)

    def data_epoch(self) -> None:
        """An epoch's data path alone: the order and the gathers, no training."""
        for _ in self.batches():
            pass
        synchronize(self.device)


class TrainingRun:
    """A model and its Adam optimizer, trained on a shared :class:`DeviceDataset`."""

    def __init__(self, config: EpochConfig, dataset: DeviceDataset):
        self.config = config
        self.dataset = dataset
        torch.manual_seed(config.seed)
        backend = config.backend if config.model in LSTM_MODELS else "auto"
        self.model = build_model(config.model, NUM_CLASSES, FRAME_SIZE, config.hidden, config.layers,
                                 backend=backend, cnn_width=config.cnn_width).to(dataset.device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.last_loss: Optional[torch.Tensor] = None

    def epoch(self) -> None:
        """One training epoch; ``last_loss`` is then its last batch's loss (still on the device)."""
        for frames, labels in self.dataset.batches():
            with forward_precision(self.config.precision, self.dataset.device):
                loss = F.cross_entropy(self.model(frames), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.last_loss = loss.detach()
        synchronize(self.dataset.device)


def _seconds(function: Callable[[], None], device: torch.device) -> float:
    """Wall time of ``function``, which synchronises the device before it returns."""
    synchronize(device)
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _record(run: TrainingRun, seconds: List[float], data_seconds: List[float], peak_mem_mb: float) -> dict:
    """One ``epoch`` entry of the results file (``speedup_vs_cudnn`` is filled in once every backend ran)."""
    final_loss = run.last_loss.item()
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"training loss became {final_loss}")
    epoch_ms, data_ms = summary(seconds), summary(data_seconds)
    return {
        "model": run.config.model,
        "precision": run.config.precision,
        # What ran, which is what was asked for: skip_reason keeps out every backend that would fall back.
        "backend": model_backend(run.model) if run.config.model in LSTM_MODELS else run.config.backend,
        "seconds_per_epoch": epoch_ms["median_ms"] / 1000,
        "seconds_p20": epoch_ms["p20_ms"] / 1000,
        "seconds_p80": epoch_ms["p80_ms"] / 1000,
        "ms_per_iter": epoch_ms["median_ms"] / run.config.iters,
        "speedup_vs_cudnn": None,
        "data_seconds_per_epoch": data_ms["median_ms"] / 1000,
        "data_share": data_ms["median_ms"] / epoch_ms["median_ms"],
        "peak_mem_mb": peak_mem_mb,
        "final_loss": final_loss,
    }


def measure_model(setup: EpochConfig, backends: List[str], failed: Dict[str, str]) -> List[dict]:
    """Records of ``setup.model`` under each backend: a warm-up epoch each, then ``setup.epochs`` rounds of one
    timed epoch per backend, then as many epochs of the data path alone. A backend that raises is dropped and its
    error goes into ``failed``, so that the others' figures survive."""
    device = torch.device(setup.device)
    torch.set_float32_matmul_precision(setup.matmul_precision)
    dataset = DeviceDataset(setup)
    runs: Dict[str, TrainingRun] = {}

    def attempt(backend: str, step: Callable, *args) -> None:
        try:
            step(*args)
        except Exception as error:  # one backend failing must not lose the others' figures
            failed[backend] = f"failed: {type(error).__name__}: {error}"
            runs.pop(backend, None)

    def warm_up(backend: str) -> None:
        runs[backend] = TrainingRun(replace(setup, backend=backend), dataset)
        runs[backend].epoch()

    def timed_epoch(backend: str, run: TrainingRun, measure_peak: bool) -> None:
        probe = peak_memory_probe(device) if measure_peak else None
        seconds[backend].append(_seconds(run.epoch, device))
        if probe is not None:
            peak_mem_mb[backend] = probe()

    def finish(backend: str, run: TrainingRun) -> None:
        records.append(_record(run, seconds[backend], data_seconds, peak_mem_mb[backend]))

    for backend in backends:
        attempt(backend, warm_up, backend)
    seconds: Dict[str, List[float]] = {backend: [] for backend in runs}
    peak_mem_mb: Dict[str, float] = {}
    for round_index in range(setup.epochs):
        for backend, run in list(runs.items()):
            attempt(backend, timed_epoch, backend, run, round_index == 0)
    data_seconds = [_seconds(dataset.data_epoch, device) for _ in range(setup.epochs)]
    records: List[dict] = []
    for backend, run in list(runs.items()):
        attempt(backend, finish, backend, run)
    return records


def skip_reason(model: str, backend: str, device: torch.device, hidden: int,
                precision: str = "fp32") -> Optional[str]:
    """Why this install or device cannot time ``backend``'s fused recurrence in ``precision``, or None when it can.

    A backend that cannot run the input would fall back to nn.LSTM and be timed under the wrong name."""
    if model not in LSTM_MODELS:
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return resolve_backend(backend, device, dtype, hidden).fallback_reason


def add_speedups(records: List[dict]) -> None:
    """``speedup_vs_cudnn``: the baseline backend's seconds per epoch over this one's, for the same model."""
    baseline = {r["model"]: r["seconds_per_epoch"] for r in records if r["backend"] == BASELINE_BACKEND}
    for record in records:
        if record["model"] in LSTM_MODELS and record["model"] in baseline:
            record["speedup_vs_cudnn"] = baseline[record["model"]] / record["seconds_per_epoch"]


def model_backends(model: str, backends: List[str]) -> List[str]:
    return list(backends) if model in LSTM_MODELS else [CNN_BACKEND]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--backends", nargs="+", choices=[name for name in BACKENDS if name != "auto"],
                        help="LSTM backends (default: torch triton cuda on CUDA, torch cpu on CPU); "
                             "the CNN always runs once")
    parser.add_argument("--iters", type=int, default=SEED_ITERS, help="iterations per epoch (seed: 369)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (at least 2), after one warm-up epoch")
    parser.add_argument("--batch-size", type=int, default=SEED_BATCH_SIZE)
    parser.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (seed: 128)")
    parser.add_argument("--cnn-width", type=int, default=128, help="channels of the CNN's first block (seed: 128)")
    parser.add_argument("--float32-matmul-precision", dest="matmul_precision", default="highest",
                        choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision: PyTorch's default 'highest' keeps float32 GEMMs "
                             "in IEEE fp32; 'high' lets them use TF32, as cuDNN's LSTM does by default")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: forward under torch.autocast to bfloat16 (the classifier's --precision bf16)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/<device name>-epoch-<date>.json)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type not in DEFAULT_BACKENDS:
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.backends is None:
        args.backends = list(DEFAULT_BACKENDS[args.device.type])
    for name in ("iters", "batch_size", "hidden", "cnn_width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the p20/p80 spread needs two)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Other jobs on the machine skew the figures; the load averages around the run say how much.
    load_before = os.getloadavg()
    setup = EpochConfig("", "", str(args.device), args.iters, args.epochs, args.batch_size, args.hidden,
                        args.cnn_width, matmul_precision=args.matmul_precision, precision=args.precision)
    records: List[dict] = []
    skipped: List[Dict[str, str]] = []
    failures = 0
    for model in args.models:
        backends = []
        for backend in model_backends(model, args.backends):
            reason = skip_reason(model, backend, args.device, args.hidden, args.precision)
            if reason is None:
                backends.append(backend)
            else:
                skipped.append({"model": model, "backend": backend, "reason": reason})
        failed: Dict[str, str] = {}
        model_records = measure_model(replace(setup, model=model), backends, failed) if backends else []
        failures += len(failed)
        skipped += [{"model": model, "backend": backend, "reason": reason} for backend, reason in failed.items()]
        for r in model_records:
            print(f"{model:5s} {r['backend']:6s} {r['seconds_per_epoch']:9.3f} s/epoch {r['ms_per_iter']:9.2f} "
                  f"ms/iter data {100 * r['data_share']:5.2f}% peak {r['peak_mem_mb']:8.1f} MiB", flush=True)
        records += model_records
    for entry in skipped:
        print(f"not timed: {entry['model']}/{entry['backend']}: {entry['reason']}", file=sys.stderr, flush=True)
    add_speedups(records)

    config = {key: value for key, value in asdict(setup).items() if key not in ("model", "backend")}
    config.update(seq_len=FRAMES, input_size=FRAME_SIZE, num_classes=NUM_CLASSES,
                  threads=torch.get_num_threads(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  dataset_mb=args.iters * args.batch_size * FRAMES * FRAME_SIZE * 4 / 2 ** 20)
    payload = {"baseline": BASELINE[args.device.type], "config": config,
               "load_average": {"before": load_before, "after": os.getloadavg()},
               "epoch": records, "skipped": skipped}
    kind = "epoch" if args.precision == "fp32" else f"epoch-{args.precision}"
    out = write_results(kind, args.device, payload, args.out)
    print(f"wrote {out}")
    return 1 if failures or not records else 0


if __name__ == "__main__":
    sys.exit(main())
