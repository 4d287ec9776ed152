"""Instrument-family probabilities of audio files from a checkpoint of ``examples/train_nsynth.py`` (the command
line is ``examples/predict.py``): the files that the arguments name, predictions batch by batch, and their table
and JSON records. Nothing here prints: the command line reports failures and warnings as they come."""
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .audio_files import CLIP_SECONDS, AudioFileError, Clip, read_clip, short_clip_warning
from .training.engine import predict_logits

# What a directory is searched for; a file named on the command line is read whatever its name.
AUDIO_SUFFIXES = (".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")


@dataclass(frozen=True)
class Failure:
    """A file or argument that gave no prediction; ``error`` keeps the exception for ``--debug``."""
    path: str
    reason: str
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class Prediction:
    path: str
    probabilities: Dict[str, float]  # every family, in the checkpoint's class order
    seconds: float  # the whole file's length; the model reads its first second

    @property
    def family(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def warning(self) -> Optional[str]:
        return short_clip_warning(self.seconds)

    def top(self, k: Optional[int] = None) -> Dict[str, float]:
        """The ``k`` most probable families, most probable first; with ``k`` None every family, in class order."""
        if k is None:
            return dict(self.probabilities)
        return dict(sorted(self.probabilities.items(), key=lambda item: -item[1])[:k])

    def record(self, top: Optional[int] = None) -> dict:
        """What ``--json`` writes for the file."""
        return {"path": self.path, "prediction": self.family, "probabilities": self.top(top),
                "seconds": self.seconds, "warning": self.warning}


def expand_inputs(arguments: Iterable[str]) -> Tuple[List[Path], List[Failure]]:
    """The files that the command-line ``arguments`` name, in order and without repeats, and a failure for each
    argument that names none. A directory stands for the audio files below it (by ``AUDIO_SUFFIXES``, sorted); a
    glob pattern that the shell left alone (quoted; ``**`` included) for its matches, as if the shell had expanded
    it."""
    paths: Dict[Path, Path] = {}  # each file as first named, by its resolved path (so named twice, read once)
    failures = []
    for argument in arguments:
        path = Path(argument)
        if path.exists():
            found = _files(path)
        elif glob.has_magic(argument):
            found = [file for match in sorted(glob.glob(argument, recursive=True)) for file in _files(Path(match))]
        else:
            failures.append(Failure(argument, "no such file or directory"))
            continue
        if not found:
            where = "directory holds" if path.exists() else "pattern matches"
            failures.append(Failure(argument, f"{where} no audio file ({', '.join(AUDIO_SUFFIXES)})"))
        for file in found:
            paths.setdefault(file.resolve(), file)
    return list(paths.values()), failures


def _files(path: Path) -> List[Path]:
    if not path.is_dir():
        return [path]
    return sorted(file for file in path.rglob("*") if file.suffix.lower() in AUDIO_SUFFIXES and file.is_file())


def predict_batches(model: nn.Module, classes: Sequence[str], paths: Sequence[Path], device: torch.device,
                    batch_size: int = 256) -> Iterator[List[Union[Prediction, Failure]]]:
    """The outcome of every file, in file order, a batch of ``batch_size`` files at a time (memory holds one
    batch of clips, however many files there are)."""
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        outcomes = [_read(path) for path in batch]
        clips = [outcome for outcome in outcomes if isinstance(outcome, Clip)]
        probabilities = iter(_probabilities(model, clips, device))
        yield [Prediction(str(path), dict(zip(classes, next(probabilities))), outcome.seconds)
               if isinstance(outcome, Clip) else outcome for path, outcome in zip(batch, outcomes)]


def _read(path: Path) -> Union[Clip, Failure]:
    try:
        return read_clip(path)
    except AudioFileError as exc:
        return Failure(str(path), exc.reason, exc)
    except Exception as exc:  # one file that breaks the reader in a way nobody foresaw must not stop the others
        return Failure(str(path), f"unexpected error while reading ({one_line(exc)})", exc)


def one_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _probabilities(model: nn.Module, clips: List[Clip], device: torch.device) -> List[List[float]]:
    if not clips:
        return []
    logits = predict_logits(model, np.stack([clip.samples for clip in clips]), len(clips), device)
    return torch.softmax(torch.from_numpy(logits), dim=1).tolist()


def format_table(predictions: Sequence[Prediction], top: Optional[int] = None) -> str:
    """A row per file: the predicted family, then every family's probability in class order or, with ``top``,
    the ``top`` most probable families as ``family probability`` columns ranked ``#1``, ``#2``, ... A last
    ``note`` column marks the files shorter than the second that the model reads, when there are any."""
    classes = list(predictions[0].probabilities)
    if top is None:
        headers = classes
        cells = [[f"{p:.3f}" for p in prediction.probabilities.values()] for prediction in predictions]
    else:
        headers = [f"#{rank}" for rank in range(1, min(top, len(classes)) + 1)]
        cells = [[f"{name} {p:.3f}" for name, p in prediction.top(top).items()] for prediction in predictions]
    rows = [["file", "prediction", *headers]] + [[prediction.path, prediction.family, *row]
                                                 for prediction, row in zip(predictions, cells)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                        *(cell.rjust(width) for cell, width in zip(row[2:], widths[2:]))]) for row in rows]
    notes = ["note"] + [f"padded: {p.seconds:.3g} s of {CLIP_SECONDS:g} s" if p.warning else "" for p in predictions]
    if any(notes[1:]):
        lines = [f"{line}  {note}".rstrip() for line, note in zip(lines, notes)]
    return "\n".join(lines)
