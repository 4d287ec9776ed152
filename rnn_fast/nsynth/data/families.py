"""NSynth names and the constants shared by the reader, the cache, the generator and the loader."""
from typing import Tuple

FAMILIES: Tuple[str, ...] = (
    "bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead", "vocal",
)
# synth_lead has no valid or test examples in the official release, so it cannot be evaluated and is not trained.
DROPPED_FAMILIES: Tuple[str, ...] = ("synth_lead",)
CLASSES: Tuple[str, ...] = tuple(f for f in FAMILIES if f not in DROPPED_FAMILIES)
SOURCES: Tuple[str, ...] = ("acoustic", "electronic", "synthetic")
QUALITIES: Tuple[str, ...] = (
    "bright", "dark", "distortion", "fast_decay", "long_release",
    "multiphonic", "nonlinear_env", "percussive", "reverb", "tempo-synced",
)
SPLITS: Tuple[str, ...] = ("train", "valid", "test")

SAMPLE_RATE = 16000
NOTE_SAMPLES = 4 * SAMPLE_RATE  # every official note lasts 4 s
CLIP_SAMPLES = SAMPLE_RATE      # the classifier sees the first second only
FRAME_SIZE = 160                # 10 ms frames
FRAMES = CLIP_SAMPLES // FRAME_SIZE  # 100

NO_CLASS = -1


def class_index(family: str) -> int:
    """Class index of a family name, ``NO_CLASS`` for a dropped family; ``ValueError`` for an unknown name."""
    if family in DROPPED_FAMILIES:
        return NO_CLASS
    if family not in CLASSES:
        raise ValueError(f"unknown NSynth instrument family {family!r}; expected one of {FAMILIES}")
    return CLASSES.index(family)


def split_dir_name(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"nsynth-{split}"


def make_note_str(family: str, source: str, instrument_number: int, pitch: int, velocity: int) -> str:
    """``guitar_acoustic_001-082-050``: the official key of one note."""
    return f"{make_instrument_str(family, source, instrument_number)}-{pitch:03d}-{velocity:03d}"


def make_instrument_str(family: str, source: str, instrument_number: int) -> str:
    return f"{family}_{source}_{instrument_number:03d}"
