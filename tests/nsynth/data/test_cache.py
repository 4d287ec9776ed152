import json
import shutil

import numpy as np
import pytest

from rnn_fast.nsynth.data import (CLASSES, CLIP_SAMPLES, FAMILIES, SOURCES, SPLITS, BadAudioError, DatasetLayoutError,
                             class_index, load_split, prepare, read_examples, read_wav, save_split, write_wav)
from rnn_fast.nsynth.data import cache
from rnn_fast.nsynth.data.cache import METADATA_FIELDS
from rnn_fast.nsynth.data.jsonwav import LAYOUT

from .. import indexed_split, tiny_dataset, write_raw_wav


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("nsynth"))


@pytest.fixture(scope="module")
def reference_cache(dataset, tmp_path_factory):
    return prepare(dataset, tmp_path_factory.mktemp("reference-cache"), workers=1, progress=False, chunk_size=4)


@pytest.fixture
def dataset_copy(dataset, tmp_path):
    return shutil.copytree(dataset, tmp_path / "nsynth")


def assert_same_cache(cache_dir, reference_dir, splits=SPLITS):
    for split in splits:
        got, expected = load_split(cache_dir, split), load_split(reference_dir, split)
        assert got.note_strs == expected.note_strs
        np.testing.assert_array_equal(got.audio, expected.audio)
        for name in METADATA_FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_prepare_caches_first_second_and_metadata(dataset, reference_cache):
    for split in SPLITS:
        data = load_split(reference_cache, split)
        examples = read_examples(dataset / f"nsynth-{split}")
        kept = sorted(key for key, example in examples.items() if example["instrument_family_str"] != "synth_lead")
        assert data.note_strs == kept and len(data) == len(kept)
        assert isinstance(data.audio, np.memmap) and not data.audio.flags.writeable
        assert data.audio.dtype == np.int16 and data.audio.shape == (len(kept), CLIP_SAMPLES)
        for row, key in enumerate(kept):
            example = examples[key]
            samples, _ = read_wav(dataset / f"nsynth-{split}" / "audio" / f"{key}.wav")
            np.testing.assert_array_equal(data.audio[row], samples[:CLIP_SAMPLES])
            assert data.labels[row] == CLASSES.index(example["instrument_family_str"])
            assert data.families[row] == FAMILIES.index(example["instrument_family_str"])
            assert data.sources[row] == SOURCES.index(example["instrument_source_str"])
            assert (data.pitches[row], data.velocities[row], data.instruments[row]) == (
                example["pitch"], example["velocity"], example["instrument"])
        for name in METADATA_FIELDS:
            assert getattr(data, name).dtype == np.int64


def test_synth_lead_is_dropped(dataset, reference_cache):
    examples = read_examples(dataset / "nsynth-train")
    synth_lead = [key for key, ex in examples.items() if ex["instrument_family_str"] == "synth_lead"]
    assert synth_lead
    assert len(load_split(reference_cache, "train")) == len(examples) - len(synth_lead)


def test_worker_processes_agree_with_one_process(dataset, reference_cache, tmp_path):
    prepare(dataset, tmp_path, workers=2, progress=False, chunk_size=3)
    assert_same_cache(tmp_path, reference_cache)


def corrupt_train_files(root):
    """Break one train WAV in every way prepare must catch; returns {path: start of the expected reason}."""
    audio = root / "nsynth-train" / "audio"
    paths = sorted(audio.glob("*.wav"))
    truncated, stereo, slow, garbage, short, missing, deep = paths[1], paths[2], paths[5], paths[9], paths[12], \
        paths[14], paths[17]
    truncated.write_bytes(truncated.read_bytes()[:44 + 2 * 20000])
    write_raw_wav(stereo, 64000, channels=2)
    write_wav(slow, np.zeros(64000, dtype=np.int16), 22050)
    garbage.write_bytes(b"\x00" * 1000)
    write_wav(short, np.zeros(CLIP_SAMPLES - 1, dtype=np.int16), 16000)
    missing.unlink()
    write_raw_wav(deep, 64000, width=3)
    return {
        str(truncated): "truncated: header declares 64000 samples, file holds 20000",
        str(stereo): "has 2 channels, expected mono",
        str(slow): "sample rate is 22050 Hz, expected 16000 Hz",
        str(garbage): "not a readable PCM WAV file (",
        str(short): f"holds {CLIP_SAMPLES - 1} samples, expected at least {CLIP_SAMPLES}",
        str(missing): "missing",
        str(deep): "has 24-bit samples, expected 16-bit PCM",
    }


def test_bad_files_are_reported_by_name_then_fixed(dataset, dataset_copy, reference_cache, tmp_path):
    expected = corrupt_train_files(dataset_copy)
    cache_dir = tmp_path / "cache"
    with pytest.raises(BadAudioError) as info:
        prepare(dataset_copy, cache_dir, workers=1, progress=False, chunk_size=4)
    bad_files = info.value.bad_files
    assert sorted(bad_files) == sorted(expected)
    assert all(bad_files[path].startswith(reason) for path, reason in expected.items())
    message = str(info.value)
    assert message.startswith(f"{len(expected)} unusable audio file(s)")
    assert all(f"{path}: {reason}" in message for path, reason in bad_files.items())
    with pytest.raises(FileNotFoundError, match="no prepared 'train' split"):
        load_split(cache_dir, "train")
    assert_same_cache(cache_dir, reference_cache, splits=("valid", "test"))

    shutil.rmtree(dataset_copy / "nsynth-train" / "audio")
    shutil.copytree(dataset / "nsynth-train" / "audio", dataset_copy / "nsynth-train" / "audio")
    prepare(dataset_copy, cache_dir, workers=1, progress=False, chunk_size=4)
    assert_same_cache(cache_dir, reference_cache)
    assert not (cache_dir / "train.partial").exists()


