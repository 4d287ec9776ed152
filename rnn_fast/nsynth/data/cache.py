"""The prepared cache: one pass over the WAVs into memory-mappable arrays that the loader serves from.

Layout of ``cache_dir``, per split::

    <split>.audio.npy        int16 [N, CLIP_SAMPLES]  first second of every note (np.load(mmap_mode="r"))
    <split>.labels.npy       int64 [N]  class index into CLASSES (synth_lead is dropped)
    <split>.families.npy     int64 [N]  index into FAMILIES
    <split>.sources.npy      int64 [N]  index into SOURCES
    <split>.pitches.npy      int64 [N]  MIDI pitch
    <split>.velocities.npy   int64 [N]  MIDI velocity
    <split>.instruments.npy  int64 [N]  NSynth instrument id
    manifest.json            version, and per split: note_strs (row order), count, examples.json fingerprint

Rows are in sorted note_str order. ``manifest.json`` is written last, so a split exists once it is listed there.
While a split is being prepared its audio lives in ``<split>.partial/`` with one marker file per finished chunk;
an interrupted or failed ``prepare`` resumes from those markers.
"""
import dataclasses
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write, move_into_place, write_json
from .families import CLASSES, CLIP_SAMPLES, DROPPED_FAMILIES, FAMILIES, SAMPLE_RATE, SOURCES, SPLITS, class_index
from .jsonwav import (LAYOUT, PathLike, WavError, audio_dir, check_layout, examples_path, read_examples,
                      read_json_or_none, read_wav, split_path)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 512
METADATA_FIELDS = ("labels", "families", "sources", "pitches", "velocities", "instruments")
_LISTED_BAD_FILES = 20


@dataclasses.dataclass
class NSynthSplit:
    """One prepared split. ``audio`` is int16 ``[N, CLIP_SAMPLES]`` (an ``np.memmap`` from ``load_split``);
    the metadata arrays are int64 ``[N]``; ``note_strs[i]`` names row ``i``."""
    audio: np.ndarray
    labels: np.ndarray
    families: np.ndarray
    sources: np.ndarray
    pitches: np.ndarray
    velocities: np.ndarray
    instruments: np.ndarray
    note_strs: List[str]

    def __post_init__(self):
        count = len(self.note_strs)
        if self.audio.dtype != np.int16 or self.audio.shape != (count, CLIP_SAMPLES):
            raise ValueError(f"audio must be int16 [{count}, {CLIP_SAMPLES}], got {self.audio.dtype} "
                             f"{list(self.audio.shape)}")
        for name in METADATA_FIELDS:
            if getattr(self, name).shape != (count,):
                raise ValueError(f"{name} must have shape [{count}], got {list(getattr(self, name).shape)}")

    def __len__(self) -> int:
        return len(self.note_strs)


class BadAudioError(ValueError):
    """Some WAV files could not be used. ``bad_files`` maps each path to the reason."""

    def __init__(self, bad_files: Dict[str, str]):
        self.bad_files = dict(sorted(bad_files.items()))
        listed = [f"  {path}: {reason}" for path, reason in list(self.bad_files.items())[:_LISTED_BAD_FILES]]
        if len(self.bad_files) > _LISTED_BAD_FILES:
            listed.append(f"  ... and {len(self.bad_files) - _LISTED_BAD_FILES} more (see .bad_files)")
        super().__init__(
            f"{len(self.bad_files)} unusable audio file(s); every other file is cached. Replace them, or remove "
            "their entries from examples.json, and run prepare again: it resumes where it stopped.\n"
            + "\n".join(listed))


