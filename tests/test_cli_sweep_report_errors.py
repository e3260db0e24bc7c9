"""Bad input to `ftprof sweep` / `ftprof report`: one line, exit 2, and no results file touched."""

import pytest

from ftprof.cli import report as report_cli
from ftprof.cli import sweep as sweep_cli
from ftprof.cli.main import main as ftprof_main


def one_line_error(capsys, fn, argv, pattern):
    import re

    code = fn(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("ftprof: error: "), err
    assert re.search(pattern, err[-1]), err[-1]


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--model", "no-such/model-anywhere"], "architecture is not known offline"),
        (["--model", "tiny-bert", "--batch_sizes", "8,0"], "--batch_sizes '8,0': '0' is not a positive integer"),
        (["--model", "tiny-bert", "--seq_lens", "128,abc"], "--seq_lens .*'abc' is not a positive integer"),
        (["--model", "tiny-bert", "--precision", "fp32,int4"], "unknown precision 'int4'"),
        (["--model", "tiny-bert", "--precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--model", "tiny-bert", "--budget", "a lot"], "--budget 'a lot': not a size"),
        (["--model", "tiny-bert", "--zero", "5"], "unknown ZeRO stage '5'"),
        (["--model", "tiny-bert", "--steps", "0"], "--steps must be positive"),
        (["--model", "tiny-bert", "--min_seconds", "-1"], "--min_seconds must be non-negative"),
        (["--model", "tiny-bert", "--offload", "gpu"], "unknown offload 'gpu'"),
        (["--model", "tiny-bert", "--zero", "0,2", "--offload", "optimizer+param"], "needs ZeRO stage 3"),
        (["--model", "tiny-bert", "--gradient_checkpointing", "maybe"], "'maybe' is not on or off"),
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
