#!/usr/bin/env python
"""Seconds per training epoch of the seed and robust recipes on the development set (the "Epoch cost" of
docs/nsynth-dev/report.md, which ``python -m rnn_fast.nsynth.recipe_study report`` reads from the results file).

Measured like the training script's ``epoch_seconds`` (``train_one_epoch``: batches from the cache, the recipe's
objective, schedule and weight average), both recipes in this one process: a warm-up epoch each, then ``--rounds``
rounds alternating the recipes epoch by epoch, so that a slow spell of the shared machine hits both alike.

    python benchmarks/recipe_epoch.py --data-dir /data/gm-nsynth
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import List, Optional

import torch

from rnn_fast.nsynth.data import CLASSES, BatchLoader, load_split
from rnn_fast.nsynth.models import build_model
from rnn_fast.nsynth.recipe_study import BATCH_SIZE, FINAL, RESULTS
from rnn_fast.nsynth.recipes import RECIPES
from rnn_fast.nsynth.training.engine import train_one_epoch
from rnn_fast.nsynth.training.rng import seed_everything
from rnn_fast.nsynth.training.state import Learner

from _timing import environment


def time_epochs(data_dir: Path, rounds: int, threads: int, batch_size: int, model_name: str) -> dict:
    """Median seconds of one training epoch of each recipe over the development set's train split."""
    torch.set_num_threads(threads)
    split = load_split(data_dir / "rnn_fast_cache", "train")
    runs = {}
    for name in FINAL:
        recipe = RECIPES[name]
        seed_everything(0)
        model = build_model(model_name, **recipe.model_options(), backend="cpu")
        optimizer = recipe.optimizer(model.parameters())
        loader = BatchLoader(split, batch_size, seed=0)
        runs[name] = (Learner(model, optimizer, recipe.objective(split.labels, len(CLASSES)),
                              recipe.scheduler(optimizer, rounds + 1, len(loader)), recipe.weight_average(model)),
                      loader)
    seconds = {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, (learner, loader) in runs.items():
            loader.set_epoch(round_index)
            started = time.perf_counter()
            train_one_epoch(learner, loader, round_index, rounds, progress=False)
            if round_index:  # round 0 warms up
                seconds[name].append(time.perf_counter() - started)
    ratios = [robust / seed for seed, robust in zip(seconds["seed"], seconds["robust"])]
    return {"model": model_name, "batch_size": batch_size, "threads": threads, "train_examples": len(split),
            "steps_per_epoch": len(runs["seed"][1]), "seconds": seconds,
            "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
            "median_ratio_robust_to_seed": statistics.median(ratios), "ratios": ratios}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the development set (its rnn_fast_cache/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default: the study's")
    parser.add_argument("--model", default="lstm")
    parser.add_argument("--results", type=Path, default=RESULTS / "nsynth-dev-epoch.json")
    args = parser.parse_args(argv)
    record = time_epochs(args.data_dir, args.rounds, args.threads, args.batch_size, args.model)
    args.results.write_text(json.dumps({**environment(torch.device("cpu")), **record}, indent=1) + "\n")
    print(json.dumps(record["median_seconds"]), f"ratio {record['median_ratio_robust_to_seed']:.2f}")


if __name__ == "__main__":
    main()
