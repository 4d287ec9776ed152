import json

import numpy as np
import pytest

from rnn_fast.nsynth.data import DatasetLayoutError, WavError, read_examples, read_wav, write_wav
from rnn_fast.nsynth.data.jsonwav import LAYOUT, check_layout

from .. import write_raw_wav


def random_samples(count: int, seed: int = 0) -> np.ndarray:
    samples = np.random.default_rng(seed).integers(-32768, 32768, count, dtype=np.int16)
    samples[:2] = (-32768, 32767)
    return samples


def test_read_wav_round_trip(tmp_path):
    samples = random_samples(20011)
    write_wav(tmp_path / "note.wav", samples, 16000)
    got, rate = read_wav(tmp_path / "note.wav")
    assert rate == 16000
    assert got.dtype == np.int16 and got.flags.writeable
    np.testing.assert_array_equal(got, samples)


@pytest.mark.parametrize("max_samples", [1, 16000, 20011, 10**6], ids=lambda n: f"max{n}")
def test_read_wav_prefix(tmp_path, max_samples):
    samples = random_samples(20011, seed=1)
    write_wav(tmp_path / "note.wav", samples, 16000)
    got, _ = read_wav(tmp_path / "note.wav", max_samples)
    np.testing.assert_array_equal(got, samples[:max_samples])


@pytest.mark.parametrize("frames, rate, channels, width, checks, reason", [
    (16000, 16000, 2, 2, {}, "has 2 channels, expected mono"),
    (16000, 16000, 1, 1, {}, "has 8-bit samples, expected 16-bit PCM"),
    (16000, 16000, 1, 3, {}, "has 24-bit samples, expected 16-bit PCM"),
    (16000, 22050, 1, 2, {"expected_rate": 16000}, "sample rate is 22050 Hz, expected 16000 Hz"),
    (8000, 16000, 1, 2, {"min_samples": 16000}, "holds 8000 samples, expected at least 16000"),
], ids=["stereo", "8bit", "24bit", "rate22050", "short"])
def test_read_wav_rejects_wrong_format(tmp_path, frames, rate, channels, width, checks, reason):
    path = tmp_path / "note.wav"
    write_raw_wav(path, frames, rate=rate, channels=channels, width=width)
    with pytest.raises(WavError) as info:
        read_wav(path, 100, **checks)
    assert info.value.reason == reason
    assert info.value.path == str(path)
    assert str(info.value) == f"{path}: {reason}"


@pytest.mark.parametrize("kept_bytes", [44 + 2 * 15999, 44 + 2 * 100, 44], ids=["one-short", "mostly-gone", "header"])
def test_read_wav_rejects_truncated_even_for_a_prefix(tmp_path, kept_bytes):
    path = tmp_path / "note.wav"
    write_wav(path, random_samples(16000), 16000)
    path.write_bytes(path.read_bytes()[:kept_bytes])
    held = (kept_bytes - 44) // 2
    with pytest.raises(WavError, match=f"truncated: header declares 16000 samples, file holds {held}$"):
        read_wav(path, 10)


@pytest.mark.parametrize("content", [b"", b"RIFF", b"not a wav file at all" * 10, b"RIFF\x24\x00\x00\x00WAVEdata"],
                         ids=["empty", "riff-only", "text", "no-fmt"])
def test_read_wav_rejects_unreadable(tmp_path, content):
    path = tmp_path / "note.wav"
    path.write_bytes(content)
    with pytest.raises(WavError, match="not a readable PCM WAV file"):
        read_wav(path)


def test_read_wav_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_wav(tmp_path / "absent.wav")


@pytest.mark.parametrize("samples", [np.zeros(10, dtype=np.float32), np.zeros((10, 2), dtype=np.int16)],
                         ids=["float", "2d"])
def test_write_wav_rejects_non_mono_int16(tmp_path, samples):
    with pytest.raises(ValueError, match="1-D int16"):
        write_wav(tmp_path / "note.wav", samples, 16000)


def test_read_examples(tmp_path):
    examples = {"bass_synthetic_000-040-100": {"pitch": 40}, "flute_acoustic_001-070-050": {"pitch": 70}}
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    assert read_examples(tmp_path) == examples


def test_missing_examples_json_names_the_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as info:
        read_examples(tmp_path / "nsynth-train")
    assert str(tmp_path / "nsynth-train" / "examples.json") in str(info.value)
    assert LAYOUT in str(info.value)


@pytest.mark.parametrize("text, problem", [("{", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ('{"a": 1}', "must hold a JSON object")],
                         ids=["truncated", "list", "non-object-example"])
def test_read_examples_rejects_bad_json(tmp_path, text, problem):
    (tmp_path / "examples.json").write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_examples(tmp_path)


def test_check_layout(tmp_path):
    split_dir = tmp_path / "nsynth-valid"
    split_dir.mkdir()
    (split_dir / "examples.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match="missing directory .*audio; expected NSynth's jsonwav layout"):
        check_layout(split_dir)
    (split_dir / "audio").mkdir()
    check_layout(split_dir)
    (split_dir / "examples.json").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*examples.json"):
        check_layout(split_dir)
