"""examples/predict.py on files people have, with the committed checkpoint of training/fixtures: every format
predicts like the same note at 16 kHz mono 16-bit, each bad input is one line on stderr while the files beside it
are still predicted, short clips are flagged, directories and globs are expanded, batches and the progress bar,
--json and --top, and --help."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from rnn_fast.nsynth import cli
from rnn_fast.nsynth import predict as predict_module
from rnn_fast.nsynth.data import CLASSES
from rnn_fast.nsynth.predict import AUDIO_SUFFIXES, expand_inputs, predict_batches
from rnn_fast.nsynth.training.checkpoint import load_classifier

from . import FORMATS, write_note, write_raw_wav

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = Path(__file__).resolve().parent / "training" / "fixtures" / "checkpoint-robust-ema-before-layout.pt"
SUFFIXES = ", ".join(AUDIO_SUFFIXES)

# How far each format's probabilities may be from the 16 kHz mono 16-bit note's: the resampler moves them by up to
# 1.3e-3 here, a change of width by 2.5e-4, and a wrong reading (a channel dropped, no resampling) by 0.04 or more;
# Vorbis is lossy (8e-3). 8-bit PCM is left out: its quantisation noise, 48 dB below full scale, is no rounding but
# a change of the sound that the log-mel model hears in the note's quiet tail (0.05).
TOLERANCE = 3e-3
LOSSY_TOLERANCE = 1.5e-2
COMPARED = [name for name in FORMATS if name != "8-bit WAV"]


def predict(*arguments) -> Tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``examples/predict.py --checkpoint CHECKPOINT *arguments``, in this
    process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.predict_main(["--checkpoint", str(CHECKPOINT), *map(str, arguments)])
    return status, stdout.getvalue(), stderr.getvalue()


def records(stdout: str) -> List[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """``{format: its --json record}``, and the reference note's under ``"reference"``, from one run."""
    directory = tmp_path_factory.mktemp("formats")
    paths = {"reference": write_note(directory / "reference.wav")}
    for name, (file_format, subtype, rate, channels) in FORMATS.items():
        paths[name] = write_note(directory / f"{len(paths)}.{file_format.lower()}", file_format, subtype, rate,
                                 channels)
    status, stdout, stderr = predict("--json", *paths.values())
    assert (status, stderr) == (0, "")
    return dict(zip(paths, records(stdout)))


def test_the_reference_prediction_is_clear_of_the_tolerance(formats):
    """Otherwise the same prediction within the tolerance would prove little."""
    first, second = sorted(formats["reference"]["probabilities"].values())[-1:-3:-1]
    assert first - second > 5 * TOLERANCE


@pytest.mark.parametrize("name", COMPARED)
def test_every_format_predicts_like_the_16khz_mono_16bit_note(name, formats):
    reference, record = formats["reference"], formats[name]
    assert record["prediction"] == reference["prediction"]
    assert list(record["probabilities"]) == list(CLASSES)
    tolerance = LOSSY_TOLERANCE if "Vorbis" in name else TOLERANCE
    np.testing.assert_allclose(list(record["probabilities"].values()), list(reference["probabilities"].values()),
                               atol=tolerance)
    assert record["warning"] is None and record["seconds"] == pytest.approx(1.2, abs=1e-4)


def bad_inputs(directory: Path) -> dict:
    """``{argument: the reason predict.py gives}`` for every kind of input that gives no prediction."""
    text = directory / "text.wav"
    text.write_text("hello\n")
    (directory / "empty").mkdir()
    write_raw_wav(directory / "no-samples.wav", 0, rate=44100, channels=2)
    return {
        text: "not a readable audio file (format not recognised)",
        directory / "missing.wav": "no such file or directory",
        directory / "empty": f"directory holds no audio file ({SUFFIXES})",
        directory / "nothing-*.flac": f"pattern matches no audio file ({SUFFIXES})",
        directory / "no-samples.wav": "holds no audio (0 samples)",
    }


