"""Throughput of ``rnn_fast.nsynth.data.BatchLoader`` from a prepared cache, in examples per second.

    python -m pytest benchmarks/test_nsynth_loader.py --benchmark-only

A 20,000-note cache of random int16 audio with random labels is written in cache format straight from memory
(``save_split``; the loader's work does not depend on the sound) and opened with ``load_split``, as training
opens it. A round is one shuffled epoch of batch 768 (26 batches, 19,968 examples) on 2 threads, each batch
gathered and converted to float32 ``[768, 100, 160]``. Cases: ``memmap`` (the memory-mapped cache; after the
warm-up round its pages sit in the OS page cache, as they do after a first training epoch) and ``in-memory``
(``on_device=True`` on the CPU: the split copied into RAM once). The examples/s figure (examples per epoch over
the median epoch) goes to pytest-benchmark's ``extra_info`` and, with median/p20/p80, to
``benchmarks/results/<device>-nsynth-loader-<date>.json``. The goal is >= 20,000 examples/s on 2 cores.
"""
import os

import numpy as np
import pytest
import torch

from rnn_fast.nsynth.data import CLASSES, CLIP_SAMPLES, BatchLoader, NSynthSplit, load_split, save_split

from _timing import report, summary, torch_threads, write_results

EXAMPLES = 20_000
BATCH_SIZE = 768
NUM_THREADS = 2
ROUNDS = int(os.environ.get("RNN_FAST_BENCH_ROUNDS", "7"))
WARMUP_ROUNDS = 1
DEVICE = torch.device("cpu")

_records = []


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    rng = np.random.default_rng(0)
    columns = {name: rng.integers(0, 100, EXAMPLES) for name in
               ("families", "sources", "pitches", "velocities", "instruments")}
    data = NSynthSplit(audio=rng.integers(-32768, 32768, (EXAMPLES, CLIP_SAMPLES), dtype=np.int16),
                       labels=rng.integers(0, len(CLASSES), EXAMPLES), note_strs=[str(i) for i in range(EXAMPLES)],
                       **columns)
    directory = tmp_path_factory.mktemp("loader-cache")
    save_split(directory, "train", data)
    return load_split(directory, "train")


@pytest.fixture(scope="module", autouse=True)
def results_file():
    with torch_threads(NUM_THREADS):
        yield
    if _records:
        path = write_results("nsynth-loader", DEVICE, {
            "config": {"examples": EXAMPLES, "batch_size": BATCH_SIZE, "threads": NUM_THREADS, "rounds": ROUNDS,
                       "warmup_rounds": WARMUP_ROUNDS, "cores": os.cpu_count()},
            "results": _records})
        report(f"wrote {path}")


@pytest.mark.parametrize("on_device", [False, True], ids=["memmap", "in-memory"])
def test_loader_throughput(benchmark, split, on_device):
    loader = BatchLoader(split, BATCH_SIZE, shuffle=True, drop_last=True, on_device=on_device)

    def epoch():
        loader.set_epoch(loader.epoch + 1)
        return sum(len(y) for _, y in loader)

    served = benchmark.pedantic(epoch, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    assert served == len(loader) * BATCH_SIZE
    timed = summary(benchmark.stats.stats.data)
    examples_per_second = served / (timed["median_ms"] / 1000)
    case = "in-memory" if on_device else "memmap"
    benchmark.extra_info.update(examples_per_epoch=served, examples_per_second=round(examples_per_second))
    _records.append({"case": case, "examples_per_epoch": served, "examples_per_second": examples_per_second,
                     **timed})
    report(f"loader, {case}: {examples_per_second:,.0f} examples/s (median epoch {timed['median_ms']:.0f} ms)")
