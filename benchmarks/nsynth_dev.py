#!/usr/bin/env python
"""The development-set study behind ``--recipe robust`` (docs/nsynth.md, "Choosing the robust recipe").

The development set is rendered from General MIDI soundfonts by ``../shared/tools/render_gm_nsynth.py`` (outside
this project, like real NSynth): train and valid from two soundfonts (valid = every 10th note of the *same*
instruments), test from a third. Its valid split therefore says how well held-back notes of known instruments are
recognised, not unseen ones, and the test split may be looked at only once per final configuration. So the
ablation runs on a layout derived from the training soundfonts alone (``layout``): train on one soundfont's
training notes, keep its valid notes as ``valid``, and put every note of the other training soundfont in that
layout's ``test`` split as the unseen-instrument score that choices are made on. The real test soundfont is
never read until ``final``.

  python benchmarks/nsynth_dev.py layout /data/gm-nsynth /data/gm-ablation --train fluid --unseen csound
  python benchmarks/nsynth_dev.py ablate --data-dir /data/gm-ablation      # every ABLATIONS entry, seed 0
  python benchmarks/nsynth_dev.py final --data-dir /data/gm-nsynth          # both recipes x 3 seeds, test once
  python benchmarks/nsynth_dev.py time --data-dir /data/gm-nsynth           # epoch seconds, alternating
  python benchmarks/nsynth_dev.py report                                    # docs/nsynth-dev/report.md

Every run is ``examples/train_nsynth.py`` in a subprocess under ``nice -n 10`` with ``OMP_NUM_THREADS`` =
``$NSYNTH_DEV_THREADS`` (default 1: on a 2-core machine shared with other jobs, one thread wastes no time waiting
for a descheduled partner in every step's barriers); results are appended to ``benchmarks/results/nsynth-dev-*.json``
as each run ends (a rerun skips what is recorded). Thread counts change no accuracy beyond summation order.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
THREADS = int(os.environ.get("NSYNTH_DEV_THREADS", "1"))
SPLIT_DIRS = {"train": "nsynth-train", "valid": "nsynth-valid", "test": "nsynth-test"}


# ------------------------------------------------------------------------------------------------ layout
def _instrument_source(instrument_str: str) -> str:
    """``guitar_acoustic_fluid024`` -> ``fluid``: the soundfont name the renderer puts before the GM program."""
    return re.fullmatch(r".*_([a-z]+)\d{3}", instrument_str).group(1)


def derive_layout(source: Path, target: Path, train: str, unseen: str) -> Dict[str, int]:
    """``target`` in the jsonwav layout: train / valid = ``train`` soundfont's train / valid notes, test = every
    train and valid note of the ``unseen`` soundfont. WAVs are symbolic links into ``source``."""
    chosen = {"train": [("train", train)], "valid": [("valid", train)], "test": [("train", unseen), ("valid", unseen)]}
    counts = {}
    for split, picks in chosen.items():
        examples = {}
        out_dir = target / SPLIT_DIRS[split]
        (out_dir / "audio").mkdir(parents=True, exist_ok=True)
        for from_split, soundfont in picks:
            from_dir = source / SPLIT_DIRS[from_split]
            listed = json.loads((from_dir / "examples.json").read_text())
            for key, example in listed.items():
                if _instrument_source(example["instrument_str"]) != soundfont:
                    continue
                examples[key] = example
                link = out_dir / "audio" / f"{key}.wav"
                if not link.exists():
                    link.symlink_to((from_dir / "audio" / f"{key}.wav").resolve())
        if not examples:
            raise SystemExit(f"no {split} notes: is {soundfont!r} a soundfont of {source}?")
        (out_dir / "examples.json").write_text(json.dumps(examples, indent=1))
        counts[split] = len(examples)
    return counts


# ------------------------------------------------------------------------------------------------ runs
def _run_dir(name: str, seed: int) -> Path:
    return REPO / "runs" / "nsynth-dev" / f"{name}-seed{seed}"


def train(name: str, data_dir: Path, flags: List[str], seed: int, results: Path, common: List[str]) -> dict:
    """One ``examples/train_nsynth.py`` run (skipped when ``results`` already holds it); its record is appended
    to ``results`` and returned."""
    recorded = _load(results)
    key = f"{name}/seed{seed}"
    if key in recorded:
        return recorded[key]
    out = _run_dir(name, seed)
    argv = ["examples/train_nsynth.py", "--data-dir", str(data_dir), *common, *flags, "--seed", str(seed),
            "--out", str(out), "--overwrite", "--no-progress", "--log-every", "1000000"]
    started = time.perf_counter()
    completed = subprocess.run(["nice", "-n", "10", sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)})
    if completed.returncode:
        raise SystemExit(f"{key} failed:\n{completed.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    tested = history[metrics["tested_epoch"] - 1]
    record = {
        "name": name, "seed": seed, "command": shlex.join(["python", *argv]),
        "val_accuracy": tested["val_accuracy"], "tested_epoch": metrics["tested_epoch"], "epochs_run": len(history),
        "test_accuracy": metrics["test_accuracy"], "per_class_accuracy": metrics["per_class_accuracy"],
        "confusion_matrix": metrics["confusion_matrix"], "classes": metrics["classes"],
        "train_accuracy": tested["train_accuracy"], "recipe": metrics["recipe"], "backend": metrics["backend"],
        "median_epoch_seconds": statistics.median(entry["epoch_seconds"] for entry in history),
        "wall_seconds": time.perf_counter() - started, "history": history,
    }
    recorded = _load(results)
    recorded[key] = record
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(recorded, indent=1) + "\n")
    return record


def _load(results: Path) -> dict:
    return json.loads(results.read_text()) if results.exists() else {}


def _line(record: dict, unseen_name: str) -> str:
    return (f"{record['name']:<28} seed {record['seed']}  val {100 * record['val_accuracy']:5.1f}%  "
            f"{unseen_name} {100 * record['test_accuracy']:5.1f}%  epoch {record['tested_epoch']}/"
            f"{record['epochs_run']}  {record['median_epoch_seconds']:.1f} s/epoch")


# ------------------------------------------------------------------------------------------------ the study
# Both recipes train for the same epochs at the same batch, in the ablation and in the final runs.
COMMON = ["--device", "cpu", "--backend", "cpu", "--epochs", "20", "--batch-size", "64"]
# Each piece of the robust recipe left out, and each piece it does not use added, on seed 0.
ABLATIONS = {
    "seed": ["--recipe", "seed"],
    "robust": ["--recipe", "robust"],
    "robust, raw frames (no log-mel)": ["--recipe", "robust", "--front-end", "frames"],
    "robust, no loudness normalisation": ["--recipe", "robust", "--no-loudness"],
    "robust, no onset delay": ["--recipe", "robust", "--max-delay", "0"],
    "robust, no noise": ["--recipe", "robust", "--noise-snr", "off"],
    "robust, no SpecAugment": ["--recipe", "robust", "--freq-masks", "0", "--time-masks", "0"],
    "robust, no mixup": ["--recipe", "robust", "--mixup", "0"],
    "robust, no dropout": ["--recipe", "robust", "--dropout", "0"],
    "robust, no weight decay": ["--recipe", "robust", "--weight-decay", "0"],
    "robust, constant lr": ["--recipe", "robust", "--schedule", "constant"],
    "robust, last epoch (no selection)": ["--recipe", "robust", "--no-select-best"],
    "robust + class-balanced loss": ["--recipe", "robust", "--class-balanced"],
    "robust + early stopping (patience 4)": ["--recipe", "robust", "--patience", "4"],
}
FINAL = {"seed": ["--recipe", "seed"], "robust": ["--recipe", "robust"]}
FINAL_SEEDS = (0, 1, 2)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "-", name.lower()).strip("-")


def ablate(data_dir: Path, names: List[str], seeds: List[int], results: Path) -> None:
    for name in names:
        for seed in seeds:
            print(_line(train(_slug(name), data_dir, ABLATIONS[name], seed, results, COMMON), "unseen"),
                  flush=True)


def final(data_dir: Path, seeds: List[int], results: Path) -> None:
    for seed in seeds:  # seed by seed, so that a cut-off session leaves both recipes at equal counts
        for name, flags in FINAL.items():
            print(_line(train(f"final-{name}", data_dir, flags, seed, results, COMMON), "test"), flush=True)


def time_epochs(data_dir: Path, rounds: int, threads: int, batch_size: int, model_name: str) -> dict:
    """Median seconds of one training epoch of each recipe over the development set's train split, measured
    like the training script's ``epoch_seconds`` (``train_one_epoch``: batches from the cache, the recipe's
    objective and schedule) in this one process, a warm-up epoch each, then ``rounds`` rounds alternating the
    recipes epoch by epoch so that a slow spell of the shared machine hits both alike."""
    import torch

    from rnn_fast import nsynth
    from rnn_fast.models import build_model
    from rnn_fast.recipes import RECIPES
    from rnn_fast.training import seed_everything, train_one_epoch

    torch.set_num_threads(threads)
    split = nsynth.load_split(data_dir / "rnn_fast_cache", "train")
    runs = {}
    for name in FINAL:
        recipe = RECIPES[name]
        seed_everything(0)
        model = build_model(model_name, **recipe.model_options(), backend="cpu")
        optimizer = recipe.optimizer(model.parameters())
        loader = nsynth.BatchLoader(split, batch_size, seed=0)
        runs[name] = (model, loader, optimizer, recipe.objective(split.labels, len(nsynth.CLASSES)),
                      recipe.scheduler(optimizer, rounds + 1, len(loader)))
    seconds = {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, (model, loader, optimizer, objective, scheduler) in runs.items():
            loader.set_epoch(round_index)
            started = time.perf_counter()
            train_one_epoch(model, loader, optimizer, round_index, rounds, progress=False, objective=objective,
                            scheduler=scheduler)
            if round_index:  # round 0 warms up
                seconds[name].append(time.perf_counter() - started)
    ratios = [robust / seed for seed, robust in zip(seconds["seed"], seconds["robust"])]
    return {"model": model_name, "batch_size": batch_size, "threads": threads, "train_examples": len(split),
            "steps_per_epoch": len(runs["seed"][1]), "seconds": seconds,
            "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
            "median_ratio_robust_to_seed": statistics.median(ratios), "ratios": ratios}


def _mean_std(values: List[float]) -> str:
    """``mean ± std`` in percent (sample standard deviation; a single value has none)."""
    values = [100 * value for value in values]
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def final_runs(final_results: dict) -> Dict[str, List[dict]]:
    """Recipe -> its final runs, in seed order."""
    runs = {name: sorted((record for record in final_results.values() if record["name"] == f"final-{name}"),
                         key=lambda record: record["seed"]) for name in FINAL}
    return {name: records for name, records in runs.items() if records}


def write_report(final_results: dict, ablation_results: dict, epoch_record: Optional[dict], out_dir: Path) -> Path:
    """``out_dir/report.md`` with both recipes' test results side by side (overall, per seed, per family and the
    confusion matrices summed over seeds) and the ablation table."""
    import numpy as np

    from rnn_fast.plots import plot_confusion_comparison

    runs = final_runs(final_results)
    classes = next(iter(runs.values()))[0]["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    confusions = {f"{name} recipe (test, {len(records)} seeds summed)":
                  np.sum([record["confusion_matrix"] for record in records], axis=0) for name, records in runs.items()}
    plot_confusion_comparison(confusions, classes, out_dir / "confusion_comparison.png")
    names = list(runs)
    lines = ["# NSynth development set: the seed and robust recipes side by side", "",
             "Written by `python benchmarks/nsynth_dev.py report` from "
             "`benchmarks/results/nsynth-dev-{final,ablation,epoch}.json`; how the set, the protocol and the "
             "recipes are defined: [docs/nsynth.md](../nsynth.md#the-development-set).", "",
             "## Both recipes", "",
             "| recipe | validation (held-back notes, seen instruments) | test (unseen soundfont) | tested epoch | "
             "median epoch seconds | command (seed 0) |", "|---|---|---|---|---|---|"]
    for name, records in runs.items():
        lines.append(f"| {name} | {_mean_std([r['val_accuracy'] for r in records])}% | "
                     f"{_mean_std([r['test_accuracy'] for r in records])}% | "
                     f"{', '.join(str(r['tested_epoch']) for r in records)} | "
                     f"{statistics.median(r['median_epoch_seconds'] for r in records):.1f} | "
                     f"`{records[0]['command']}` |")
    lines += ["", f"Mean ± sample standard deviation over seeds {', '.join(str(r['seed']) for r in runs[names[0]])}.",
              "", "### Per seed", "", "| recipe | seed | validation | test |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['seed']} | {100 * r['val_accuracy']:.1f}% | {100 * r['test_accuracy']:.1f}% |"
              for name, records in runs.items() for r in records]
    counts = np.sum(runs[names[0]][0]["confusion_matrix"], axis=1)
    lines += ["", "## Per family (test accuracy, mean ± std over seeds)", "",
              "| family | test notes | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for index, family in enumerate(classes):
        cells = [_mean_std([r["per_class_accuracy"][family] for r in runs[name]]) + "%" for name in names]
        lines.append(f"| {family} | {counts[index]} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrices (test, rows = true family, row-normalised)", "",
              "![confusion matrices](confusion_comparison.png)", ""]
    if epoch_record is not None:
        seconds = epoch_record["median_seconds"]
        lines += ["## Epoch cost", "",
                  f"`{epoch_record['command']}` ({epoch_record['date']}): {epoch_record['train_examples']} training "
                  f"notes, batch {epoch_record['batch_size']} ({epoch_record['steps_per_epoch']} steps), "
                  f"{epoch_record['threads']} threads, {len(epoch_record['ratios'])} rounds alternating the recipes: "
                  f"seed {seconds['seed']:.2f} s, robust {seconds['robust']:.2f} s per epoch (medians), "
                  f"robust / seed = **{epoch_record['median_ratio_robust_to_seed']:.2f}** "
                  f"(median of the per-round ratios, {min(epoch_record['ratios']):.2f} to "
                  f"{max(epoch_record['ratios']):.2f}).", ""]
    if ablation_results:
        lines += ["## Ablation (seed 0, choices made on these numbers only)", "", ablation_table(ablation_results), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def ablation_table(ablation_results: dict) -> str:
    lines = ["| run | validation (seen) | unseen proxy | tested epoch | flags |", "|---|---|---|---|---|"]
    for name, flags in ABLATIONS.items():
        for record in (r for r in ablation_results.values() if r["name"] == _slug(name)):
            lines.append(f"| {name} | {100 * record['val_accuracy']:.1f}% | {100 * record['test_accuracy']:.1f}% | "
                         f"{record['tested_epoch']}/{record['epochs_run']} | `{shlex.join(flags)}` |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    layout = commands.add_parser("layout", help="derive the ablation layout from the rendered development set")
    layout.add_argument("source", type=Path)
    layout.add_argument("target", type=Path)
    layout.add_argument("--train", default="fluid", help="soundfont to train on")
    layout.add_argument("--unseen", default="csound", help="soundfont whose notes score the choices")
    explore = commands.add_parser("run", help="one named exploratory run: run NAME -- FLAGS")
    explore.add_argument("name")
    explore.add_argument("flags", nargs=argparse.REMAINDER)
    ablation = commands.add_parser("ablate", help="the ABLATIONS runs on the ablation layout")
    ablation.add_argument("--only", nargs="+", choices=tuple(ABLATIONS), default=list(ABLATIONS), metavar="NAME")
    finals = commands.add_parser("final", help="both recipes over the seeds on the development set, test once")
    timing = commands.add_parser("time", help="epoch seconds of both recipes, alternating in one process")
    timing.add_argument("--rounds", type=int, default=5)
    timing.add_argument("--threads", type=int, default=2)
    timing.add_argument("--batch-size", type=int, default=int(COMMON[COMMON.index("--batch-size") + 1]))
    timing.add_argument("--model", default="lstm")
    report = commands.add_parser("report", help="docs/nsynth-dev/report.md from the results files")
    report.add_argument("--out", type=Path, default=REPO / "docs" / "nsynth-dev")
    for command, default in ((explore, "explore"), (ablation, "ablation"), (finals, "final"), (timing, "epoch")):
        command.add_argument("--data-dir", type=Path, required=True)
        command.add_argument("--results", type=Path, default=RESULTS / f"nsynth-dev-{default}.json")
    for command, seeds in ((explore, [0]), (ablation, [0]), (finals, list(FINAL_SEEDS))):
        command.add_argument("--seeds", type=int, nargs="+", default=seeds)
    args = parser.parse_args(argv)
    if args.command == "layout":
        print(derive_layout(args.source, args.target, args.train, args.unseen))
    elif args.command == "run":
        flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
        for seed in args.seeds:
            print(_line(train(args.name, args.data_dir, flags, seed, args.results, COMMON), "unseen"))
    elif args.command == "ablate":
        ablate(args.data_dir, args.only, args.seeds, args.results)
    elif args.command == "final":
        final(args.data_dir, args.seeds, args.results)
    elif args.command == "time":
        record = time_epochs(args.data_dir, args.rounds, args.threads, args.batch_size, args.model)
        args.results.write_text(json.dumps({"command": shlex.join(["python", *sys.argv]),
                                            "date": time.strftime("%Y-%m-%d"), **record}, indent=1) + "\n")
        print(json.dumps(record["median_seconds"]), f"ratio {record['median_ratio_robust_to_seed']:.2f}")
    elif args.command == "report":
        epoch = RESULTS / "nsynth-dev-epoch.json"
        print(write_report(_load(RESULTS / "nsynth-dev-final.json"), _load(RESULTS / "nsynth-dev-ablation.json"),
                           json.loads(epoch.read_text()) if epoch.exists() else None, args.out))


if __name__ == "__main__":
    main()
