"""The command lines (rnn_fast.nsynth.cli behind examples/train_nsynth.py and examples/predict.py), end to end on a
tiny synthetic NSynth: training, evaluation, checkpoints, resume, torchrun, prediction, and the recipe flags.

One short run (module fixture) is the reference that the other end-to-end tests compare against: a run killed
with SIGKILL and resumed must reproduce its metrics.json exactly, and a two-process torchrun (gloo) run with the
same global batch must reproduce its training curve.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import recall_score

import rnn_fast
from rnn_fast.nsynth import cli
from rnn_fast.nsynth.data import (CLASSES, CLIP_SAMPLES, SAMPLE_RATE, generate_synthetic, load_split, prepare,
                                  waveform_to_frames, write_wav)
from rnn_fast.nsynth.models import build_model
from rnn_fast.nsynth.plots import FIGURES
from rnn_fast.nsynth.recipes import RECIPES, Recipe
from rnn_fast.nsynth.training import engine
from rnn_fast.nsynth.training.checkpoint import load_checkpoint, load_classifier
from rnn_fast.ops.lstm.triton import MAX_HIDDEN

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EPOCHS = 4
METRICS_KEYS = {"model", "backend", "recipe", "tested_epoch", "test_accuracy", "per_class_accuracy", "confusion_matrix",
                "classes", "n_train", "n_valid", "n_test", "history", "precision"}
HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """600 training notes (two instruments per family and source, synth_lead dropped), 60 validation and 60 test
    notes from unseen instruments."""
    base = tmp_path_factory.mktemp("nsynth")
    root = generate_synthetic(base / "root", n_train=660, n_valid=60, n_test=60, seed=0, progress=False)
    cache = prepare(root, base / "cache", workers=1, progress=False)
    return root, cache


def run_args(dataset, out: Path, epochs: int = EPOCHS):
    """A small configuration that still learns within a few seconds: hidden 32, global batch 32, lr 0.03."""
    root, cache = dataset
    return ["--data-dir", str(root), "--cache-dir", str(cache), "--out", str(out), "--epochs", str(epochs),
            "--hidden", "32", "--batch-size", "32", "--lr", "0.03", "--eval-batch-size", "64", "--log-every", "1",
            "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """``(run directory, metrics, console output)`` of one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        metrics = cli.train_main(run_args(dataset, out))
    return out, metrics, console.getvalue()


def first_epoch_step_losses(console: str) -> dict:
    """Step -> running mean training loss, from the ``Epoch [1/E], Step [s/S], Loss: x`` lines."""
    return {int(step): float(loss) for step, loss in
            re.findall(r"^Epoch \[1/\d+\], Step \[(\d+)/\d+\], Loss: ([\d.]+)", console, re.MULTILINE)}


def subprocess_env() -> dict:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def without_timings(metrics: dict) -> dict:
    return {**metrics, "history": [{k: v for k, v in entry.items() if k != "epoch_seconds"}
                                   for entry in metrics["history"]]}


# ----------------------------------------------------------------------------------------------- end to end
def test_training_learns_well_above_chance(reference_run):
    _, metrics, _ = reference_run
    history = metrics["history"]
    assert metrics["test_accuracy"] >= 0.25, metrics  # chance is 0.10
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["train_accuracy"] >= 0.35


def test_metrics_json_has_exactly_the_documented_content(reference_run, dataset):
    out, metrics, _ = reference_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics) == METRICS_KEYS
    assert metrics["model"] == "lstm" and metrics["classes"] == list(CLASSES)
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (600, 60, 60)
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert all(set(entry) == HISTORY_KEYS for entry in metrics["history"])
    assert list(metrics["per_class_accuracy"]) == list(CLASSES)


def test_metrics_json_matches_scikit_learn_on_the_checkpoint(reference_run, dataset):
    out, metrics, _ = reference_run
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    model = build_model(**checkpoint["config"]["model_config"])
    model.load_state_dict(checkpoint["model"])
    test = load_split(dataset[1], "test")
    with torch.no_grad():
        predictions = model.eval()(waveform_to_frames(np.asarray(test.audio))).argmax(1).numpy()
    labels = list(range(len(CLASSES)))
    confusion = sklearn_confusion_matrix(test.labels, predictions, labels=labels)
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(test.labels, predictions), abs=1e-12)
    recalls = recall_score(test.labels, predictions, labels=labels, average=None, zero_division=np.nan)
    assert list(metrics["per_class_accuracy"].values()) == pytest.approx(recalls.tolist(), abs=1e-12)


