#!/usr/bin/env python
"""The README's per-epoch table (markdown) and bar chart (PNG) from a ``benchmarks/epoch.py`` results file.

    python benchmarks/report.py benchmarks/results/<device>-epoch-<date>.json

writes ``<results>.md`` and ``<results>.png`` next to the JSON (or where ``--md`` / ``--png`` say) and prints
the markdown. The seed report's per-epoch times (an older GPU, data loading included) stand beside ours.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from epoch import SEED_ITERS  # noqa: E402  (benchmarks/, this script's folder)

# The seed report's epochs: 2:03, 3:02 and 6:26 on an older GPU, data loading included.
SEED_REPORT_SECONDS = {"lstm": 123.0, "blstm": 182.0, "cnn": 386.0}
MODEL_LABELS = {"lstm": "LSTM", "blstm": "BLSTM", "cnn": "CNN (M5)"}
TORCH_BACKEND_LABELS = {"cuda": "torch (cuDNN)", "cpu": "torch (ATen)"}


def load_epoch_results(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    if "epoch" not in results:
        raise ValueError(f"{path} holds no 'epoch' key: not a benchmarks/epoch.py results file")
    return results


def _device_type(results: dict) -> str:
    return results["config"]["device"].split(":")[0]


def backend_label(record: dict, device_type: str) -> str:
    if record["backend"] == "torch":
        return TORCH_BACKEND_LABELS.get(device_type, "torch")
    return record["backend"]


def seed_epoch_seconds(record: dict) -> float:
    """The record's time for the seed's 369 iterations (its own epoch time when it ran that many)."""
    return record["ms_per_iter"] * SEED_ITERS / 1000


def _speedup_header(device_type: str) -> str:
    return "speedup vs cuDNN" if device_type == "cuda" else "speedup vs torch"


def _optional(value: Optional[float], form: str) -> str:
    return "—" if value is None else form.format(value)


def _columns(results: dict) -> List[Tuple[str, Callable[[dict], str]]]:
    config, device_type = results["config"], _device_type(results)
    columns = [
        ("Model", lambda r: MODEL_LABELS.get(r["model"], r["model"])),
        ("Backend", lambda r: backend_label(r, device_type)),
        ("s / epoch [p20, p80]",
         lambda r: f"{r['seconds_per_epoch']:.3f} [{r['seconds_p20']:.3f}, {r['seconds_p80']:.3f}]"),
        ("ms / iter", lambda r: f"{r['ms_per_iter']:.2f}"),
    ]
    if config["iters"] != SEED_ITERS:
        columns.append((f"s / {SEED_ITERS}-iter epoch", lambda r: f"{seed_epoch_seconds(r):.1f}"))
    columns += [
        (_speedup_header(device_type), lambda r: _optional(r["speedup_vs_cudnn"], "{:.2f}×")),
        ("data path", lambda r: f"{100 * r['data_share']:.1f}%"),
        ("peak MiB", lambda r: f"{r['peak_mem_mb']:.0f}"),
        ("seed report s / epoch", lambda r: _optional(SEED_REPORT_SECONDS.get(r["model"]), "{:.0f}")),
    ]
    return columns


def device_line(results: dict) -> str:
    parts = [f"device: {results['device']}", f"torch {results['torch']}"]
    if results.get("cuda"):
        parts.append(f"CUDA {results['cuda']}")
    if results.get("triton"):
        parts.append(f"triton {results['triton']}")
    parts.append(results["date"])
    if "load_average" in results:
        before, after = (results["load_average"][key][0] for key in ("before", "after"))
        parts.append(f"1-min load average {before:.1f} before, {after:.1f} after")
    return " · ".join(parts)


def markdown(results: dict) -> str:
    config = results["config"]
    columns = _columns(results)
    lines = [
        f"**Per-epoch training time**, {device_line(results)}",
        "",
        f"An epoch is {config['iters']} iterations of batch {config['batch_size']} over "
        f"[{config['seq_len']}, {config['input_size']}] frames, hidden size {config['hidden']}, "
        f"{config['layers']} layers, Adam and cross-entropy, the data resident on the device. Median of "
        f"{config['epochs']} epochs after one warm-up; speedup is relative to the {results['baseline']}; "
        "data path is the share of the epoch spent gathering batches; peak memory excludes the resident dataset. "
        "The seed report's epochs ran on an older GPU with data loading included.",
        "",
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---" if index < 2 else "---:" for index in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(record) for _, cell in columns) + " |" for record in results["epoch"]]
    if config["iters"] != SEED_ITERS:
        lines += ["", f"This run's epochs are shortened to {config['iters']} iterations; the "
                      f"{SEED_ITERS}-iteration column scales ms / iter to the seed's epoch."]
    for skipped in results.get("skipped", []):
        lines += ["", f"Not timed: {skipped['model']}/{skipped['backend']}: {skipped['reason']}"]
    lines += ["", "```", results["command"], "```"]
    return "\n".join(lines) + "\n"


def _bar_value_label(seconds: float) -> str:
    return f"{seconds:,.0f}" if seconds >= 100 else f"{seconds:.3g}"


def bar_chart(results: dict, path: Path) -> None:
    """Seconds per seed-length epoch, one group of bars per model: each backend, then the seed report."""
    device_type = _device_type(results)
    groups = {}
    for record in results["epoch"]:
        groups.setdefault(record["model"], []).append((backend_label(record, device_type),
                                                       seed_epoch_seconds(record)))
    for model, bars in groups.items():
        if model in SEED_REPORT_SECONDS:
            bars.append(("seed report", SEED_REPORT_SECONDS[model]))
    series = list(dict.fromkeys(name for bars in groups.values() for name, _ in bars))
    colors = dict(zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    width = 0.8 / max(len(bars) for bars in groups.values())
    figure, axes = plt.subplots(figsize=(1.2 + 2.2 * len(groups), 4.2))
    for center, bars in enumerate(groups.values()):
        for index, (name, seconds) in enumerate(bars):
            position = center + (index - (len(bars) - 1) / 2) * width
            drawn = axes.bar(position, seconds, width, color=colors[name], label=name)
            axes.bar_label(drawn, labels=[_bar_value_label(seconds)], fontsize=7)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    axes.set_xticks(range(len(groups)), [MODEL_LABELS.get(model, model) for model in groups])
    axes.set_yscale("log")
    axes.set_ylabel(f"seconds per {SEED_ITERS}-iteration epoch")
    config = results["config"]
    scaled = "" if config["iters"] == SEED_ITERS else f"; {config['iters']}-iteration epochs scaled to {SEED_ITERS}"
    axes.set_title(f"{results['device']}, {results['date']}, batch {config['batch_size']}{scaled}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a benchmarks/epoch.py results JSON")
    parser.add_argument("--md", type=Path, help="markdown output (default: the results path with .md)")
    parser.add_argument("--png", type=Path, help="bar chart output (default: the results path with .png)")
    args = parser.parse_args(argv)
    results = load_epoch_results(args.results)
    table = markdown(results)
    md_path = args.md or args.results.with_suffix(".md")
    png_path = args.png or args.results.with_suffix(".png")
    md_path.write_text(table)
    bar_chart(results, png_path)
    print(table)
    print(f"wrote {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
