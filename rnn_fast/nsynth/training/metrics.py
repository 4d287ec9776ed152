"""Accuracy, the confusion matrix and per-class accuracy of a classifier's predictions, and ``metrics.json``."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each true class (diagonal / row sum); NaN for a class with no examples."""
    totals = confusion.sum(axis=1)
    return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


@dataclass
class Evaluation:
    """Every example's logits (in split order) and the summary metrics derived from them."""
    logits: np.ndarray
    labels: np.ndarray
    loss: float
    accuracy: float

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()

    def confusion(self, num_classes: int) -> np.ndarray:
        return confusion_matrix(self.labels, self.predictions, num_classes)


def metrics_summary(model_name: str, backend: str, evaluation: Evaluation, classes: Sequence[str],
                    counts: Dict[str, int], history: List[dict], recipe: Optional[dict] = None,
                    tested_epoch: Optional[int] = None) -> dict:
    """The content of ``metrics.json``; per-class accuracy is None for a class absent from the test split.
    ``tested_epoch`` is the epoch whose weights were tested (default: the last)."""
    confusion = evaluation.confusion(len(classes))
    per_class = per_class_accuracy(confusion)
    return {
        "model": model_name,
        "backend": backend,
        "recipe": recipe,
        "tested_epoch": tested_epoch or (history[-1]["epoch"] if history else 0),
        "test_accuracy": evaluation.accuracy,
        "per_class_accuracy": {name: (None if math.isnan(value) else float(value))
                               for name, value in zip(classes, per_class)},
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
        "n_train": counts["train"],
        "n_valid": counts["valid"],
        "n_test": counts["test"],
        "history": history,
    }
