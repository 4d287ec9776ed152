"""Helpers shared by the NSynth tests."""
import wave
from pathlib import Path

import numpy as np

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
