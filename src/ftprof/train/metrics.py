"""Eval metrics: accuracy and F1 in numpy (always; no network), plus an optional ``evaluate`` metric;
perplexity for causal language models.

Accuracy and F1 are what ``--metric_for_best_model`` needs and what every run reports, so they must work
on an air-gapped machine and cost nothing: a named ``evaluate`` metric is a script fetched from the Hub.
``--metric NAME`` adds one (``accuracy``, ``f1``, ``matthews_correlation``, ... once cached, or a local
metric script), checked by :func:`load_metric` before any model or data is loaded.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ftprof.errors import ConfigError
from ftprof.hub import TRUTHY

if TYPE_CHECKING:
    import torch
    from evaluate import EvaluationModule
    from transformers import EvalPrediction

OWN_KEYS = ("accuracy", "f1")  # ours win; an evaluate metric's key of the same name gets EVALUATE_PREFIX
EVALUATE_PREFIX = "evaluate_"


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


def add_perplexity(metrics: dict[str, Any]) -> dict[str, Any]:
    """Add ``<prefix>_perplexity = exp(<prefix>_loss)`` beside each loss in ``metrics`` (in place; returned too).

    Perplexity is the exponential of the mean per-token cross-entropy: the number of equally likely tokens the
    model is, on average, choosing among (the vocabulary size for a model that knows nothing).

    >>> add_perplexity({"eval_loss": math.log(20.0), "eval_runtime": 1.5})["eval_perplexity"]
    20.0
    """
    for key, value in list(metrics.items()):
        if key.endswith("_loss") and isinstance(value, (int, float)):
            # exp overflows a float past ~709 nats; no real loss gets there, a diverged one might.
            metrics[key[: -len("loss")] + "perplexity"] = round(math.exp(value), 6) if value < 700 else math.inf
    return metrics


def argmax_logits(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep class ids, not logits, across eval steps."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def _offline() -> bool:
    return any(os.environ.get(var, "").lower() in TRUTHY for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def _looks_local(name: str) -> bool:
    return name.endswith(".py") or os.path.isabs(name) or name.startswith(".") or os.path.exists(name)


def load_metric(name: str) -> EvaluationModule:
    """Load ``evaluate`` metric ``name``: a Hub name (from the cache when offline) or a local script path.

    When the Hub is off (``HF_HUB_OFFLINE``, set by ``ftprof.hub.configure_offline_mode``), evaluate is made
    offline too (``HF_EVALUATE_OFFLINE=1``, unless set): it ignores ``HF_HUB_OFFLINE`` and would otherwise
    try the network before it looks in its cache.

    Raises:
        ConfigError: the metric can't be loaded (not cached offline, no such script, a missing package).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY and "HF_EVALUATE_OFFLINE" not in os.environ:
        os.environ["HF_EVALUATE_OFFLINE"] = "1"
        if "evaluate" in sys.modules:  # evaluate reads the variable once, at import
            sys.modules["evaluate"].config.HF_EVALUATE_OFFLINE = True
    import evaluate  # slow (seconds), and only --metric needs it

    try:
        return evaluate.load(name, keep_in_memory=True)  # in memory: ranks don't share cache files
    except ImportError as err:
        raise ConfigError(f"--metric {name!r} needs a package that isn't installed: {_first_line(err)}") from None
    except OSError as err:  # FileNotFoundError and ConnectionError both
        if _looks_local(name):
            raise ConfigError(
                f"--metric {name!r}: can't load that metric script ({_first_line(err)}); pass a .py "
                "file defining an evaluate.Metric subclass, or drop --metric"
            ) from None
        if _offline():
            raise ConfigError(
                f"--metric {name!r} isn't available offline: evaluate has no cached copy and the Hub "
                "is off; run once with network to cache it (HF_EVALUATE_OFFLINE=1 then uses the "
                "cache), pass a local metric script path, or drop --metric (accuracy and F1 are "
                "computed anyway)"
            ) from None
        raise ConfigError(
            f"--metric {name!r}: evaluate can't load it ({_first_line(err)}); check the name (e.g. "
            "accuracy, f1, matthews_correlation), pass a local metric script path, or drop "
            "--metric"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def evaluate_scores(
    metric: EvaluationModule, predictions: np.ndarray, labels: np.ndarray, num_labels: int
) -> dict[str, Any]:
    """``metric`` on class-id predictions, keyed so it never overwrites :func:`classification_metrics`.

    Keys are the metric's own (``matthews_correlation``, ...), except ``accuracy`` and ``f1``, which become
    ``evaluate_accuracy`` / ``evaluate_f1`` beside ours. With more than two classes a metric that takes
    ``average`` (evaluate's f1, precision, recall: binary by default, an error here) gets ``average="macro"``,
    as our F1 does. Numpy scalars become floats and arrays lists, so the results save as JSON.
    """
    kwargs = {}
    if num_labels > 2 and "average" in inspect.signature(metric._compute).parameters:
        kwargs["average"] = "macro"
    result = metric.compute(predictions=np.asarray(predictions), references=np.asarray(labels), **kwargs) or {}
    return {(EVALUATE_PREFIX + key if key in OWN_KEYS else key): _plain(value) for key, value in result.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def make_compute_metrics(num_labels: int, metric_name: str | None = None) -> Callable[[EvalPrediction], dict[str, Any]]:
    """Trainer's ``compute_metrics``: accuracy and F1, plus ``metric_name`` (``--metric``) when given.

    Raises:
        ConfigError: ``metric_name`` can't be loaded (see :func:`load_metric`).
    """
    metric = load_metric(metric_name) if metric_name else None

    def compute(p: EvalPrediction) -> dict[str, Any]:
        predictions, labels = np.asarray(p.predictions), np.asarray(p.label_ids)  # class ids (argmax_logits)
        scores: dict[str, Any] = dict(classification_metrics(predictions, labels, num_labels))
        if metric is not None:
            scores.update(evaluate_scores(metric, predictions, labels, num_labels))
        return scores

    return compute