@pytest.mark.parametrize("kind", range(5))
def test_a_bad_input_is_one_line_and_the_files_beside_it_are_predicted(kind, tmp_path):
    argument, reason = list(bad_inputs(tmp_path).items())[kind]
    good = [write_note(tmp_path / "before.wav"), write_note(tmp_path / "after.flac", "FLAC")]
    status, stdout, stderr = predict("--json", good[0], argument, good[1])
    assert status == 1
    assert stderr == f"error: {argument}: {reason}\n"
    assert [record["path"] for record in records(stdout)] == list(map(str, good))


def test_the_script_reports_bad_inputs_without_a_traceback(tmp_path):
    """In a real process: the exit status, and one line per bad input among the good files' table rows."""
    bad = bad_inputs(tmp_path)
    good = [write_note(tmp_path / "good.wav", rate=44100, channels=2), write_note(tmp_path / "good.flac", "FLAC")]
    result = subprocess.run([sys.executable, str(REPO / "examples" / "predict.py"), "--checkpoint", str(CHECKPOINT),
                             str(good[0]), *map(str, bad), str(good[1])], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 1
    assert sorted(result.stderr.splitlines()) == sorted(f"error: {argument}: {reason}" for argument, reason in
                                                        bad.items())
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["file", "prediction", *CLASSES]
    assert [row.split()[0] for row in rows] == list(map(str, good))


def test_a_file_that_breaks_the_reader_unforeseen_is_one_line_too(tmp_path, monkeypatch):
    read_clip = predict_module.read_clip

    def broken_on_one_file(path):
        return 1 / 0 if path.name == "breaks.wav" else read_clip(path)

    monkeypatch.setattr(predict_module, "read_clip", broken_on_one_file)
    paths = [write_note(tmp_path / name) for name in ("before.wav", "breaks.wav", "after.wav")]
    status, stdout, stderr = predict("--json", *paths)
    assert status == 1
    assert stderr == f"error: {paths[1]}: unexpected error while reading (ZeroDivisionError: division by zero)\n"
    assert [record["path"] for record in records(stdout)] == [str(paths[0]), str(paths[2])]


def test_an_unforeseen_error_outside_the_files_is_one_line_and_the_exit_status_1(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "expand_inputs", lambda arguments: 1 / 0)
    status, stdout, stderr = predict(write_note(tmp_path / "a.wav"))
    assert (status, stdout) == (1, "")
    assert stderr == "error: ZeroDivisionError: division by zero (--debug shows the traceback)\n"
    with pytest.raises(ZeroDivisionError):
        predict("--debug", tmp_path / "a.wav")


def test_debug_adds_the_traceback(tmp_path):
    text = tmp_path / "text.wav"
    text.write_text("hello\n")
    status, stdout, stderr = predict("--debug", "--json", text, write_note(tmp_path / "good.wav"))
    assert status == 1 and len(records(stdout)) == 1
    assert stderr.startswith(f"error: {text}: not a readable audio file") and "Traceback" in stderr
    assert "soundfile.LibsndfileError" in stderr


@pytest.mark.parametrize("make,reason", [
    (lambda path: None, "cannot load the checkpoint (no such file or directory)"),
    (lambda path: path.write_text("hello\n"), "not a checkpoint of examples/train_nsynth.py (KeyError: 101)"),
])
def test_a_bad_checkpoint_is_one_line(make, reason, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    make(checkpoint)
    assert cli.predict_main(["--checkpoint", str(checkpoint), str(write_note(tmp_path / "good.wav"))]) == 1
    assert capsys.readouterr() == ("", f"error: {checkpoint}: {reason}\n")


def test_a_short_clip_is_predicted_padded_with_a_warning_and_a_marked_row(tmp_path):
    short = write_note(tmp_path / "short.wav", rate=44100, channels=2, seconds=0.05)
    full = write_note(tmp_path / "full.wav")
    warning = "only 0.05 s of audio; the model reads 1 s, so 95% of what it saw is padded silence"
    status, stdout, stderr = predict(full, short)
    assert (status, stderr) == (0, f"warning: {short}: {warning}\n")
    header, full_row, short_row = stdout.splitlines()
    assert header.split()[-1] == "note" and short_row.endswith("  padded: 0.05 s of 1 s")
    assert full_row.split()[0] == str(full) and len(full_row.split()) == 2 + len(CLASSES)

    _, stdout, _ = predict("--json", full, short)
    assert [record["warning"] for record in records(stdout)] == [None, warning]


def test_json_round_trips_the_predictions(tmp_path):
    """Each line holds a file's record: read back, it is the record of what predict_batches computed."""
    paths = [write_note(tmp_path / "a.wav"), write_note(tmp_path / "b.ogg", "OGG", "VORBIS", 44100, 2, 0.5)]
    status, stdout, _ = predict("--json", *paths)
    model, classes = load_classifier(CHECKPOINT, torch.device("cpu"))
    expected = [prediction.record() for batch in predict_batches(model, classes, paths, torch.device("cpu"))
                for prediction in batch]
    assert status == 0 and records(stdout) == expected
    assert set(expected[0]) == {"path", "prediction", "probabilities", "seconds", "warning"}
    assert [record["path"] for record in expected] == list(map(str, paths))


def test_top_k_keeps_the_k_most_probable_families(tmp_path):
    path = write_note(tmp_path / "a.wav")
    _, stdout, _ = predict("--json", path)
    everything = records(stdout)[0]["probabilities"]
    ranked = sorted(everything, key=everything.get, reverse=True)

    _, stdout, _ = predict("--json", "--top", "3", path)
    record = records(stdout)[0]
    assert list(record["probabilities"]) == ranked[:3] and record["prediction"] == ranked[0]
    assert record["probabilities"] == {name: everything[name] for name in ranked[:3]}

    _, stdout, _ = predict("--top", "2", path)
    header, row = stdout.splitlines()
    assert header.split() == ["file", "prediction", "#1", "#2"]
    assert row.split() == [str(path), ranked[0], ranked[0], f"{everything[ranked[0]]:.3f}", ranked[1],
                           f"{everything[ranked[1]]:.3f}"]
    _, stdout, _ = predict("--top", "99", path)
    assert stdout.splitlines()[0].split()[-1] == f"#{len(CLASSES)}"


def test_directories_and_globs_name_their_audio_files_once_each(tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    (notes / "deeper").mkdir(parents=True)
    files = [write_note(notes / "a.wav"), write_note(notes / "deeper" / "b.FLAC", "FLAC"),
             write_note(notes / "deeper" / "c.ogg", "OGG", "VORBIS")]
    (notes / "README.txt").write_text("not audio\n")
    (notes / "deeper" / "examples.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    found, failures = expand_inputs(["notes/deeper/*.ogg", "notes", "notes/**/*.FLAC", "notes/a.wav", "note?"])
    assert failures == []
    assert found == [Path("notes/deeper/c.ogg"), Path("notes/a.wav"), Path("notes/deeper/b.FLAC")]

    status, stdout, stderr = predict("--json", "notes", str(tmp_path / "notes" / "**" / "*.ogg"))
    assert (status, stderr) == (0, "")
    assert [record["path"] for record in records(stdout)] == [str(file.relative_to(tmp_path)) for file in files]


def test_files_go_through_the_model_in_batches_with_a_progress_bar_beyond_one(tmp_path):
    paths = [write_note(tmp_path / f"{index}.wav", seconds=1 + 0.2 * index) for index in range(3)]
    status, one_batch, stderr = predict("--json", *paths)
    assert (status, stderr) == (0, "")

    status, batches, stderr = predict("--json", "--batch-size", "2", *paths)
    assert status == 0 and "3/3" in stderr and "file/s" in stderr
    for record, expected in zip(records(batches), records(one_batch)):
        np.testing.assert_allclose(list(record["probabilities"].values()), list(expected["probabilities"].values()),
                                   rtol=1e-5, atol=1e-7)

    _, _, stderr = predict("--json", "--batch-size", "2", "--no-progress", *paths)
    assert "file/s" not in stderr


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(REPO / "examples" / "predict.py"), "--help"], capture_output=True,
                            text=True, check=True, timeout=300, cwd=REPO)
    for action in cli.predict_parser()._actions:
        assert action.help, action.dest
        for option in action.option_strings:
            assert option in result.stdout, option
    for words in ("44.1", "FLAC", "resampled to 16 kHz", "averaged to mono", "padded with silence", "Exit status",
                  "one JSON object per line"):
        assert words in " ".join(result.stdout.split()), words
