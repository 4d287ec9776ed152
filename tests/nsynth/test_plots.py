"""The choices behind the run figures (which examples, which families) and the report's content."""
import numpy as np

import rnn_fast.nsynth.plots
from rnn_fast.nsynth.plots import (FIGURES, extreme_examples, pick_example_families, plot_confusion_comparison,
                            plot_per_class_accuracy, row_normalised, write_report)


def test_extreme_examples_pick_the_top_probability_and_the_smallest_top_two_gap():
    probabilities = np.array([
        [0.50, 0.30, 0.20],
        [0.05, 0.90, 0.05],  # most confident
        [0.40, 0.15, 0.45],  # gap 0.05: nearest the boundary
        [0.34, 0.26, 0.40],  # gap 0.06
    ])
    assert extreme_examples(probabilities) == {"most confident": 1, "nearest the decision boundary": 2}


def test_example_families_cover_the_most_sources():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    sources = np.array([0, 0, 0, 1, 2, 0, 1, 2, 1, 0])
    assert pick_example_families(labels, sources) == [1, 3]


def test_per_class_bars_leave_out_absent_families(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(rnn_fast.nsynth.plots, "_save", lambda figure, path: saved.update(figure=figure, path=path))
    plot_per_class_accuracy({"bass": 0.5, "brass": None, "flute": 1.0}, tmp_path / "bars.png", overall=0.75)
    (axis,) = saved["figure"].axes
    bars = {tick.get_text(): bar.get_height() for tick, bar in zip(axis.get_xticklabels(), axis.patches)}
    assert bars["bass"] == 50 and bars["flute"] == 100
    assert not np.isfinite(bars["brass"]), "an absent family must get no bar"
    labels = [text.get_text() for text in axis.texts if text.get_text()]
    assert labels == ["50", "100"], f"bar labels {labels}: an absent family must get no label either"


def test_report_lists_numbers_and_links_every_figure(tmp_path):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.2 * e, "val_loss": 2.1 / e,
                "val_accuracy": 0.19 * e, "epoch_seconds": 10.0 + e} for e in (1, 2)]
    metrics = {"model": "blstm", "backend": "cpu", "test_accuracy": 0.4567, "classes": ["bass", "brass"],
               "per_class_accuracy": {"bass": 0.75, "brass": None}, "confusion_matrix": [[3, 1], [0, 0]],
               "n_train": 100, "n_valid": 10, "n_test": 4, "history": history}
    figures = {key: name for key, (name, _) in FIGURES.items()}
    report = write_report(tmp_path, metrics, figures, "python examples/train_nsynth.py --model blstm").read_text()
    assert "| blstm | cpu | 45.67% | 100 / 10 / 4 | 2 | 11.5 s |" in report
    assert "| bass | 75.0% | 4 |" in report and "| brass | - | 0 |" in report
    assert "| 2 | 1.0000 | 40.00% | 1.0500 | 38.00% | 12.0 |" in report
    for key, (name, caption) in FIGURES.items():
        assert f"### {caption}\n\n![{key}]({name})" in report


def test_row_normalised_confusion_gives_each_rows_recall():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    np.testing.assert_allclose(row_normalised(confusion), [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])


def test_confusion_comparison_draws_one_row_normalised_panel_per_run(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(rnn_fast.nsynth.plots, "_save", lambda figure, path: saved.update(figure=figure, path=path))
    classes = ["bass", "brass", "flute"]
    confusions = {"seed": np.array([[3, 1, 0], [0, 2, 2], [1, 0, 5]]), "robust": np.eye(3, dtype=int) * 4}
    plot_confusion_comparison(confusions, classes, tmp_path / "both.png")
    panels = [axis for axis in saved["figure"].axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["seed", "robust"]
    for axis, confusion in zip(panels, confusions.values()):
        (image,) = axis.get_images()
        np.testing.assert_allclose(image.get_array(), row_normalised(confusion))
        assert image.get_clim() == (0, 1.0)  # one colour scale for every panel
        assert [tick.get_text() for tick in axis.get_yticklabels()] == classes
