"""Figures and ``report.md`` of an NSynth training run (matplotlib, Agg backend: no display needed).

Every function takes plain arrays and writes one PNG; :func:`write_figures` draws them all for a run and
:func:`write_report` writes the markdown page that shows them.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import waveform_to_frames  # noqa: E402

FIGURES = {
    "loss": ("loss_curves.png", "Training and validation loss per epoch"),
    "accuracy": ("accuracy_curves.png", "Training and validation accuracy per epoch"),
    "confusion": ("confusion_matrix.png", "Test confusion matrix, counts and row-normalised (rows = true family)"),
    "per_class": ("per_class_accuracy.png", "Test accuracy of each family"),
    "waveforms": ("waveform_examples.png", "First second of one test example per source for two families"),
    "frames": ("extreme_frames.png", "The 100 x 160 input frames of the most confident test prediction and of "
                                     "the one nearest the decision boundary"),
}


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _curves(history: List[dict], keys: Sequence[str], labels: Sequence[str], ylabel: str, path: Path,
            scale: float = 1.0) -> None:
    epochs = [entry["epoch"] for entry in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in zip(keys, labels):
        axis.plot(epochs, [scale * entry[key] for entry in history], marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def plot_loss_curves(history: List[dict], path: Path) -> None:
    _curves(history, ("train_loss", "val_loss"), ("train", "validation"), "cross-entropy loss", path)


def plot_accuracy_curves(history: List[dict], path: Path) -> None:
    _curves(history, ("train_accuracy", "val_accuracy"), ("train", "validation"), "accuracy (%)", path, 100.0)


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its total (per-class recall on the diagonal); an empty row stays 0."""
    confusion = np.asarray(confusion)
    return confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)


def _matrix_panel(figure, axis, matrix: np.ndarray, classes: Sequence[str], title: str, fmt: str,
                  vmax: Optional[float] = None) -> None:
    image = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    threshold = (matrix.max() if vmax is None else vmax) / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, format(value, fmt), ha="center", va="center", fontsize=7,
                  color="white" if value > threshold else "black")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted family")
    axis.set_ylabel("true family")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Counts on the left, each row divided by its total (per-class recall on the diagonal) on the right."""
    confusion = np.asarray(confusion)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    _matrix_panel(figure, axes[0], confusion, classes, "counts", "d")
    _matrix_panel(figure, axes[1], row_normalised(confusion), classes, "row-normalised", ".2f")
    _save(figure, path)


def plot_confusion_comparison(confusions: Dict[str, np.ndarray], classes: Sequence[str], path: Path) -> None:
    """One row-normalised confusion matrix per entry of ``confusions`` (title -> counts), side by side on one
    colour scale."""
    figure, axes = plt.subplots(1, len(confusions), figsize=(6.5 * len(confusions), 5.8), squeeze=False)
    for axis, (title, confusion) in zip(axes[0], confusions.items()):
        _matrix_panel(figure, axis, row_normalised(confusion), classes, title, ".2f", vmax=1.0)
    _save(figure, path)


def plot_per_class_accuracy(per_class: Dict[str, Optional[float]], path: Path,
                            overall: Optional[float] = None) -> None:
    """Bars of each family's test accuracy; a family absent from the test split gets no bar."""
    names = list(per_class)
    values = [np.nan if per_class[name] is None else 100 * per_class[name] for name in names]
    figure, axis = plt.subplots(figsize=(7, 4))
    bars = axis.bar(names, values, color="tab:blue")
    axis.bar_label(bars, fmt="%.0f", fontsize=8)
    if overall is not None:
        axis.axhline(100 * overall, color="tab:red", linestyle="--", label=f"overall {100 * overall:.1f}%")
        axis.legend()
    axis.set_ylim(0, 105)
    axis.set_ylabel("test accuracy (%)")
    axis.tick_params(axis="x", rotation=45)
    _save(figure, path)


def pick_example_families(labels: np.ndarray, sources: np.ndarray, count: int = 2) -> List[int]:
    """The ``count`` classes whose examples cover the most sources (ties: the lower class index)."""
    coverage = {label: len(np.unique(sources[labels == label])) for label in np.unique(labels)}
    ranked = sorted(coverage, key=lambda label: (-coverage[label], label))
    return [int(label) for label in ranked[:count]]


def plot_waveform_examples(audio: np.ndarray, labels: np.ndarray, sources: np.ndarray, classes: Sequence[str],
                           source_names: Sequence[str], path: Path, sample_rate: int = 16000) -> None:
    """A grid of sources (rows) x two families (columns): the first example of each pair in split order."""
    families = pick_example_families(labels, sources)
    figure, axes = plt.subplots(len(source_names), len(families), figsize=(11, 6.5), sharex=True, sharey=True,
                                squeeze=False)
    for row, source_name in enumerate(source_names):
        for column, family in enumerate(families):
            axis = axes[row, column]
            matches = np.flatnonzero((labels == family) & (sources == row))
            axis.set_title(f"{classes[family]} / {source_name}", fontsize=9)
            if len(matches) == 0:
                axis.text(0.5, 0.5, "no example in the test split", ha="center", va="center",
                          transform=axis.transAxes)
                continue
            waveform = np.asarray(audio[matches[0]], dtype=np.float32) / 32768.0
            axis.plot(np.arange(len(waveform)) / sample_rate, waveform, linewidth=0.4)
    for axis in axes[-1]:
        axis.set_xlabel("time (s)")
    for axis in axes[:, 0]:
        axis.set_ylabel("amplitude")
    _save(figure, path)