def test_figures_and_report_are_written(reference_run):
    out, metrics, _ = reference_run
    report = (out / "report.md").read_text()
    for name, _ in FIGURES.values():
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"
        assert f"]({name})" in report
    assert f"{100 * metrics['test_accuracy']:.2f}%" in report


def test_resume_after_kill_reproduces_the_uninterrupted_run(reference_run, dataset, tmp_path):
    out = tmp_path / "killed"
    checkpoint = out / cli.CHECKPOINT
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "train_nsynth.py"), *run_args(dataset, out)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"training was not killed mid-run:\n{stderr[-4000:]}"
    assert checkpoint.exists(), "no checkpoint within 240 s"
    killed_after = load_checkpoint(checkpoint)["epoch"]
    assert 1 <= killed_after < EPOCHS

    with pytest.raises(SystemExit, match="--resume"):
        cli.train_main(run_args(dataset, out))
    resumed = cli.train_main(run_args(dataset, out) + ["--resume"])
    assert without_timings(resumed) == without_timings(reference_run[1])


def test_bf16_precision_learns_like_fp32_and_is_recorded(reference_run, dataset, tmp_path):
    """--precision bf16 runs every forward under autocast bf16 (fp32 master weights): the reference run's
    configuration learns as well within seed noise (60 test notes), and metrics.json says which precision ran."""
    _, reference, _ = reference_run
    metrics = cli.train_main(run_args(dataset, tmp_path) + ["--precision", "bf16"])
    assert (metrics["precision"], reference["precision"]) == ("bf16", "fp32")
    assert metrics["test_accuracy"] >= 0.25, metrics
    assert abs(metrics["test_accuracy"] - reference["test_accuracy"]) <= 0.15, (metrics, reference)
    assert metrics["history"][-1]["train_loss"] < 0.8 * metrics["history"][0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in load_classifier(tmp_path / cli.CHECKPOINT,
                                                                 torch.device("cpu"))[0].parameters())


def test_robust_recipe_beats_chance(dataset, tmp_path):
    """A few seconds of the robust recipe (log-mel front end, mean pooling, cosine schedule, best-epoch selection)
    on the synthetic set beats chance (10%), and the checkpoint serves the selected epoch's weights."""
    metrics = cli.train_main(run_args(dataset, tmp_path, epochs=2) + ["--recipe", "robust", "--lr", "0.01"])
    assert metrics["recipe"] == RECIPES["robust"].replace(lr=0.01).as_dict()
    assert metrics["test_accuracy"] >= 0.25, metrics
    assert metrics["tested_epoch"] == 1 + int(np.argmax([entry["val_accuracy"] for entry in metrics["history"]]))
    checkpoint = load_checkpoint(tmp_path / cli.CHECKPOINT)
    served, _ = load_classifier(tmp_path / cli.CHECKPOINT, torch.device("cpu"))
    assert all(torch.equal(value, checkpoint["best_model"][name]) for name, value in served.state_dict().items())


def test_a_run_with_a_weight_average_serves_the_average(dataset, tmp_path):
    """Without --select-best, fit tests the moving average; predict.py's loader must serve that, not the raw
    weights that the checkpoint keeps for --resume."""
    cli.train_main(run_args(dataset, tmp_path, epochs=1) + ["--ema", "0.9"])
    checkpoint = load_checkpoint(tmp_path / cli.CHECKPOINT)
    served, _ = load_classifier(tmp_path / cli.CHECKPOINT, torch.device("cpu"))
    averaged = {name[len("module."):]: value for name, value in checkpoint["average"].items()
                if name.startswith("module.")}
    assert served.state_dict().keys() == averaged.keys()
    assert all(torch.equal(value, averaged[name]) for name, value in served.state_dict().items())
    assert not all(torch.equal(value, checkpoint["model"][name]) for name, value in served.state_dict().items())


