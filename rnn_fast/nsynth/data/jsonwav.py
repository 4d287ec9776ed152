"""Reading NSynth's official "jsonwav" layout and its WAV files (stdlib ``wave`` + numpy, no audio library)."""
import json
import os
import wave
from pathlib import Path
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np

from .families import split_dir_name

PathLike = Union[str, os.PathLike]

LAYOUT = (
    "ROOT/nsynth-{train,valid,test}/examples.json (a JSON object keyed by note_str) and "
    "ROOT/nsynth-{train,valid,test}/audio/<note_str>.wav (16-bit PCM, mono, 16 kHz)"
)


class DatasetLayoutError(FileNotFoundError):
    """The directory does not follow NSynth's jsonwav layout."""


class WavError(ValueError):
    """A WAV file that cannot be used: unreadable, truncated, or not 16-bit mono at the expected rate."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def split_path(root: PathLike, split: str) -> Path:
    return Path(root) / split_dir_name(split)


def examples_path(split_dir: PathLike) -> Path:
    return Path(split_dir) / "examples.json"


def audio_dir(split_dir: PathLike) -> Path:
    return Path(split_dir) / "audio"


def check_layout(split_dir: PathLike) -> None:
    """``DatasetLayoutError`` naming the expected layout unless ``split_dir`` has examples.json and audio/."""
    _require(examples_path(split_dir), is_dir=False)
    _require(audio_dir(split_dir), is_dir=True)


def read_examples(split_dir: PathLike) -> dict:
    """The ``examples.json`` of one split directory (e.g. ``ROOT/nsynth-train``): ``{note_str: example}``."""
    path = examples_path(split_dir)
    _require(path, is_dir=False)
    try:
        with open(path, "rb") as fh:
            examples = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(examples, dict) or not all(isinstance(ex, dict) for ex in examples.values()):
        raise ValueError(f"{path} must hold a JSON object mapping each note_str to its example object")
    return examples


def read_wav(path: PathLike, max_samples: Optional[int] = None, *, expected_rate: Optional[int] = None,
             min_samples: int = 0) -> Tuple[np.ndarray, int]:
    """``(samples, sample_rate)`` of a 16-bit PCM mono WAV; samples are int16, at most ``max_samples`` of them.

    Reading a prefix still validates the whole file: the header must describe 16-bit mono PCM, the file must
    hold every sample the header declares (so a truncated copy is caught without reading it), the rate must be
    ``expected_rate`` when given, and the header must declare at least ``min_samples`` samples.
    Raises ``WavError`` (with ``.path`` and ``.reason``) or ``FileNotFoundError``.
    """
    with open(path, "rb") as fh:
        try:
            reader = wave.open(fh)
        except (wave.Error, EOFError) as exc:
            raise WavError(path, f"not a readable PCM WAV file ({exc or 'unexpected end of file'})") from None
        with reader:
            channels = reader.getnchannels()
            width = reader.getsampwidth()
            rate = reader.getframerate()
            declared = reader.getnframes()
            # wave.open stops at the start of the sample data, so the rest of the file is what really exists.
            present = (os.fstat(fh.fileno()).st_size - fh.tell()) // (channels * width)
            if channels != 1:
                raise WavError(path, f"has {channels} channels, expected mono")
            if width != 2:
                raise WavError(path, f"has {8 * width}-bit samples, expected 16-bit PCM")
            if present < declared:
                raise WavError(path, f"truncated: header declares {declared} samples, file holds {present}")
            if expected_rate is not None and rate != expected_rate:
                raise WavError(path, f"sample rate is {rate} Hz, expected {expected_rate} Hz")
            if declared < min_samples:
                raise WavError(path, f"holds {declared} samples, expected at least {min_samples}")
            count = declared if max_samples is None else min(declared, max_samples)
            data = reader.readframes(count)
    return np.frombuffer(data, dtype="<i2").astype(np.int16), rate


def read_json_or_none(path: PathLike) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _require(path: Path, is_dir: bool) -> None:
    if not (path.is_dir() if is_dir else path.is_file()):
        kind = "directory" if is_dir else "file"
        raise DatasetLayoutError(f"missing {kind} {path}; expected NSynth's jsonwav layout: {LAYOUT}")


def write_wav(target: Union[PathLike, BinaryIO], samples: np.ndarray, sample_rate: int) -> None:
    """Write int16 mono ``samples`` as a 16-bit PCM WAV to a path or to a binary file open for writing."""
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"expected 1-D int16 samples, got {samples.dtype} with shape {tuple(samples.shape)}")
    with wave.open(os.fspath(target) if isinstance(target, (str, os.PathLike)) else target, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(samples.astype("<i2", copy=False).tobytes())
