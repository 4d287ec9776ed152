"""Any audio file people have as the clip the classifier reads: the first second, mono, at 16 kHz.

WAV of any PCM width or float, FLAC, OGG and whatever else libsndfile reads come through ``soundfile``; any channel
count is averaged to mono and any sample rate resampled with ``soxr``. Both are in the ``nsynth`` extra and are
imported on first use, so the training command and the data set's strict reader (``data.read_wav``) do without
them.
"""
import importlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .data import CLIP_SAMPLES, SAMPLE_RATE

PathLike = Union[str, os.PathLike]

CLIP_SECONDS = CLIP_SAMPLES / SAMPLE_RATE
# Read this much past the clip: the resampler's filter spans a few milliseconds, so the end of what is read would
# otherwise bend the clip's last samples away from those of the whole file resampled.
RESAMPLER_MARGIN_SECONDS = 0.05


class AudioFileError(ValueError):
    """A file that cannot be read as audio; ``reason`` says why in words a person can act on."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Clip:
    """float32 ``samples`` ``[CLIP_SAMPLES]`` in [-1, 1] at 16 kHz, zero-padded when the file is shorter, and
    the length of the whole file in ``seconds``."""
    samples: np.ndarray
    seconds: float


def short_clip_warning(seconds: float) -> Optional[str]:
    """What a person should know before trusting the prediction of a file ``seconds`` long, or None."""
    if seconds >= CLIP_SECONDS:
        return None
    padding = 1 - seconds / CLIP_SECONDS
    return (f"only {seconds:.3g} s of audio; the model reads {CLIP_SECONDS:g} s, so {padding:.0%} of what it saw is "
            "padded silence")


def read_clip(path: PathLike) -> Clip:
    """The first second of ``path``, downmixed to mono and resampled to 16 kHz; ``AudioFileError`` when the file
    cannot be read or holds no audio."""
    soundfile = _audio_package("soundfile")
    try:
        # Opened here rather than by libsndfile, which reports a missing file as "System error".
        with open(path, "rb") as handle:
            if not os.fstat(handle.fileno()).st_size:
                raise AudioFileError(path, "empty file (0 bytes)")
            with soundfile.SoundFile(handle) as audio:
                rate, frames = audio.samplerate, audio.frames
                samples = audio.read(math.ceil((CLIP_SECONDS + RESAMPLER_MARGIN_SECONDS) * rate), dtype="float32",
                                     always_2d=True)
    except OSError as exc:
        raise AudioFileError(path, (exc.strerror or str(exc)).lower()) from exc
    except soundfile.LibsndfileError as exc:
        raise AudioFileError(path, f"not a readable audio file ({exc.error_string.rstrip('.').lower()})") from exc
    if not len(samples):
        raise AudioFileError(path, "holds no audio (0 samples)")
    clip = resample(downmix(samples), rate)[:CLIP_SAMPLES]
    return Clip(np.pad(clip, (0, CLIP_SAMPLES - len(clip))), frames / rate)


def downmix(samples: np.ndarray) -> np.ndarray:
    """float32 ``[frames, channels]`` -> ``[frames]``: the mean of the channels (a mono file is returned as is)."""
    return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``rate`` Hz -> at 16 kHz (soxr's high quality; unchanged at 16 kHz)."""
    if rate == SAMPLE_RATE:
        return samples
    return _audio_package("soxr").resample(samples, rate, SAMPLE_RATE).astype(np.float32, copy=False)


def _audio_package(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"reading audio files needs the {name} package: pip install 'rnn_fast[nsynth]'") from exc
