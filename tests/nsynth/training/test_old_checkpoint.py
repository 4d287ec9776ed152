"""A checkpoint written before the classifier moved into ``rnn_fast.nsynth`` (fixtures/README.md) still loads,
predicts what it predicted then, and resumes."""
import contextlib
import io
import json
import pickletools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from rnn_fast.nsynth import cli
from rnn_fast.nsynth.data import CLASSES, CLIP_SAMPLES, SAMPLE_RATE, write_wav

from .. import tiny_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_CHECKPOINT = FIXTURES / "checkpoint-robust-ema-before-layout.pt"


def tone_wav(path: Path) -> Path:
    """The decaying 440 Hz tone whose probabilities the fixture's JSON records."""
    time = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    clip = np.round(12000 * np.sin(2 * np.pi * 440 * time) * np.exp(-3 * time)).astype(np.int16)
    write_wav(path, clip, SAMPLE_RATE)
    return path


def test_old_checkpoint_holds_no_pickled_classes():
    """Plain tensors, lists, dicts and numbers only: nothing that names a module path, which a move would break."""
    with zipfile.ZipFile(OLD_CHECKPOINT) as archive:
        pickle = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    opcodes = [(opcode.name, argument) for opcode, argument, _ in pickletools.genops(pickle)]
    modules = {argument.split()[0] for name, argument in opcodes if name == "GLOBAL"}
    assert modules == {"collections", "torch", "torch._utils"}
    assert "STACK_GLOBAL" not in {name for name, _ in opcodes}


def test_old_checkpoint_predicts_what_it_predicted(tmp_path, capsys):
    expected = json.loads(OLD_CHECKPOINT.with_suffix(".json").read_text())["tone_probabilities"]
    wav = tone_wav(tmp_path / "tone.wav")
    assert cli.predict_main(["--checkpoint", str(OLD_CHECKPOINT), "--json", str(wav)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(wav)
    assert list(printed["probabilities"]) == list(expected) == list(CLASSES)
    np.testing.assert_allclose(list(printed["probabilities"].values()), list(expected.values()), rtol=1e-5,
                               atol=1e-6)


def test_old_checkpoint_resumes(tmp_path):
    """``--resume`` restores the old checkpoint's weights, optimizer, schedule, weight average and RNG states; its
    two epochs are done, so the run tests the selected epoch and reports the old history."""
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(OLD_CHECKPOINT, out / "checkpoint.pt")
    old = torch.load(OLD_CHECKPOINT, weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = cli.train_main([
            "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--recipe", "robust",
            "--ema", "0.9", "--hidden", "4", "--layers", "1", "--epochs", "2", "--batch-size", "8",
            "--eval-batch-size", "16", "--no-progress", "--device", "cpu", "--resume"])
    assert metrics["history"] == old["history"]
    assert metrics["tested_epoch"] == old["best_epoch"]
    assert metrics["recipe"] == old["config"]["recipe"]