def extreme_examples(probabilities: np.ndarray) -> Dict[str, int]:
    """Indices of the most confident prediction (highest top probability) and of the one nearest the decision
    boundary (smallest gap between the two highest probabilities)."""
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return {"most confident": int(np.argmax(top_two[:, 1])),
            "nearest the decision boundary": int(np.argmin(top_two[:, 1] - top_two[:, 0]))}


def plot_extreme_frames(audio: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                        path: Path) -> None:
    """For each of :func:`extreme_examples`: the ``[100, 160]`` frames the model reads, as an image (one row
    per LSTM time step), and the predicted distribution over families."""
    picks = extreme_examples(probabilities)
    figure, axes = plt.subplots(len(picks), 2, figsize=(12, 4.2 * len(picks)), gridspec_kw={"width_ratios": [3, 2]},
                                squeeze=False)
    for row, (title, index) in enumerate(picks.items()):
        image_axis, bar_axis = axes[row]
        example = waveform_to_frames(np.asarray(audio[index:index + 1]))[0].numpy()
        limit = max(float(np.abs(example).max()), 1e-6)
        image = image_axis.imshow(example, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                                  interpolation="nearest")
        image_axis.set_xlabel("sample within frame")
        image_axis.set_ylabel("frame (time step)")
        predicted = int(np.argmax(probabilities[index]))
        image_axis.set_title(f"{title}: test example {index}, true {classes[labels[index]]}, "
                             f"predicted {classes[predicted]}", fontsize=9)
        figure.colorbar(image, ax=image_axis, fraction=0.046)
        colours = ["tab:green" if k == labels[index] else "tab:gray" for k in range(len(classes))]
        bar_axis.bar(classes, probabilities[index], color=colours)
        bar_axis.set_ylim(0, 1)
        bar_axis.set_ylabel("probability (green = true family)")
        bar_axis.tick_params(axis="x", rotation=45)
    _save(figure, path)


def write_figures(run_dir: Path, metrics: dict, test_audio: np.ndarray, test_labels: np.ndarray,
                  test_sources: np.ndarray, probabilities: np.ndarray, source_names: Sequence[str]) -> Dict[str, str]:
    """Every figure of :data:`FIGURES` into ``run_dir``; returns figure key -> file name."""
    run_dir = Path(run_dir)
    classes = metrics["classes"]
    paths = {key: run_dir / name for key, (name, _) in FIGURES.items()}
    plot_loss_curves(metrics["history"], paths["loss"])
    plot_accuracy_curves(metrics["history"], paths["accuracy"])
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), classes, paths["confusion"])
    plot_per_class_accuracy(metrics["per_class_accuracy"], paths["per_class"], metrics["test_accuracy"])
    plot_waveform_examples(test_audio, test_labels, test_sources, classes, source_names, paths["waveforms"])
    plot_extreme_frames(test_audio, probabilities, test_labels, classes, paths["frames"])
    return {key: path.name for key, path in paths.items()}


def write_report(run_dir: Path, metrics: dict, figures: Dict[str, str], command: str) -> Path:
    """``run_dir/report.md``: the run's numbers, per-family accuracy, history table and every figure."""
    history = metrics["history"]
    lines = [
        f"# NSynth instrument families: {metrics['model']}",
        "",
        f"Command: `{command}`",
        "",
        *([f"Recipe: {metrics['recipe']['name']}; tested the weights of epoch {metrics['tested_epoch']}.", ""]
          if metrics.get("recipe") else []),
        "| model | LSTM backend | test accuracy | train / valid / test examples | epochs | mean epoch time |",
        "|---|---|---|---|---|---|",
        f"| {metrics['model']} | {metrics['backend']} | {100 * metrics['test_accuracy']:.2f}% | "
        f"{metrics['n_train']} / {metrics['n_valid']} / {metrics['n_test']} | {len(history)} | "
        f"{np.mean([entry['epoch_seconds'] for entry in history]):.1f} s |",
        "",
        "## Per-family test accuracy",
        "",
        "| family | accuracy | test examples |",
        "|---|---|---|",
    ]
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        value = metrics["per_class_accuracy"][name]
        lines.append(f"| {name} | {'-' if value is None else f'{100 * value:.1f}%'} | {sum(row)} |")
    lines += ["", "## History", "",
              "| epoch | train loss | train acc | val loss | val acc | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['epoch']} | {e['train_loss']:.4f} | {100 * e['train_accuracy']:.2f}% | {e['val_loss']:.4f} | "
              f"{100 * e['val_accuracy']:.2f}% | {e['epoch_seconds']:.1f} |" for e in history]
    lines += ["", "## Figures", ""]
    for key, name in figures.items():
        lines += [f"### {FIGURES[key][1]}", "", f"![{key}]({name})", ""]
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path
