"""Bad input to `ftprof sweep` / `ftprof report`: one line, exit 2, and no results file touched."""

import pytest

from ftprof.cli import report as report_cli
from ftprof.cli import sweep as sweep_cli
from ftprof.cli.main import main as ftprof_main


def one_line_error(capsys, fn, argv, pattern):
    import re

    code = fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err, err
    assert err[-1].startswith("ftprof: error: "), err
    assert re.search(pattern, err[-1]), err[-1]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--model", "no-such/model-anywhere"], "architecture is not known offline"),
        (["--model", "tiny-bert", "--batch_sizes", "8,0"], "--batch_sizes '8,0': '0' is not a positive integer"),
        (["--model", "tiny-bert", "--seq_lens", "128,abc"], "--seq_lens .*'abc' is not a positive integer"),
        (["--model", "tiny-bert", "--precision", "fp32,int4"], "unknown precision 'int4'"),
        (["--model", "tiny-bert", "--precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--model", "tiny-bert", "--budget", "a lot"], "--budget 'a lot': not a size"),
        (["--model", "tiny-bert", "--zero", "5"], "--zero '5': use none \\(no DeepSpeed\\) or ZeRO stages 0, 1, 2, 3"),
        (["--model", "tiny-bert", "--zero", "none", "--optim", "adamw_magic"], "--optim 'adamw_magic': not one of"),
        (["--model", "tiny-bert", "--steps", "0"], "--steps must be positive"),
        (["--model", "tiny-bert", "--min_seconds", "-1"], "--min_seconds must be non-negative"),
        (["--model", "tiny-bert", "--offload", "gpu"], "unknown offload 'gpu'"),
        (["--model", "tiny-bert", "--zero", "0,2", "--offload", "optimizer+param"], "needs ZeRO stage 3"),
        (["--model", "tiny-bert", "--gradient_checkpointing", "maybe"], "'maybe' is not on or off"),
        (["--model", "tiny-llama", "--seq_lens", "256,1024"], "--seq_lens 1024 is above 'tiny-llama''s limit of 512"),
        (["--model", "tiny-bert", "--lora_r", "8"], "--lora_r applies to --peft lora only; add --peft lora"),
        (["--model", "tiny-bert", "--peft", "qlora"], "--peft 'qlora': use none, lora, or none,lora"),
        (["--model", "tiny-bert", "--peft", "lora", "--lora_r", "8,0"], "--lora_r '8,0': '0' is not a positive"),
        (["--model", "tiny-bert", "--peft", "lora", "--lora_dropout", "1.5"], "--lora_dropout 1.5: must be >= 0"),
        (
            ["--model", "tiny-bert", "--peft", "none,lora", "--lora_target_modules", "q_proj"],
            r"--lora_target_modules.*q_proj.*(query|value)",
        ),
        (
            ["--model", "tiny-bert", "--ds_config", "ds_configs/zero2_offload.json", "--offload", "none"],
            "offloads already",
        ),
    ],
)
def test_sweep_rejects_bad_input_before_running(tmp_path, capsys, extra, pattern):
    out = tmp_path / "sweep"
    one_line_error(capsys, sweep_cli.main, extra + ["--out", str(out)], pattern)
    assert not out.exists()


def without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make bitsandbytes look uninstalled, as on a machine without it (it may be importable here)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else real(name, *args)
    )


@pytest.mark.parametrize("optim", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_a_torchao_optimizer_without_it_is_refused_with_the_install_line(tmp_path, capsys, monkeypatch, optim):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    out = tmp_path / "sweep"
    extra = ["--model", "tiny-bert", "--zero", "none", "--optim", optim, "--out", str(out)]
    one_line_error(capsys, sweep_cli.main, extra, rf"--optim {optim} needs torchao.*pip install 'ftprof\[torchao\]'")
    assert not out.exists()


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "lion_8bit", "ademamix"])
def test_a_bitsandbytes_optimizer_without_it_is_refused_with_the_install_line(tmp_path, capsys, monkeypatch, optim):
    without_bitsandbytes(monkeypatch)
    out = tmp_path / "sweep"
    extra = ["--model", "tiny-bert", "--zero", "none", "--optim", optim, "--out", str(out)]
    one_line_error(capsys, sweep_cli.main, extra, rf"--optim {optim} needs bitsandbytes.*pip install 'ftprof\[bnb\]'")
    assert not out.exists()


