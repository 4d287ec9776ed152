"""Instrument-family probabilities of WAV files from a checkpoint of ``examples/train_nsynth.py`` (the command line
is ``examples/predict.py``)."""
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from .data import CLIP_SAMPLES, SAMPLE_RATE, read_wav
from .training.checkpoint import load_classifier
from .training.engine import predict_logits


def read_clip(path: Path) -> np.ndarray:
    """The first second of ``path`` as int16 ``[CLIP_SAMPLES]``, zero-padded when the file is shorter."""
    samples, _ = read_wav(path, CLIP_SAMPLES, expected_rate=SAMPLE_RATE)
    if len(samples) < CLIP_SAMPLES:
        print(f"{path}: {len(samples)} samples, padded with silence to {CLIP_SAMPLES}", file=sys.stderr)
    return np.pad(samples, (0, CLIP_SAMPLES - len(samples)))


def predict_files(checkpoint: Path, paths: List[Path], device: torch.device, backend: str = "auto",
                  batch_size: int = 256) -> Dict[str, Dict[str, float]]:
    """``{file: {family: probability}}`` in the order of ``paths``."""
    model, classes = load_classifier(checkpoint, device, backend)
    clips = np.stack([read_clip(path) for path in paths])
    probabilities = torch.softmax(torch.from_numpy(predict_logits(model, clips, batch_size, device)), dim=1)
    return {str(path): dict(zip(classes, row.tolist())) for path, row in zip(paths, probabilities)}


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    classes = list(next(iter(results.values())))
    name_width = max(len("file"), *(len(name) for name in results))
    column = max(len(name) for name in classes)
    lines = [f"{'file':<{name_width}}  {'prediction':<{column}}  " + " ".join(f"{c:>{column}}" for c in classes)]
    for name, probabilities in results.items():
        prediction = max(probabilities, key=probabilities.get)
        lines.append(f"{name:<{name_width}}  {prediction:<{column}}  "
                     + " ".join(f"{probabilities[c]:>{column}.3f}" for c in classes))
    return "\n".join(lines)