def test_augmented_recipe_resumes_exactly(dataset, tmp_path, monkeypatch):
    """The robust recipe with every augmentation, mixup and the weight average on, interrupted after its first
    checkpoint and resumed, ends with the uninterrupted run's metrics: the schedule, the selected weights, the RNG
    states that the augmentations draw from and the weight average are checkpointed."""
    def augmented_args(out: Path):
        return run_args(dataset, out, epochs=2) + [
            "--recipe", "robust", "--lr", "0.01", "--max-delay", "0.02", "--noise-snr", "10,30", "--freq-masks", "1",
            "--time-masks", "1", "--freq-shift", "2", "--eq-db", "3", "--reverb", "0.2", "--mixup", "0.2",
            "--dropout", "0.1", "--label-smoothing", "0.1", "--ema", "0.9", "--pooling", "meanstdmax"]

    metrics = cli.train_main(augmented_args(tmp_path / "uninterrupted"))
    save_checkpoint = engine.save_checkpoint

    def save_then_stop(path, state):
        save_checkpoint(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.train_main(augmented_args(tmp_path / "interrupted"))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="epochs"):  # the cosine schedule spans the run: its length is fixed
        cli.train_main(augmented_args(tmp_path / "interrupted") + ["--epochs", "3", "--resume"])
    resumed = cli.train_main(augmented_args(tmp_path / "interrupted") + ["--resume"])
    assert without_timings(resumed) == without_timings(metrics)


def test_recipe_flags_override_the_chosen_recipe():
    def recipe(*flags):
        return cli.resolve_recipe(cli.parse_train_args(list(flags)))

    assert recipe() == RECIPES["seed"]
    assert recipe("--recipe", "robust") == RECIPES["robust"]
    changed = recipe("--recipe", "robust", "--mixup", "0", "--noise-snr", "off", "--no-loudness", "--lr", "0.01")
    assert changed == RECIPES["robust"].replace(mixup=0.0, noise_snr=(), loudness=False, lr=0.01)
    assert recipe("--front-end", "logmel", "--noise-snr", "5,15").noise_snr == (5.0, 15.0)
    with pytest.raises(SystemExit):
        recipe("--noise-snr", "loud")
    with pytest.raises(SystemExit, match="--model cnn reads the raw waveform"):
        recipe("--model", "cnn", "--recipe", "robust")
    assert recipe("--model", "cnn", "--weight-decay", "0.1").weight_decay == 0.1


def recipe_fields():
    return [field for field in dataclasses.fields(Recipe) if field.name != "name"]


def flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def another_value(field: dataclasses.Field):
    """A value of the field other than the seed recipe's, that a recipe accepts with the others' such values."""
    choices = field.metadata.get("choices")
    if choices:
        return next(choice for choice in choices if choice != field.default)
    if field.type is bool:
        return not field.default
    if field.type is int:
        return field.default + 3
    if field.type is float:
        return field.default + 0.75
    return (5.0, 15.0)  # noise_snr, the one tuple


def test_every_recipe_field_has_a_flag_that_is_unset_by_default():
    args = cli.parse_train_args([])
    for field in recipe_fields():
        assert field.metadata["help"], field.name
        assert getattr(args, field.name) is None, field.name  # unset: the chosen recipe's value stays
    help_text = subprocess.run([sys.executable, str(EXAMPLES / "train_nsynth.py"), "--help"], env=subprocess_env(),
                               capture_output=True, text=True, check=True).stdout
    for field in recipe_fields():
        assert flag(field) in help_text, field.name
        if field.type is bool:
            assert f"--no-{flag(field)[2:]}" in help_text, field.name


