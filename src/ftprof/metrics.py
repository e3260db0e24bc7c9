"""Accuracy and F1 from predictions, in numpy: no ``evaluate.load`` and so no network."""

from __future__ import annotations

import numpy as np


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and F1: binary F1 of class 1 for two classes, macro F1 otherwise.

    >>> classification_metrics(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]), 2)
    {'accuracy': 0.75, 'f1': 0.8}
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    accuracy = float((predictions == labels).mean()) if labels.size else 0.0
    classes = [1] if num_labels == 2 else range(num_labels)
    f1s = []
    for c in classes:
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": round(accuracy, 6), "f1": round(float(np.mean(f1s)), 6)}


def argmax_logits(logits, labels):
    """``preprocess_logits_for_metrics``: keep class ids, not logits, across eval steps."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)
