"""NSynth for the family classifier: the official jsonwav reader, a memory-mapped cache, a batch loader and a
deterministic synthetic stand-in (see ``ensure_builtin_dataset``)."""
from .cache import BadAudioError, NSynthSplit, load_split, prepare, save_split
from .families import (CLASSES, CLIP_SAMPLES, DROPPED_FAMILIES, FAMILIES, FRAME_SIZE, FRAMES, NOTE_SAMPLES, QUALITIES,
                       SAMPLE_RATE, SOURCES, SPLITS, class_index, make_note_str)
from .jsonwav import DatasetLayoutError, WavError, read_examples, read_wav, write_wav
from .loader import BatchLoader, waveform_to_frames
from .synthetic import BUILTIN_SIZES, default_data_dir, ensure_builtin_dataset, generate_synthetic

__all__ = [
    "FAMILIES", "CLASSES", "DROPPED_FAMILIES", "SOURCES", "QUALITIES", "SPLITS",
    "SAMPLE_RATE", "NOTE_SAMPLES", "CLIP_SAMPLES", "FRAMES", "FRAME_SIZE", "class_index", "make_note_str",
    "read_examples", "read_wav", "write_wav", "DatasetLayoutError", "WavError",
    "prepare", "load_split", "save_split", "NSynthSplit", "BadAudioError",
    "BatchLoader", "waveform_to_frames",
    "generate_synthetic", "ensure_builtin_dataset", "default_data_dir", "BUILTIN_SIZES",
]
