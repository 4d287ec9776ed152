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

Every run is ``examples/train_nsynth.py`` in a subprocess under ``nice -n 10``; results are appended to
``benchmarks/results/nsynth-dev-*.json`` as each run ends (a rerun skips what is recorded).
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
                               env={**os.environ, "PYTHONPATH": str(REPO)})
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    layout = commands.add_parser("layout", help="derive the ablation layout from the rendered development set")
    layout.add_argument("source", type=Path)
    layout.add_argument("target", type=Path)
    layout.add_argument("--train", default="fluid", help="soundfont to train on")
    layout.add_argument("--unseen", default="csound", help="soundfont whose notes score the choices")
    explore = commands.add_parser("run", help="one named run on the ablation layout: run NAME -- FLAGS")
    explore.add_argument("name")
    explore.add_argument("flags", nargs=argparse.REMAINDER)
    explore.add_argument("--data-dir", type=Path, required=True)
    explore.add_argument("--seed", type=int, default=0)
    explore.add_argument("--results", type=Path, default=RESULTS / "nsynth-dev-explore.json")
    args = parser.parse_args(argv)
    if args.command == "layout":
        print(derive_layout(args.source, args.target, args.train, args.unseen))
    elif args.command == "run":
        flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
        print(_line(train(args.name, args.data_dir, flags, args.seed, args.results, ["--device", "cpu",
                                                                                     "--backend", "cpu"]),
                    "unseen"))


if __name__ == "__main__":
    main()