def test_existing_results_are_never_overwritten(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("this is not json\n{}\n")
    before = results.read_text()
    one_line_error(
        capsys, sweep_cli.main, ["--model", "tiny-bert", "--out", str(tmp_path)], "already exists; pass --resume"
    )
    one_line_error(
        capsys,
        sweep_cli.main,
        ["--model", "tiny-bert", "--out", str(tmp_path), "--resume"],
        r"holds results without sweep.json",  # nothing says how those points were measured
    )
    one_line_error(capsys, report_cli.main, [str(tmp_path)], r"results.jsonl:1 is not valid JSON")
    assert results.read_text() == before


def test_report_of_foreign_schema_and_missing_file(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"schema": "someone-else/3"}\n')
    one_line_error(capsys, report_cli.main, [str(tmp_path)], "has schema 'someone-else/3'")
    one_line_error(capsys, report_cli.main, [str(tmp_path / "nope")], "no results file")


def test_top_level_dispatch(capsys):
    assert ftprof_main(["--help"]) == 0
    assert "sweep" in capsys.readouterr().out
    assert ftprof_main(["frobnicate"]) == 2


# One vocabulary: the lever flags take the same values, spelled the same, in sweep, estimate and train.
SHARED = ["--task", "classification", "--precision", "bf16", "--zero", "2", "--offload", "optimizer"]


def test_the_same_flags_mean_the_same_in_sweep_estimate_and_train(tmp_path, capsys):
    from ftprof.cli.estimate import main as estimate_main
    from ftprof.train.run import parse

    a = sweep_cli.build_parser().parse_args(["--model", "tiny-bert", *SHARED, "--batch_sizes", "4", "--seq_lens", "64"])
    points, _ = sweep_cli.plan_from_args(a, cuda=False, bf16_ok=True)
    assert [p.key for p in points] == ["bf16-z2-w1-ga1-s64-b4-off_optimizer"]

    assert estimate_main(["--model", "tiny-bert", *SHARED, "--batch_size", "4", "--seq_len", "64"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 x seq 64, bf16, ZeRO-2, 1 rank(s)" in " ".join(out.split())
    assert "(Adam moments) (host memory, offloaded)" in " ".join(out.split())

    script, args = parse(["--model", "tiny-bert", "--dataset", "synthetic", *SHARED, "--output_dir", str(tmp_path)])
    assert (script.task, script.precision, script.zero, script.offload) == ("classification", "bf16", "2", "optimizer")
    zero = args.hf_deepspeed_config.config["zero_optimization"]
    assert args.bf16
    assert not args.fp16
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "cpu"


def run_command_of(command: str, tmp_path):
    """``main`` of the command, and the flags it needs besides the one under test."""
    from ftprof.cli.estimate import main as estimate_main
    from ftprof.cli.train import main as train_main

    return {
        "sweep": (sweep_cli.main, ["--model", "tiny-bert", "--out", str(tmp_path / "sweep")]),
        "estimate": (estimate_main, ["--model", "tiny-bert"]),
        "train": (train_main, ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "t")]),
    }[command]


@pytest.mark.parametrize("command", ["sweep", "estimate", "train"])
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--zero", "5", "--zero '5': use none (no DeepSpeed) or ZeRO stages 0, 1, 2, 3"),
        ("--precision", "int4", "--precision 'int4': unknown precision 'int4'; use fp32, fp16 or bf16"),
        ("--offload", "gpu", "--offload 'gpu': unknown offload 'gpu'; use none, optimizer or optimizer+param"),
        ("--task", "translation", "--task 'translation': unknown task; use classification or causal-lm"),
    ],
)
def test_a_bad_lever_value_is_the_same_one_line_error_in_every_command(tmp_path, capsys, command, flag, value, message):
    main, argv = run_command_of(command, tmp_path)
    code = main([*argv, flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1] == f"ftprof: error: {message}", err
    assert "Traceback" not in "\n".join(err)
    assert "usage:" not in "\n".join(err)
    assert not (tmp_path / "sweep").exists()
    assert not (tmp_path / "t").exists()


def test_help_shows_the_argument_groups(capsys):
    from ftprof.cli.estimate import build_parser as estimate_parser

    sweep_help = sweep_cli.build_parser().format_help()
    for group in (
        "model:",
        "grid (each a comma list):",
        "levers (each a comma list",
        "execution:",
        "Slurm (",
        "output:",
    ):
        assert group in sweep_help
    estimate_help = estimate_parser().format_help()
    assert "levers (each a comma list" in estimate_help
    assert "--zero none,0,1,2,3" in estimate_help  # none: plain Trainer, in estimate only
    assert "--zeros" not in estimate_help
    assert "--offload_optimizer" not in estimate_help
