"""The launcher's best-model defaults give way to the eval/save strategies the user sets (parse only, no training)."""

import logging

import pytest

from ftprof.errors import ConfigError
from ftprof.train.args import best_model_conflict
from ftprof.train.run import parse
from tests.conftest import ROOT


def parse_with(tmp_path, *extra):
    return parse(["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out"), *extra])


def test_defaults_keep_the_best_model_by_accuracy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ftprof.train.run")
    _, args = parse_with(tmp_path)
    assert (args.eval_strategy, args.save_strategy) == ("epoch", "epoch")
    assert args.load_best_model_at_end is True
    assert (args.metric_for_best_model, args.greater_is_better) == ("accuracy", True)
    assert "load_best_model_at_end" not in caplog.text


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--save_strategy", "no"], "--save_strategy 'no' saves no checkpoint to restore"),
        (["--eval_strategy", "no"], "--eval_strategy 'no' never evaluates during training"),
        # Save stays "epoch" (we don't move the user's checkpoints to every 5 steps): the best model is off.
        (
            ["--eval_strategy", "steps", "--eval_steps", "5"],
            "--eval_strategy 'steps' and --save_strategy 'epoch' differ",
        ),
        (["--save_strategy", "steps"], "--eval_strategy 'epoch' and --save_strategy 'steps' differ"),
        (
            ["--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", "5", "--save_steps", "7"],
            "--save_steps 7 is not a multiple of --eval_steps 5",
        ),
    ],
)
def test_strategies_that_rule_out_the_best_model_turn_it_off(tmp_path, caplog, extra, reason):
    caplog.set_level(logging.INFO, logger="ftprof.train.run")
    _, args = parse_with(tmp_path, *extra)
    assert args.load_best_model_at_end is False
    lines = [r.getMessage() for r in caplog.records if "load_best_model_at_end" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert reason in lines[0], caplog.text


def test_what_the_user_set_is_kept(tmp_path):
    _, args = parse_with(tmp_path, "--eval_strategy", "steps", "--eval_steps", "5")
    assert (args.eval_strategy, args.eval_steps, args.save_strategy) == ("steps", 5, "epoch")
    assert args.metric_for_best_model == "accuracy"  # still tracked: evaluations run, the best is recorded


def test_no_evaluation_also_drops_the_default_metric(tmp_path):
    _, args = parse_with(tmp_path, "--eval_strategy", "no")
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (False, None, None)


def test_an_explicit_metric_for_best_model_is_kept(tmp_path):
    _, args = parse_with(tmp_path, "--eval_strategy", "no", "--metric_for_best_model", "f1")
    assert (args.load_best_model_at_end, args.metric_for_best_model) == (False, "f1")


def test_matching_steps_keep_the_best_model(tmp_path):
    # --save_steps defaults to 500, a multiple of 5.
    _, args = parse_with(tmp_path, "--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", "5")
    assert args.load_best_model_at_end is True


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (
            ["--load_best_model_at_end", "--save_strategy", "no"],
            "--load_best_model_at_end needs a checkpoint at each evaluation, but --save_strategy 'no' saves no "
            "checkpoint to restore; pass --save_strategy epoch, or drop --load_best_model_at_end",
        ),
        (
            ["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--eval_steps", "5"],
            "--eval_strategy 'steps' and --save_strategy 'epoch' differ; pass --save_strategy steps with --save_steps "
            "a multiple of 5, or drop --load_best_model_at_end",
        ),
        (
            ["--eval_strategy=no", "--load_best_model_at_end=true"],
            "--eval_strategy 'no' never evaluates .*; evaluate with --eval_strategy epoch \\(or steps\\), or drop "
            "--load_best_model_at_end",
        ),
    ],
)
def test_an_explicit_load_best_model_at_end_that_cannot_work_is_an_error(tmp_path, extra, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_with(tmp_path, *extra)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flag", [["--load_best_model_at_end", "false"], ["--no_load_best_model_at_end"]])
def test_an_explicit_no_is_no_conflict(tmp_path, flag):
    _, args = parse_with(tmp_path, *flag, "--save_strategy", "no")
    assert args.load_best_model_at_end is False


def test_conflict_rules_match_trainer():
    assert best_model_conflict("epoch", "epoch", None, 500, 10) is None
    assert best_model_conflict("steps", "best", 5, 7, 10) is None  # "best" saves on evaluations by definition
    assert best_model_conflict("steps", "steps", None, 30, 10) is None  # eval every --logging_steps
    assert best_model_conflict("steps", "steps", None, 25, 10).reason == (
        "--save_steps 25 is not a multiple of --eval_steps 10"
    )
    assert best_model_conflict("steps", "steps", 0.1, 0.3, 10) is None  # ratios
    assert best_model_conflict("steps", "steps", 0.1, 5, 10) is not None  # ratio and absolute: Trainer refuses


def test_bf16_with_deepspeed_parses_on_a_cpu(tmp_path):
    """transformers accepts --bf16 only on a GPU or with use_cpu (which turns DeepSpeed off); DeepSpeed trains
    in bf16 on CPUs, so `--bf16 --ds_config ...` must parse here (it raised "Your setup doesn't support bf16/gpu")."""
    _, args = parse_with(tmp_path, "--bf16", "--ds_config", str(ROOT / "ds_configs" / "zero2.json"))
    assert args.bf16
    assert args.hf_deepspeed_config.config["bf16"]["enabled"] is True
