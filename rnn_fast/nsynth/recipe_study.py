"""The development-set study behind ``--recipe robust`` (docs/nsynth.md, "Choosing the robust recipe").

The development set is rendered from General MIDI soundfonts by ``../shared/tools/render_gm_nsynth.py`` (outside
this project, like real NSynth): train and valid from two soundfonts (valid = every 10th note of the *same*
instruments), test from a third. Its valid split says how well held-back notes of known instruments are
recognised, not unseen ones, and its test split may be looked at only once per final configuration. So the
choices are made on a proxy: the same train and valid notes, with the test split rendered from a fourth soundfont
(TimGM6mb) that neither training nor the real test uses. The real test soundfont is read only by ``final``.

  python ../shared/tools/render_gm_nsynth.py /data/gm-nsynth                                   # the set
  python ../shared/tools/render_gm_nsynth.py /data/gm-proxy --test timgm=/usr/share/sounds/sf2/TimGM6mb.sf2
  python -m rnn_fast.nsynth.recipe_study run --data-dir /data/gm-proxy NAME -- FLAGS   # one ablation run, seed 0
  python -m rnn_fast.nsynth.recipe_study final --data-dir /data/gm-nsynth     # both recipes x 3 seeds, test once
  python benchmarks/recipe_epoch.py --data-dir /data/gm-nsynth                # epoch seconds, alternating
  python -m rnn_fast.nsynth.recipe_study report                               # docs/nsynth-dev/report.md

Every run is ``examples/train_nsynth.py`` in a subprocess under ``nice -n 10`` with ``OMP_NUM_THREADS`` =
``$NSYNTH_DEV_THREADS`` (default 1: on a 2-core machine shared with other jobs, one thread wastes no time waiting
for a descheduled partner in every step's barriers); results are appended to ``benchmarks/results/nsynth-dev-*.json``
as each run ends (a rerun skips what is recorded). Thread counts change no accuracy beyond summation order.

The study works in a checkout of the repository, whose files it reads and writes (examples/, runs/,
benchmarks/results/, docs/nsynth-dev/), wherever it is started from.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .atomic import write_json

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
THREADS = int(os.environ.get("NSYNTH_DEV_THREADS", "1"))


# ------------------------------------------------------------------------------------------------ runs
def _run_dir(name: str, seed: int) -> Path:
    return REPO / "runs" / "nsynth-dev" / f"{name}-seed{seed}"


def train(name: str, data_dir: Path, flags: List[str], seed: int, results: Path, common: List[str]) -> dict:
    """One ``examples/train_nsynth.py`` run (skipped when ``results`` already holds it); its record is appended
    to ``results`` and returned."""
    recorded = load_results(results)
    key = f"{name}/seed{seed}"
    if key in recorded:
        return recorded[key]
    out = _run_dir(name, seed)
    if not (REPO / "examples" / "train_nsynth.py").is_file():
        raise SystemExit(f"{REPO} is no checkout of the repository: the study trains with examples/train_nsynth.py")
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
    recorded = load_results(results)
    recorded[key] = record
    results.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, recorded, indent=1)
    return record


def load_results(results: Path) -> dict:
    return json.loads(results.read_text()) if results.exists() else {}


def _line(record: dict, unseen_name: str) -> str:
    return (f"{record['name']:<28} seed {record['seed']}  val {100 * record['val_accuracy']:5.1f}%  "
            f"{unseen_name} {100 * record['test_accuracy']:5.1f}%  epoch {record['tested_epoch']}/"
            f"{record['epochs_run']}  {record['median_epoch_seconds']:.1f} s/epoch")


# ------------------------------------------------------------------------------------------------ the study
# Both recipes train for the same epochs at the same batch, in the ablation and in the final runs.
BATCH_SIZE = 64
COMMON = ["--device", "cpu", "--backend", "cpu", "--epochs", "20", "--batch-size", str(BATCH_SIZE)]
FINAL = {"seed": ["--recipe", "seed"], "robust": ["--recipe", "robust"]}
FINAL_SEEDS = (0, 1, 2)


def final(data_dir: Path, seeds: List[int], recipes: List[str], results: Path) -> None:
    for seed in seeds:  # seed by seed, so that a cut-off session leaves both recipes at equal counts
        for name in recipes:
            flags = FINAL[name]
            print(_line(train(f"final-{name}", data_dir, flags, seed, results, COMMON), "test"), flush=True)


def _mean_std(values: List[float]) -> str:
    """``mean ± std`` in percent (sample standard deviation; a single value has none)."""
    values = [100 * value for value in values]
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def final_runs(final_results: dict) -> Dict[str, List[dict]]:
    """Recipe -> its final runs, in seed order: the FINAL recipes first, then any superseded configuration
    (a record renamed ``final-<recipe>-<what differed>`` when the recipe changed after its final runs)."""
    names = [f"final-{name}" for name in FINAL]
    names += sorted({record["name"] for record in final_results.values()} - set(names))
    runs = {name[len("final-"):]: sorted((record for record in final_results.values() if record["name"] == name),
                                         key=lambda record: record["seed"]) for name in names}
    return {name: records for name, records in runs.items() if records}


def write_report(final_results: dict, ablation_results: dict, epoch_record: Optional[dict], out_dir: Path) -> Path:
    """``out_dir/report.md`` with both recipes' test results side by side (overall, per seed, per family and the
    confusion matrices summed over seeds) and the ablation table."""
    import numpy as np

    from .plots import plot_confusion_comparison

    runs = final_runs(final_results)
    classes = next(iter(runs.values()))[0]["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    confusions = {f"{name} recipe (test, {len(records)} seeds summed)":
                  np.sum([record["confusion_matrix"] for record in records], axis=0)
                  for name, records in runs.items() if name in FINAL}
    plot_confusion_comparison(confusions, classes, out_dir / "confusion_comparison.png")
    names = list(runs)
    lines = ["# NSynth development set: the seed and robust recipes side by side", "",
             "Written by `python -m rnn_fast.nsynth.recipe_study report` from "
             "`benchmarks/results/nsynth-dev-{final,ablation,epoch}.json`; how the set, the protocol and the "
             "recipes are defined: [docs/nsynth.md](../nsynth.md#the-development-set).", "",
             "## Both recipes", "",
             "| recipe | validation (held-back notes, seen instruments) | test (unseen soundfont) | tested epoch | "
             "median epoch seconds | command (seed 0) |", "|---|---|---|---|---|---|"]
    superseded = [name for name in runs if name not in FINAL]
    for name, records in runs.items():
        lines.append(f"| {name} | {_mean_std([r['val_accuracy'] for r in records])}% | "
                     f"{_mean_std([r['test_accuracy'] for r in records])}% | "
                     f"{', '.join(str(r['tested_epoch']) for r in records)} | "
                     f"{statistics.median(r['median_epoch_seconds'] for r in records):.1f} | "
                     f"`{records[0]['command']}` |")
    if superseded:
        lines += ["", f"{', '.join(superseded)}: an earlier final configuration of the recipe, superseded after its "
                  "final runs by a choice made on the proxy set alone (docs/nsynth.md, \"Choosing the robust "
                  "recipe\"); kept here because its test split was read."]
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
        lines += ["## Ablation on the proxy set (the choices were made on these numbers only)", "",
                  ablation_table(ablation_results), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def ablation_table(ablation_results: dict) -> str:
    """One row per recorded ablation run, in the order they ran, with its flags beyond the common ones."""
    lines = ["| run | flags | validation (seen instruments) | unseen proxy soundfont | tested epoch |",
             "|---|---|---|---|---|"]
    for record in ablation_results.values():
        lines.append(f"| {record['name']} (seed {record['seed']}) | `{' '.join(_flags(record['command']))}` | "
                     f"{100 * record['val_accuracy']:.1f}% | {100 * record['test_accuracy']:.1f}% | "
                     f"{record['tested_epoch']}/{record['epochs_run']} |")
    return "\n".join(lines)


def _flags(command: str) -> List[str]:
    """A run's recipe flags: what ``train`` put between the common flags and ``--seed``."""
    words = shlex.split(command)
    start = words.index("--data-dir") + 2 + len(COMMON)
    return words[start:len(words) - words[::-1].index("--seed") - 1]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ablation = commands.add_parser("run", help="one named ablation run on the proxy set: run NAME -- FLAGS")
    ablation.add_argument("name")
    ablation.add_argument("flags", nargs=argparse.REMAINDER)
    finals = commands.add_parser("final", help="both recipes over the seeds on the development set, test once")
    finals.add_argument("--recipes", nargs="+", choices=tuple(FINAL), default=list(FINAL))
    report = commands.add_parser("report", help="docs/nsynth-dev/report.md from the results files")
    report.add_argument("--out", type=Path, default=REPO / "docs" / "nsynth-dev")
    for command, default in ((ablation, "ablation"), (finals, "final")):
        command.add_argument("--data-dir", type=Path, required=True)
        command.add_argument("--results", type=Path, default=RESULTS / f"nsynth-dev-{default}.json")
    for command, seeds in ((ablation, [0]), (finals, list(FINAL_SEEDS))):
        command.add_argument("--seeds", type=int, nargs="+", default=seeds)
    args = parser.parse_args(argv)
    if args.command == "run":
        flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
        for seed in args.seeds:
            print(_line(train(args.name, args.data_dir, flags, seed, args.results, COMMON), "unseen"))
    elif args.command == "final":
        final(args.data_dir, args.seeds, args.recipes, args.results)
    elif args.command == "report":
        epoch = RESULTS / "nsynth-dev-epoch.json"
        print(write_report(load_results(RESULTS / "nsynth-dev-final.json"),
                           load_results(RESULTS / "nsynth-dev-ablation.json"),
                           json.loads(epoch.read_text()) if epoch.exists() else None, args.out))


if __name__ == "__main__":
    main()