def test_bad_file_list_is_abbreviated(tmp_path):
    error = BadAudioError({f"/data/{index:02d}.wav": "missing" for index in range(25)})
    assert "/data/19.wav: missing" in str(error) and "/data/20.wav" not in str(error)
    assert "... and 5 more" in str(error)
    assert len(error.bad_files) == 25


def test_resume_reads_only_unfinished_chunks(dataset, reference_cache, tmp_path, monkeypatch):
    fill_chunk = cache._fill_chunk
    first_run = []

    def interrupted_after_three_chunks(task):
        if len(first_run) == 3:
            raise KeyboardInterrupt
        first_run.append(task[2])
        return fill_chunk(task)

    monkeypatch.setattr(cache, "_fill_chunk", interrupted_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare(dataset, tmp_path, splits=("train",), workers=1, progress=False, chunk_size=4)

    second_run = []

    def recorded(task):
        second_run.append(task[2])
        return fill_chunk(task)

    monkeypatch.setattr(cache, "_fill_chunk", recorded)
    prepare(dataset, tmp_path, splits=("train",), workers=1, progress=False, chunk_size=4)
    assert sorted(first_run + second_run) == list(range(0, len(load_split(tmp_path, "train")), 4))
    assert first_run and second_run
    assert_same_cache(tmp_path, reference_cache, splits=("train",))


def test_prepare_is_idempotent(dataset, tmp_path, monkeypatch):
    prepare(dataset, tmp_path, workers=1, progress=False)
    written = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}

    def must_not_run(task):
        raise AssertionError("a prepared split was read again")

    monkeypatch.setattr(cache, "_fill_chunk", must_not_run)
    assert prepare(dataset, tmp_path, workers=1, progress=False) == tmp_path
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == written


def test_changed_examples_json_is_prepared_again(dataset_copy, tmp_path, monkeypatch):
    prepare(dataset_copy, tmp_path, splits=("test",), workers=1, progress=False)
    examples_file = dataset_copy / "nsynth-test" / "examples.json"
    examples = json.loads(examples_file.read_text())
    del examples[sorted(examples)[3]]
    examples_file.write_text(json.dumps(examples))

    def interrupted(task):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache, "_fill_chunk", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare(dataset_copy, tmp_path, splits=("test",), workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no prepared 'test' split"):  # the stale split is not served
        load_split(tmp_path, "test")
    prepare(dataset_copy, tmp_path, splits=("test",), workers=1, progress=False)
    assert load_split(tmp_path, "test").note_strs == sorted(examples)


@pytest.mark.parametrize("remove, missing", [("nsynth-test", "file"), ("nsynth-valid/examples.json", "file"),
                                             ("nsynth-test/audio", "directory")],
                         ids=["no-split-dir", "no-examples-json", "no-audio-dir"])
def test_wrong_layout_fails_before_any_work(dataset_copy, tmp_path, remove, missing):
    target = dataset_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetLayoutError) as info:
        prepare(dataset_copy, tmp_path / "cache", workers=1, progress=False)
    assert f"missing {missing} " in str(info.value) and LAYOUT in str(info.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("field, value, problem", [
    ("instrument_family_str", "kazoo", "has unknown instrument_family_str 'kazoo'"),
    ("instrument_source_str", "analog", "has unknown instrument_source_str 'analog'"),
    ("pitch", None, "has no 'pitch' field"),
], ids=["family", "source", "no-pitch"])
def test_bad_metadata_names_the_example(dataset_copy, tmp_path, field, value, problem):
    examples_file = dataset_copy / "nsynth-valid" / "examples.json"
    examples = json.loads(examples_file.read_text())
    key = sorted(examples)[2]
    if value is None:
        del examples[key][field]
    else:
        examples[key][field] = value
    examples_file.write_text(json.dumps(examples))
    with pytest.raises(ValueError, match=f"{examples_file}: example {key} {problem}"):
        prepare(dataset_copy, tmp_path, splits=("valid",), workers=1, progress=False)


def test_class_index():
    assert [class_index(family) for family in CLASSES] == list(range(10))
    assert class_index("synth_lead") == -1
    with pytest.raises(ValueError, match="unknown NSynth instrument family 'kazoo'"):
        class_index("kazoo")


def test_load_split_before_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.json is missing; run rnn_fast.nsynth.data.prepare"):
        load_split(tmp_path, "train")


def test_save_split_round_trip(tmp_path):
    data = indexed_split(37, seed=3)
    save_split(tmp_path, "valid", data)
    loaded = load_split(tmp_path, "valid")
    assert loaded.note_strs == data.note_strs
    np.testing.assert_array_equal(loaded.audio, data.audio)
    for name in METADATA_FIELDS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name))


def test_split_checks_its_shapes():
    data = indexed_split(5)
    with pytest.raises(ValueError, match=r"audio must be int16 \[5, 16000\]"):
        cache.NSynthSplit(**{**vars(data), "audio": data.audio[:, :100]})
    with pytest.raises(ValueError, match=r"labels must have shape \[5\]"):
        cache.NSynthSplit(**{**vars(data), "labels": data.labels[:4]})
