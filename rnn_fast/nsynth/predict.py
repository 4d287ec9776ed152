"""Instrument-family probabilities of WAV files from a checkpoint of examples/train_nsynth.py.

  python examples/predict.py --checkpoint runs/nsynth-lstm/checkpoint.pt note.wav [more.wav ...] [--json]

Each WAV must be 16-bit PCM mono at 16 kHz (NSynth's format). The model reads the first second; a shorter
file is padded with silence. Prints one row per file (predicted family and every family's probability), or
with --json an object ``{file: {"prediction": family, "probabilities": {family: p}}}``.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

import rnn_fast
from rnn_fast.nsynth import data as nsynth
from rnn_fast.nsynth.training.engine import load_classifier, predict_logits


def read_clip(path: Path) -> np.ndarray:
    """The first second of ``path`` as int16 ``[CLIP_SAMPLES]``, zero-padded when the file is shorter."""
    samples, _ = nsynth.read_wav(path, nsynth.CLIP_SAMPLES, expected_rate=nsynth.SAMPLE_RATE)
    if len(samples) < nsynth.CLIP_SAMPLES:
        print(f"{path}: {len(samples)} samples, padded with silence to {nsynth.CLIP_SAMPLES}", file=sys.stderr)
    return np.pad(samples, (0, nsynth.CLIP_SAMPLES - len(samples)))


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


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wavs", nargs="+", type=Path, help="16 kHz mono 16-bit WAV files")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/nsynth-lstm/checkpoint.pt"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=rnn_fast.BACKENDS, default="auto", help="rnn_fast.LSTM backend")
    args = parser.parse_args(argv)
    results = predict_files(args.checkpoint, args.wavs, torch.device(args.device), args.backend)
    if args.json:
        print(json.dumps({name: {"prediction": max(p, key=p.get), "probabilities": p}
                          for name, p in results.items()}, indent=2))
    else:
        print(format_table(results))
    return results


if __name__ == "__main__":
    main()