def test_every_recipe_field_round_trips_through_its_flag():
    """A recipe that differs from the seed in every field, written as flags, reads back as itself."""
    changed = Recipe(**{field.name: another_value(field) for field in recipe_fields()})
    assert all(getattr(changed, field.name) != field.default for field in recipe_fields())
    flags = []
    for field in recipe_fields():
        value = getattr(changed, field.name)
        if field.type is bool:
            flags.append(flag(field) if value else f"--no-{flag(field)[2:]}")
        else:
            flags += [flag(field), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert cli.resolve_recipe(cli.parse_train_args(flags)) == changed
    assert cli.resolve_recipe(cli.parse_train_args(["--recipe", "robust", *flags])) == dataclasses.replace(
        changed, name="robust")


@pytest.mark.parametrize("model,size_flags", [("blstm", ["--hidden", "8"]), ("cnn", ["--cnn-width", "4"])])
def test_other_models_train_end_to_end(model, size_flags, dataset, tmp_path):
    out = tmp_path / model
    metrics = cli.train_main(run_args(dataset, out, epochs=1) + ["--model", model, *size_flags])
    assert metrics["model"] == model and len(metrics["history"]) == 1
    # The cpu backend runs every LSTM on CPU here when the extension is built (test_available_backends checks that).
    expected = "none" if model == "cnn" else ("cpu" if "cpu" in rnn_fast.available_backends() else "torch")
    assert metrics["backend"] == expected
    assert load_checkpoint(out / cli.CHECKPOINT)["config"]["model_config"]["name"] == model


def test_metrics_record_the_backend_that_ran_after_a_fallback(dataset, tmp_path):
    """--backend triton with a hidden size its kernels cannot take runs nn.LSTM's implementation, and says so."""
    if "triton" not in rnn_fast.available_backends():
        pytest.skip("triton is not available")
    hidden = MAX_HIDDEN + 1
    rnn_fast.modules.lstm._warned.clear()
    with pytest.warns(UserWarning, match="backend 'triton' cannot run this input"):
        metrics = cli.train_main(run_args(dataset, tmp_path, epochs=1)
                                    + ["--backend", "triton", "--hidden", str(hidden), "--layers", "1"])
    assert metrics["backend"] == "torch"


def test_resume_refuses_a_checkpoint_trained_with_other_settings(reference_run, dataset):
    out, _, _ = reference_run
    with pytest.raises(SystemExit, match="hidden_size"):
        cli.train_main(run_args(dataset, out) + ["--hidden", "16", "--resume"])


def test_torchrun_two_cpu_processes_follow_the_single_process_run(reference_run, dataset, tmp_path):
    """Two gloo ranks with half the batch each must see exactly the single-process global batches and average
    their gradients: the first step's loss (same weights, same 32 examples) and the next steps' (after averaged
    Adam updates) match the one-process run. Later, Adam amplifies the different order of floating-point sums
    chaotically, so epochs are not compared."""
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(EXAMPLES / "train_nsynth.py"), *run_args(dataset, out, epochs=1)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("test accuracy") == 1  # only rank 0 reports
    assert "2 process(es)" in result.stdout
    reference_out, single, console = reference_run
    expected_losses, losses = first_epoch_step_losses(console), first_epoch_step_losses(result.stdout)
    assert list(losses) == list(expected_losses) == list(range(1, len(losses) + 1))
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(expected_losses[step], abs=2e-4), step  # printed with 4 decimals

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS and len(metrics["history"]) == 1
    assert {k: metrics[k] for k in ("n_train", "n_valid", "n_test", "classes")} == \
        {k: single[k] for k in ("n_train", "n_valid", "n_test", "classes")}
    assert np.sum(metrics["confusion_matrix"]) == single["n_test"]
    checkpoint = load_checkpoint(out / cli.CHECKPOINT)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_out.iterdir())


def test_predict_script_gives_the_models_probabilities(reference_run, dataset, tmp_path, capsys):
    out, _, _ = reference_run
    root, cache = dataset
    test = load_split(cache, "test")
    rows = [0, 13, 42]
    wavs = [root / "nsynth-test" / "audio" / f"{test.note_strs[row]}.wav" for row in rows]
    short = tmp_path / "short.wav"
    write_wav(short, np.asarray(test.audio[5, :9000]), SAMPLE_RATE)

    status = cli.predict_main(["--checkpoint", str(out / "checkpoint.pt"), "--json", *map(str, wavs), str(short)])
    printed = {record["path"]: record for record in map(json.loads, capsys.readouterr().out.splitlines())}
    assert status == 0

    checkpoint = load_checkpoint(out / "checkpoint.pt")
    model = build_model(**checkpoint["config"]["model_config"])
    model.load_state_dict(checkpoint["model"])
    padded = np.zeros(CLIP_SAMPLES, np.int16)
    padded[:9000] = test.audio[5, :9000]
    clips = np.concatenate([np.asarray(test.audio[rows]), padded[None]])
    with torch.no_grad():
        expected = torch.softmax(model.eval()(waveform_to_frames(clips)), dim=1).numpy()
    for path, probabilities in zip([*wavs, short], expected):
        entry = printed[str(path)]
        assert list(entry["probabilities"]) == list(CLASSES)
        np.testing.assert_allclose(list(entry["probabilities"].values()), probabilities, rtol=1e-5, atol=1e-6)
        assert entry["prediction"] == CLASSES[int(probabilities.argmax())]
