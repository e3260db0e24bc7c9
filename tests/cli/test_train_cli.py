"""User mistakes in the training entry: one line on stderr, exit code 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from ftprof.cli.train import main
from tests.conftest import ROOT


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.csv").write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    (d / "dev.csv").write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(6)))
    return d


def run_main(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(capsys, argv, pattern, out_dir):
    code, err = run_main(capsys, argv + ["--output_dir", str(out_dir)])
    assert code == 2
    assert len(err) >= 1
    assert err[-1].startswith("ftprof: error: ")
    assert "Traceback" not in "\n".join(err)
    import re

    assert re.search(pattern, err[-1]), err[-1]
    assert not out_dir.exists()  # failed before anything was written


def test_invalid_json_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2}')
    assert_one_line_error(
        capsys,
        ["--model", "tiny-bert", "--dataset", "synthetic", "--ds_config", str(bad)],
        r"bad\.json' is not valid JSON: .* line 1, column 35",
        tmp_path / "out",
    )


def test_unknown_zero_stage(tmp_path, capsys):
    bad = tmp_path / "z5.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    assert_one_line_error(
        capsys,
        ["--model", "tiny-bert", "--dataset", "synthetic", "--deepspeed", str(bad)],
        "unknown ZeRO stage 5",
        tmp_path / "out",
    )


def test_missing_config_file(tmp_path, capsys):
    assert_one_line_error(
        capsys, ["--model", "tiny-bert", "--ds_config", str(tmp_path / "zero9.json")], "no such file", tmp_path / "out"
    )


def test_fp16_on_cpu(tmp_path, capsys):
    assert_one_line_error(
        capsys,
        ["--model", "tiny-bert", "--dataset", "synthetic", "--fp16"],
        "--fp16 needs a CUDA GPU",
        tmp_path / "out",
    )


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--label_column", "stars"], "--label_column 'stars' is not a column"),
        (["--max_length", "0"], "--max_length must be a positive"),
        (["--max_length", "600"], "--max_length 600 is above 'tiny-bert''s limit of 512"),
        (["--max_train_samples", "-3"], "--max_train_samples must be positive"),
        (
            ["--load_best_model_at_end", "--save_strategy", "no"],
            "--load_best_model_at_end needs a checkpoint at each evaluation, but --save_strategy 'no'",
        ),
        (["--metric", "accuracy"], "--metric 'accuracy' isn't available offline.*drop --metric"),
    ],
)
def test_bad_flags_and_columns(tmp_path, capsys, data_dir, extra, pattern):
    assert_one_line_error(
        capsys, ["--model", "tiny-bert", "--dataset", str(data_dir)] + extra, pattern, tmp_path / "out"
    )


def test_an_8bit_optimizer_without_bitsandbytes_is_refused_before_loading(tmp_path, capsys, data_dir, monkeypatch):
    from tests.cli.test_sweep_report_errors import without_bitsandbytes

    without_bitsandbytes(monkeypatch)
    flags = ["--model", "tiny-bert", "--dataset", str(data_dir), "--zero", "none", "--optim", "adamw_bnb_8bit"]
    pattern = r"--optim adamw_bnb_8bit needs bitsandbytes.*pip install 'ftprof\[bnb\]'"
    assert_one_line_error(capsys, flags, pattern, tmp_path / "out")


def test_non_integer_labels(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nok,pos\n")
    assert_one_line_error(
        capsys,
        ["--model", "tiny-bert", "--dataset", str(tmp_path / "train.csv")],
        "must be integers 0..K-1, got text values like '(pos|neg)'",
        tmp_path / "out",
    )


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\n")
    assert_one_line_error(
        capsys, ["--model", "tiny-bert", "--dataset", str(tmp_path / "train.csv")], "split is empty", tmp_path / "out"
    )


def test_unreachable_model(tmp_path, capsys):
    assert_one_line_error(
        capsys,
        ["--model", "bert-base-uncased", "--dataset", "synthetic"],
        "Hub is unreachable.*--random_init",
        tmp_path / "out",
    )


def test_existing_checkpoints_are_not_overwritten(tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    code, err = run_main(
        capsys, ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
    )
    assert code == 2
    assert "already holds checkpoints (checkpoint-5)" in err[-1]
    assert "--resume_from_checkpoint true" in err[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-5"]


def test_resume_without_checkpoint(tmp_path, capsys):
    code, err = run_main(
        capsys,
        [
            "--model",
            "tiny-bert",
            "--dataset",
            "synthetic",
            "--resume_from_checkpoint",
            "true",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    assert code == 2
    assert "no complete checkpoint-* folder" in err[-1]


def test_launch_script_prints_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--model",
            "tiny-bert",
            "--ds_config",
            str(bad),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ftprof: error: --ds_config")
    assert "Traceback" not in proc.stderr


def test_help_lists_training_arguments_and_ours():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for flag in (
        "--ds_config",
        "--model",
        "--max_length",
        "--random_init",
        "--per_device_train_batch_size",
        "--gradient_accumulation_steps",
        "--bf16",
        "--resume_from_checkpoint",
        "--group_by_length",
        "--precision {fp32,fp16,bf16}",
        "--zero ZERO",
        "--offload {none,optimizer,optimizer+param}",
    ):
        assert flag in proc.stdout


def test_cpu_runs_get_overlap_comm_off_in_a_shared_copy():
    import json

    from ftprof.train.run import _flag_value, _normalize_deepspeed_flags

    argv = _normalize_deepspeed_flags(["--model", "tiny-bert", "--ds_config", str(ROOT / "ds_configs" / "zero2.json")])
    assert "--ds_config" not in argv
    assert argv[:2] == ["--model", "tiny-bert"]
    effective = json.loads(Path(_flag_value(argv, "--deepspeed")).read_text())
    shipped = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    assert effective["zero_optimization"].pop("overlap_comm") is False
    assert shipped["zero_optimization"].pop("overlap_comm") is True  # the file itself is untouched
    assert effective == shipped
    # Every rank derives the same path from the same content.
    assert _normalize_deepspeed_flags(["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")])[-1] == argv[-1]


def test_zero_and_offload_choose_the_shipped_config(tmp_path):
    """--zero N --offload X without --ds_config trains with ds_configs/ 's file for them (on a CPU with
    overlap_comm off, as every CPU run), and --precision sets Trainer's switch."""
    import json

    from ftprof.runtime.deepspeed_config import cpu_adjusted, load_ds_config
    from ftprof.train.run import parse

    base = ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
    for flags, shipped in (
        (["--zero", "2", "--precision", "bf16"], "zero2.json"),
        (["--zero", "3", "--offload", "optimizer+param"], "zero3_offload.json"),
        (["--zero=1"], "zero1.json"),
    ):
        script, args = parse([*base, *flags])
        expected = cpu_adjusted(load_ds_config(ROOT / "ds_configs" / shipped), cuda=False).config
        assert json.loads(Path(args.deepspeed).read_text()) == expected, flags
        assert args.bf16 == ("bf16" in flags)
        assert not args.fp16
    assert (script.zero, script.offload, script.precision) == ("1", None, None)
    _, args = parse([*base, "--precision", "fp32"])
    assert not args.bf16
    assert not args.fp16
    assert args.deepspeed is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--zero", "3", "--ds_config", "ds_configs/zero2.json"],
            "--zero 3 contradicts --ds_config 'ds_configs/zero2.json', which sets ZeRO stage 2; drop one of them",
        ),
        (
            ["--offload", "optimizer", "--deepspeed", "ds_configs/zero2.json"],
            "--offload optimizer contradicts --deepspeed 'ds_configs/zero2.json', which offloads nothing; "
            "drop one of them",
        ),
        (["--precision", "fp32", "--bf16"], "--precision fp32 and --bf16 disagree; pass one of them"),
        (["--precision", "bf16", "--bf16", "false"], "--precision bf16 and --bf16 false disagree; pass one of them"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU and this machine has none; use bf16 or fp32"),
        (["--zero", "0,2"], "--zero '0,2': ftprof train takes one value (lists are for ftprof sweep and estimate)"),
        (["--offload", "optimizer"], "--offload optimizer needs --zero (1, 2 or 3) or a --ds_config that offloads"),
        (["--zero", "2", "--offload", "optimizer+param"], "--offload optimizer+param needs ZeRO stage 3, not 2"),
        (
            ["--zero", "none", "--ds_config", "ds_configs/zero2.json"],
            "--zero none (no DeepSpeed) contradicts --ds_config 'ds_configs/zero2.json'; drop one of them",
        ),
        (["--zero", "none", "--offload", "optimizer"], "--offload optimizer needs DeepSpeed; --zero none offloads"),
        (["--zero", "four"], "--zero 'four': use none (no DeepSpeed) or ZeRO stages 0, 1, 2, 3"),
    ],
)
def test_levers_that_contradict_each_other_or_the_config(tmp_path, capsys, extra, message):
    code, err = run_main(
        capsys,
        ["--model", "tiny-bert", "--dataset", "synthetic", *extra, "--output_dir", str(tmp_path / "out")],
    )
    assert code == 2, err
    assert err[-1].startswith(f"ftprof: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_zero_none_trains_with_hf_trainer_and_its_optim(tmp_path):
    """--zero none --optim NAME (the command a --zero none sweep point recommends): no DeepSpeed config, the
    Trainer's own optimizer."""
    from ftprof.train.run import parse

    base = ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
    script, args = parse([*base, "--zero", "none", "--optim", "sgd", "--precision", "fp32"])
    assert (script.zero, args.deepspeed, args.optim) == ("none", None, "sgd")


def test_an_agreeing_config_and_switch_are_fine(tmp_path):
    from ftprof.train.run import parse

    script, args = parse(
        ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
        + ["--zero", "2", "--offload", "optimizer", "--ds_config", str(ROOT / "ds_configs" / "zero2_offload.json")]
        + ["--precision", "bf16", "--bf16"]
    )
    assert (script.zero, script.offload, args.bf16) == ("2", "optimizer", True)
    assert args.hf_deepspeed_config.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
