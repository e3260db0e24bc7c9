"""``--metric NAME``: an ``evaluate`` metric beside numpy accuracy/F1, refused in seconds when unavailable."""

import time

import numpy as np
import pytest
from transformers import EvalPrediction

from ftprof.errors import ConfigError
from ftprof.train.metrics import make_compute_metrics
from ftprof.train.run import parse

# A local evaluate metric: accuracy under the key our own accuracy uses, plus the number of correct rows,
# and an ``average`` argument like evaluate's f1 (binary by default).
METRIC_SCRIPT = """
import datasets
import evaluate


class LocalAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy for tests", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary"):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references), "correct": correct, "macro": float(average == "macro")}
"""


@pytest.fixture
def metric_script(tmp_path):
    path = tmp_path / "local_accuracy.py"
    path.write_text(METRIC_SCRIPT)
    return path


def parse_with(tmp_path, *extra):
    return parse(["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out"), *extra])


def test_a_hub_metric_offline_is_one_config_error_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)  # ftprof must turn evaluate offline itself
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        parse_with(tmp_path, "--metric", "accuracy")
    assert time.monotonic() - start < 30  # importing evaluate takes a few seconds; no network retries
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--metric 'accuracy' isn't available offline")
    for fix in ("run once with network", "HF_EVALUATE_OFFLINE=1", "local metric script path", "drop --metric"):
        assert fix in message
    assert not (tmp_path / "out").exists()


def test_a_missing_local_script_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--metric '.*nope\.py': can't load that metric script"):
        parse_with(tmp_path, "--metric", str(tmp_path / "nope.py"))


def test_a_local_metric_script_is_merged_into_the_eval_metrics(tmp_path, metric_script):
    script, _ = parse_with(tmp_path, "--metric", str(metric_script))
    compute = make_compute_metrics(2, script.metric)  # what ftprof.train.run.setup hands Trainer
    preds, labels = np.array([1, 0, 1, 1, 0]), np.array([1, 0, 0, 1, 1])
    scores = compute(EvalPrediction(predictions=preds, label_ids=labels))
    # Ours keep their keys (accuracy 3/5, binary F1 2/3); the metric's "accuracy" is prefixed, others kept.
    assert scores == {"accuracy": 0.6, "f1": 0.666667, "evaluate_accuracy": 0.6, "correct": 3, "macro": 0.0}


def test_more_than_two_classes_get_macro_averaging(metric_script):
    compute = make_compute_metrics(3, str(metric_script))
    scores = compute(EvalPrediction(predictions=np.array([0, 1, 2, 2]), label_ids=np.array([0, 1, 1, 2])))
    assert scores == {"accuracy": 0.75, "f1": round(7 / 9, 6), "evaluate_accuracy": 0.75, "correct": 3, "macro": 1.0}


def test_without_metric_only_numpy_metrics():
    compute = make_compute_metrics(2)
    scores = compute(EvalPrediction(predictions=np.array([1, 0, 1, 1]), label_ids=np.array([1, 0, 0, 1])))
    assert scores == {"accuracy": 0.75, "f1": 0.8}