def prepare(root: PathLike, cache_dir: PathLike, splits: Sequence[str] = SPLITS, workers: Optional[int] = None,
            progress: bool = True, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Path:
    """Cache the first second of every note of ``splits`` under ``cache_dir`` and return ``cache_dir``.

    Validates every WAV (readable, 16 kHz, mono, 16-bit, complete, at least one second) and raises
    ``BadAudioError`` naming every bad file after caching all the good ones. Splits already cached from the
    same ``examples.json`` are skipped; an interrupted run resumes by chunks. ``workers`` processes read WAVs
    (default: one per CPU; ``workers <= 1`` reads in this process).
    """
    root = Path(root).resolve()
    cache_dir = Path(cache_dir)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for split in splits:  # fail on a wrong layout before spending time on an earlier split
        check_layout(split_path(root, split))
    cache_dir.mkdir(parents=True, exist_ok=True)
    bad_files: Dict[str, str] = {}
    for split in splits:
        bad_files.update(_prepare_split(split_path(root, split), cache_dir, split, workers, progress, chunk_size))
    if bad_files:
        raise BadAudioError(bad_files)
    return cache_dir


def load_split(cache_dir: PathLike, split: str) -> NSynthSplit:
    """A prepared split with its audio memory-mapped read-only."""
    cache_dir = Path(cache_dir)
    entry = _read_manifest(cache_dir)["splits"].get(split)
    if entry is None:
        raise FileNotFoundError(f"no prepared {split!r} split in {cache_dir}; "
                                "run rnn_fast.nsynth.data.prepare(root, cache_dir) first")
    return NSynthSplit(audio=np.load(_audio_file(cache_dir, split), mmap_mode="r"),
                       note_strs=entry["note_strs"],
                       **{name: np.load(cache_dir / f"{split}.{name}.npy") for name in METADATA_FIELDS})


def save_split(cache_dir: PathLike, split: str, data: NSynthSplit) -> None:
    """Write an in-memory split in cache format (e.g. for benchmarks); ``load_split`` reads it back."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _forget_split(cache_dir, split)
    with atomic_write(_audio_file(cache_dir, split)) as handle:
        np.save(handle, np.ascontiguousarray(data.audio))
    _commit_split(cache_dir, split, list(data.note_strs), {name: getattr(data, name) for name in METADATA_FIELDS},
                  source={})


def _prepare_split(read_dir: Path, cache_dir: Path, split: str, workers: Optional[int], progress: bool,
                   chunk_size: int) -> Dict[str, str]:
    source = _fingerprint(read_dir)
    if _is_cached(cache_dir, split, source):
        return {}
    _forget_split(cache_dir, split)  # its files are about to change; the manifest lists it again when they have
    note_strs, columns = _metadata(read_examples(read_dir), examples_path(read_dir))
    count = len(note_strs)
    work_dir = cache_dir / f"{split}.partial"
    audio_file = work_dir / "audio.npy"
    plan = {"version": CACHE_VERSION, "source": source, "count": count, "chunk_size": chunk_size}
    if read_json_or_none(work_dir / "plan.json") != plan:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir()
        np.lib.format.open_memmap(audio_file, mode="w+", dtype=np.int16, shape=(count, CLIP_SAMPLES)).flush()
        write_json(work_dir / "plan.json", plan, indent=None)

    wav_dir = str(audio_dir(read_dir))
    pending = [(str(audio_file), wav_dir, start, note_strs[start:start + chunk_size])
               for start in range(0, count, chunk_size) if not _chunk_marker(work_dir, start).exists()]
    bad_files: Dict[str, str] = {}
    with tqdm(total=count, initial=count - sum(len(task[3]) for task in pending), desc=f"prepare {split}",
              unit="wav", disable=not progress) as bar:
        for start, done, chunk_bad in _run_chunks(pending, workers):
            if chunk_bad:  # left unmarked: the next run reads this chunk again once the files are fixed
                bad_files.update(chunk_bad)
            else:
                _chunk_marker(work_dir, start).touch()
            bar.update(done)
    if bad_files:
        return bad_files
    move_into_place(audio_file, _audio_file(cache_dir, split))
    _commit_split(cache_dir, split, note_strs, columns, source)
    shutil.rmtree(work_dir)
    return {}


def _fill_chunk(task: Tuple[str, str, int, List[str]]) -> Tuple[int, int, Dict[str, str]]:
    """Read one chunk of WAVs into rows ``start:start+len(note_strs)`` of the partial audio file (in a worker)."""
    audio_file, wav_dir, start, note_strs = task
    rows = np.load(audio_file, mmap_mode="r+")
    bad_files = {}
    for offset, note_str in enumerate(note_strs):
        path = os.path.join(wav_dir, note_str + ".wav")
        try:
            rows[start + offset], _ = read_wav(path, CLIP_SAMPLES, expected_rate=SAMPLE_RATE,
                                               min_samples=CLIP_SAMPLES)
        except FileNotFoundError:
            bad_files[path] = "missing"
        except WavError as exc:
            bad_files[path] = exc.reason
        except OSError as exc:
            bad_files[path] = f"cannot be read ({exc})"
    rows.flush()
    return start, len(note_strs), bad_files


def _run_chunks(tasks: List[tuple], workers: Optional[int]) -> Iterator[Tuple[int, int, Dict[str, str]]]:
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(tasks))
    if workers <= 1:
        yield from map(_fill_chunk, tasks)
        return
    # Workers only run numpy and wave, so forking is safe and avoids re-importing torch in every worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers) as pool:
        yield from pool.imap_unordered(_fill_chunk, tasks)


def _metadata(examples: dict, source_file: Path) -> Tuple[List[str], Dict[str, np.ndarray]]:
    """Sorted note_strs of the kept examples and their metadata columns."""
    note_strs = sorted(key for key, example in examples.items()
                       if _field(example, "instrument_family_str", key, source_file) not in DROPPED_FAMILIES)
    if not note_strs:
        raise ValueError(f"{source_file} lists no examples of the families {CLASSES}")
    columns = {name: np.empty(len(note_strs), dtype=np.int64) for name in METADATA_FIELDS}
    for row, key in enumerate(note_strs):
        example = examples[key]
        family = _named_field(example, "instrument_family_str", FAMILIES, key, source_file)
        columns["labels"][row] = class_index(family)
        columns["families"][row] = FAMILIES.index(family)
        columns["sources"][row] = SOURCES.index(
            _named_field(example, "instrument_source_str", SOURCES, key, source_file))
        columns["pitches"][row] = _field(example, "pitch", key, source_file)
        columns["velocities"][row] = _field(example, "velocity", key, source_file)
        columns["instruments"][row] = _field(example, "instrument", key, source_file)
    return note_strs, columns


def _field(example: dict, name: str, key: str, source_file: Path):
    try:
        return example[name]
    except KeyError:
        raise ValueError(f"{source_file}: example {key} has no {name!r} field; expected NSynth's jsonwav layout: "
                         f"{LAYOUT}") from None


def _named_field(example: dict, name: str, allowed: Sequence[str], key: str, source_file: Path) -> str:
    value = _field(example, name, key, source_file)
    if value not in allowed:
        raise ValueError(f"{source_file}: example {key} has unknown {name} {value!r}; expected one of {allowed}")
    return value


def _audio_file(cache_dir: Path, split: str) -> Path:
    return cache_dir / f"{split}.audio.npy"


def _commit_split(cache_dir: Path, split: str, note_strs: List[str], columns: Dict[str, np.ndarray],
                  source: dict) -> None:
    """Writes the metadata beside the split's audio, already in place, then lists the split in the manifest."""
    for name in METADATA_FIELDS:
        with atomic_write(cache_dir / f"{split}.{name}.npy") as handle:
            np.save(handle, np.ascontiguousarray(columns[name], dtype=np.int64))
    manifest = _read_manifest(cache_dir, missing_ok=True)
    manifest["splits"][split] = {"count": len(note_strs), "note_strs": note_strs, "source": source}
    write_json(cache_dir / MANIFEST, manifest, indent=None)


def _forget_split(cache_dir: Path, split: str) -> None:
    manifest = _read_manifest(cache_dir, missing_ok=True)
    if manifest["splits"].pop(split, None) is not None:
        write_json(cache_dir / MANIFEST, manifest, indent=None)


def _fingerprint(read_dir: Path) -> dict:
    stat = examples_path(read_dir).stat()
    return {"examples_json": str(examples_path(read_dir)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_cached(cache_dir: Path, split: str, source: dict) -> bool:
    entry = _read_manifest(cache_dir, missing_ok=True)["splits"].get(split)
    return (entry is not None and entry["source"] == source
            and all((cache_dir / f"{split}.{name}.npy").is_file() for name in ("audio",) + METADATA_FIELDS))


def _chunk_marker(work_dir: Path, start: int) -> Path:
    return work_dir / f"chunk-{start:09d}.done"


def _read_manifest(cache_dir: Path, missing_ok: bool = False) -> dict:
    manifest = read_json_or_none(cache_dir / MANIFEST)
    if manifest is not None and manifest.get("version") == CACHE_VERSION:
        return manifest
    if missing_ok:  # an older cache version is rebuilt split by split
        return {"version": CACHE_VERSION, "classes": list(CLASSES), "sample_rate": SAMPLE_RATE,
                "clip_samples": CLIP_SAMPLES, "splits": {}}
    found = "missing" if manifest is None else f"version {manifest.get('version')}, expected {CACHE_VERSION}"
    raise FileNotFoundError(f"{cache_dir / MANIFEST} is {found}; run rnn_fast.nsynth.data.prepare(root, cache_dir)")

