"""Accuracy, confusion matrix and per-class accuracy against scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import recall_score

from rnn_fast.nsynth.training.metrics import accuracy, confusion_matrix, per_class_accuracy


@pytest.mark.parametrize("num_classes,count,seed", [(10, 257, 0), (4, 31, 1), (7, 5, 2)],
                         ids=["C10-N257", "C4-N31", "C7-N5"])
def test_metrics_match_scikit_learn(num_classes, count, seed):
    rng = np.random.default_rng(seed)
    # The last class never occurs as a true label: its per-class accuracy is undefined.
    y_true = rng.integers(0, num_classes - 1, count)
    y_pred = np.where(rng.random(count) < 0.6, y_true, rng.integers(0, num_classes, count))
    labels = list(range(num_classes))
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    np.testing.assert_array_equal(confusion, sklearn_confusion_matrix(y_true, y_pred, labels=labels))
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-15)
    np.testing.assert_allclose(per_class_accuracy(confusion),
                               recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan),
                               rtol=1e-15)
