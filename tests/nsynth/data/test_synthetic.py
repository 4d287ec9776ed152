import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rnn_fast.nsynth.data import (CLASSES, CLIP_SAMPLES, FAMILIES, FRAME_SIZE, FRAMES, NOTE_SAMPLES, QUALITIES, SOURCES,
                             SPLITS, default_data_dir, ensure_builtin_dataset, generate_synthetic, load_split,
                             make_note_str, read_examples, read_wav)
from rnn_fast.nsynth.data import cache, synthetic

from .. import TINY_SIZES, tiny_dataset

# Enough notes for a linear probe to tell families apart on instruments it has never heard.
PROBE_SIZES = {"n_train": 220, "n_valid": 10, "n_test": 100}
OFFICIAL_FIELDS = {
    "note_str": str, "note": int, "instrument": int, "instrument_str": str, "pitch": int, "velocity": int,
    "sample_rate": int, "instrument_family": int, "instrument_family_str": str, "instrument_source": int,
    "instrument_source_str": str, "qualities": list, "qualities_str": list,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe"), **PROBE_SIZES, seed=0, progress=False)


def split_examples(root: Path):
    return {split: read_examples(root / f"nsynth-{split}") for split in SPLITS}


def all_files(root: Path):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_official_layout_and_fields(dataset):
    for split, examples in split_examples(dataset).items():
        assert len(examples) == PROBE_SIZES[f"n_{split}"]
        wavs = {path.stem for path in (dataset / f"nsynth-{split}" / "audio").iterdir()}
        assert wavs == set(examples)
        for key, example in examples.items():
            assert {name: type(value) for name, value in example.items()} == OFFICIAL_FIELDS
            assert re.fullmatch(r"[a-z_]+_(acoustic|electronic|synthetic)_\d{3}-\d{3}-\d{3}", key)
            family, source = example["instrument_family_str"], example["instrument_source_str"]
            assert key == example["note_str"] == make_note_str(
                family, source, int(example["instrument_str"][-3:]), example["pitch"], example["velocity"])
            assert example["instrument_str"] == key.split("-")[0]
            assert FAMILIES[example["instrument_family"]] == family
            assert SOURCES[example["instrument_source"]] == source
            assert example["sample_rate"] == 16000 and 0 <= example["pitch"] <= 127
            assert example["qualities_str"] == [q for q, on in zip(QUALITIES, example["qualities"]) if on]


def test_wavs_are_official_format(dataset):
    for path in sorted((dataset / "nsynth-test" / "audio").iterdir())[:10]:
        samples, rate = read_wav(path, expected_rate=16000)
        assert rate == 16000 and samples.shape == (NOTE_SAMPLES,)
        assert 0.4 * 32767 < np.abs(samples.astype(np.int32)).max() <= 32767


def test_families_sources_and_disjoint_instruments(dataset):
    examples = split_examples(dataset)
    families = {split: {ex["instrument_family_str"] for ex in exs.values()} for split, exs in examples.items()}
    assert families == {"train": set(FAMILIES), "valid": set(CLASSES), "test": set(CLASSES)}
    assert {ex["instrument_source_str"] for ex in examples["train"].values()} == set(SOURCES)
    instruments = {split: {ex["instrument"] for ex in exs.values()} for split, exs in examples.items()}
    names = {split: {ex["instrument_str"] for ex in exs.values()} for split, exs in examples.items()}
    for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not instruments[first] & instruments[second]
        assert not names[first] & names[second]
    assert len(instruments["train"]) == len(names["train"]) > len(FAMILIES)


def frame_features(audio: np.ndarray) -> np.ndarray:
    """Log energy envelope and log average spectrum of the first second's frames."""
    frames = audio[:, :CLIP_SAMPLES].astype(np.float32).reshape(len(audio), FRAMES, FRAME_SIZE) / 32768
    envelope = np.log(np.sqrt((frames ** 2).mean(-1)) + 1e-4)[:, ::4]
    spectrum = np.log(np.abs(np.fft.rfft(frames, axis=-1)).mean(1) + 1e-4)[:, ::2]
    return np.concatenate([envelope, spectrum], axis=1)


def test_families_are_learnable_on_unseen_instruments(dataset, tmp_path):
    cache_dir = cache.prepare(dataset, tmp_path, splits=("train", "test"), workers=1, progress=False)
    train, test = load_split(cache_dir, "train"), load_split(cache_dir, "test")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    probe.fit(frame_features(np.asarray(train.audio)), train.labels)
    accuracy = probe.score(frame_features(np.asarray(test.audio)), test.labels)
    assert accuracy > 0.6, f"test accuracy {accuracy:.2f} (chance 0.1)"


def test_notes_of_a_family_differ(dataset):
    examples = read_examples(dataset / "nsynth-train")
    for family in FAMILIES:
        keys = sorted(key for key, ex in examples.items() if ex["instrument_family_str"] == family)[:8]
        clips = np.stack([read_wav(dataset / "nsynth-train" / "audio" / f"{key}.wav", CLIP_SAMPLES)[0]
                          for key in keys]).astype(np.float64)
        correlation = np.corrcoef(clips)
        pitches = [examples[key]["pitch"] for key in keys]
        for first, second in zip(*np.triu_indices(len(keys), 1)):
            assert not np.array_equal(clips[first], clips[second]), (keys[first], keys[second])
            if pitches[first] != pitches[second]:
                assert abs(correlation[first, second]) < 0.9, (keys[first], keys[second])


def test_generation_is_deterministic(tmp_path):
    first = all_files(tiny_dataset(tmp_path / "first"))
    assert first == all_files(tiny_dataset(tmp_path / "second"))
    other_seed = all_files(generate_synthetic(tmp_path / "other", **TINY_SIZES, seed=1, progress=False))
    assert wav_contents(other_seed) != wav_contents(first)


def wav_contents(files: dict) -> set:
    return {content for name, content in files.items() if name.endswith(".wav")}


def test_generation_is_idempotent_and_resumable(tmp_path, monkeypatch):
    reference = all_files(tiny_dataset(tmp_path / "reference"))
    render_note = synthetic.render_note
    rendered = []

    def interrupted_after_five_notes(*args):
        if len(rendered) == 5:
            raise KeyboardInterrupt
        rendered.append(args)
        return render_note(*args)

    monkeypatch.setattr(synthetic, "render_note", interrupted_after_five_notes)
    with pytest.raises(KeyboardInterrupt):
        tiny_dataset(tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "synthetic.json").read_text())["complete"] is False

    def recorded(*args):
        rendered.append(args)
        return render_note(*args)

    monkeypatch.setattr(synthetic, "render_note", recorded)
    tiny_dataset(tmp_path / "resumed")
    assert len(rendered) == sum(TINY_SIZES.values())  # nothing rendered twice
    assert all_files(tmp_path / "resumed") == reference

    tiny_dataset(tmp_path / "resumed")
    assert len(rendered) == sum(TINY_SIZES.values())


