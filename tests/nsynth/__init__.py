"""Helpers shared by the NSynth tests."""
import math
import wave
from pathlib import Path

import numpy as np
import soundfile

from rnn_fast.nsynth.data import CLASSES, CLIP_SAMPLES, SAMPLE_RATE, NSynthSplit, generate_synthetic

TINY_SIZES = {"n_train": 22, "n_valid": 10, "n_test": 10}  # two notes per family in train, one per class elsewhere


def tiny_dataset(directory: Path) -> Path:
    return generate_synthetic(directory, **TINY_SIZES, seed=0, progress=False)


def write_raw_wav(path: Path, frames: int, rate: int = SAMPLE_RATE, channels: int = 1, width: int = 2) -> None:
    """A silent PCM WAV of any shape, including those ``write_wav`` refuses (stereo, 8- or 24-bit)."""
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames * channels * width))


def note(rate: int, seconds: float = 1.2, channels: int = 1) -> np.ndarray:
    """The same note sampled at any rate, float32 ``[frames, channels]``: a decaying 330 Hz tone whose 17
    harmonics all lie below 6 kHz, so that resampling to 16 kHz keeps all of it, with a 5 ms fade-in (an abrupt
    onset is not band-limited, and would ring in any resampler). Channels differ from one another by noise that
    sums to zero over them, so their mean is the mono note and a reader that dropped channels would be caught."""
    time = np.arange(round(seconds * rate)) / rate
    tone = np.exp(-3 * time) * sum(np.sin(2 * math.pi * 330 * harmonic * time) / harmonic for harmonic in range(1, 18))
    mono = 0.35 * tone * np.minimum(time / 0.005, 1) ** 2  # peak about 0.6
    weights = np.linspace(-1, 1, channels) if channels > 1 else np.zeros(1)
    noise = np.random.default_rng(0).uniform(-0.2, 0.2, len(time))
    return (mono[:, None] + noise[:, None] * weights[None]).astype(np.float32)


# Files people have, each against the same note written at 16 kHz mono 16-bit: (format, subtype, rate, channels)
FORMATS = {
    "44.1 kHz stereo 16-bit WAV": ("WAV", "PCM_16", 44100, 2),
    "24-bit WAV": ("WAV", "PCM_24", SAMPLE_RATE, 1),
    "32-bit WAV": ("WAV", "PCM_32", SAMPLE_RATE, 1),
    "8-bit WAV": ("WAV", "PCM_U8", SAMPLE_RATE, 1),
    "float WAV": ("WAV", "FLOAT", SAMPLE_RATE, 1),
    "FLAC": ("FLAC", "PCM_16", SAMPLE_RATE, 1),
    "48 kHz 5.1 24-bit FLAC": ("FLAC", "PCM_24", 48000, 6),
    "22.05 kHz mono AIFF": ("AIFF", "PCM_16", 22050, 1),
    "OGG Vorbis": ("OGG", "VORBIS", SAMPLE_RATE, 1),
}


def write_note(path: Path, file_format: str = "WAV", subtype: str = "PCM_16", rate: int = SAMPLE_RATE,
               channels: int = 1, seconds: float = 1.2) -> Path:
    """``note`` as an audio file (``soundfile.write``'s format and subtype names)."""
    soundfile.write(path, note(rate, seconds, channels), rate, format=file_format, subtype=subtype)
    return path


def indexed_split(count: int, seed: int = 0) -> NSynthSplit:
    """Random int16 audio whose sample 0 of row i is i, so a batch tells which rows it holds."""
    rng = np.random.default_rng(seed)
    audio = rng.integers(-32768, 32768, size=(count, CLIP_SAMPLES), dtype=np.int16)
    audio[:, 0] = np.arange(count)
    return NSynthSplit(
        audio=audio, labels=rng.integers(0, len(CLASSES), count), families=rng.integers(0, 11, count),
        sources=rng.integers(0, 3, count), pitches=rng.integers(21, 109, count),
        velocities=rng.integers(0, 128, count), instruments=rng.integers(0, 1000, count),
        note_strs=[f"note-{row}" for row in range(count)])


def rows_of(frames) -> np.ndarray:
    """The row indices of a batch made from ``indexed_split``."""
    return np.rint(frames[:, 0, 0].numpy() * 32768).astype(np.int64)
