import numpy as np
import torch

from ftprof.train.metrics import argmax_logits, classification_metrics


def test_binary_accuracy_and_f1_by_hand():
    # tp=2 (idx 0, 3), fp=1 (idx 2), fn=1 (idx 4), tn=1 (idx 1): precision 2/3, recall 2/3, F1 2/3.
    preds, labels = np.array([1, 0, 1, 1, 0]), np.array([1, 0, 0, 1, 1])
    assert classification_metrics(preds, labels, 2) == {"accuracy": 0.6, "f1": 0.666667}


def test_macro_f1_for_three_classes():
    preds, labels = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])
    # class 0: F1 1; class 1: tp1 fn1 -> 2/3; class 2: tp1 fp1 -> 2/3; macro = 7/9
    assert classification_metrics(preds, labels, 3) == {"accuracy": 0.75, "f1": round(7 / 9, 6)}


def test_argmax_logits_handles_tuples():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0]])
    assert argmax_logits((logits, None), None).tolist() == [1, 0]