def test_other_sizes_replace_a_generated_set(tmp_path):
    root = tiny_dataset(tmp_path)
    generate_synthetic(root, n_train=11, n_valid=10, n_test=10, progress=False)
    assert len(read_examples(root / "nsynth-train")) == 11
    assert len(list((root / "nsynth-train" / "audio").iterdir())) == 11


def test_foreign_dataset_is_left_alone(tmp_path):
    (tmp_path / "nsynth-train").mkdir()
    with pytest.raises(FileExistsError, match="did not write"):
        tiny_dataset(tmp_path)


@pytest.mark.parametrize("sizes", [{"n_train": 0}, {"n_test": 10 * 3 * 100 * 16 + 1}], ids=["empty", "too-many"])
def test_sizes_are_checked(tmp_path, sizes):
    with pytest.raises(ValueError, match="must be between 1 and"):
        generate_synthetic(tmp_path, **{**TINY_SIZES, **sizes}, progress=False)


def test_builtin_dataset_is_prepared_once(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.BUILTIN_SIZES, "n_train", 11)
    monkeypatch.setitem(synthetic.BUILTIN_SIZES, "n_valid", 10)
    monkeypatch.setitem(synthetic.BUILTIN_SIZES, "n_test", 10)
    monkeypatch.setenv("RNN_FAST_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    cache_dir = ensure_builtin_dataset(progress=False)
    assert [len(load_split(cache_dir, split)) for split in SPLITS] == [10, 10, 10]

    def must_not_run(*args):
        raise AssertionError("the built-in dataset was built again")

    monkeypatch.setattr(synthetic, "render_note", must_not_run)
    monkeypatch.setattr(cache, "_fill_chunk", must_not_run)
    assert ensure_builtin_dataset(progress=False) == cache_dir
