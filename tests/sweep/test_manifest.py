"""A resumed sweep must have been measured with the same settings: refused with each difference named."""

import json
from dataclasses import replace

import pytest

from ftprof.errors import ConfigError
from ftprof.sweep.manifest import MANIFEST, SweepSettings, check_or_write

ENV = {"device": "cpu (x86_64)", "torch": "2.13.0", "transformers": "5.24.0", "deepspeed": "0.19.8"}


def settings(**changes):
    base = SweepSettings.of("tiny-bert", steps=3, warmup=1, min_seconds=2.0, dataset=None, ds_config=None, env=ENV)
    return replace(base, **changes)


def test_first_run_writes_and_same_settings_resume(tmp_path):
    check_or_write(tmp_path, settings())
    assert json.loads((tmp_path / MANIFEST).read_text())["model"] == "tiny-bert"
    check_or_write(tmp_path, settings())  # the same flags: fine


def test_other_settings_are_refused_with_each_difference(tmp_path):
    check_or_write(tmp_path, settings())
    with pytest.raises(ConfigError) as err:
        check_or_write(tmp_path, settings(model="gpt2", steps=10, ds_config_sha256="abc"))
    text = str(err.value)
    assert "model: sweep has 'tiny-bert', now 'gpt2'" in text
    assert "steps: sweep has 3, now 10" in text
    assert "ds_config_sha256" in text
    assert "pass another --out" in text


def test_a_ds_config_changes_the_settings():
    a = SweepSettings.of("m", 3, 1, 2.0, None, {"zero_optimization": {"stage": 2}}, ENV)
    b = SweepSettings.of("m", 3, 1, 2.0, None, {"zero_optimization": {"stage": 2, "overlap_comm": False}}, ENV)
    assert a.differences(b)
    assert a.ds_config_sha256 is not None


def test_results_without_settings_are_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match="without sweep.json"):
        check_or_write(tmp_path, settings())


def test_resume_with_another_model_is_one_line_exit_2(tmp_path, capsys):
    from ftprof.cli import sweep as sweep_cli

    out = tmp_path / "s"
    check_or_write(out, settings(model="tiny-gpt2"))
    (out / "results.jsonl").write_text("")
    assert sweep_cli.main(["--model", "tiny-bert", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ftprof: error: ")
    assert "model: sweep has 'tiny-gpt2', now 'tiny-bert'" in err[-1]


def test_lora_adapters_are_fixed_by_the_first_lora_points(tmp_path):
    qv = {"alpha": 16, "dropout": 0.05, "target_modules": None}
    check_or_write(tmp_path, settings())  # full fine-tuning only
    check_or_write(tmp_path, settings(lora=qv))  # its first LoRA points: they fix the adapters
    assert json.loads((tmp_path / MANIFEST).read_text())["lora"] == qv
    check_or_write(tmp_path, settings())  # resumed without LoRA points: nothing to compare
    with pytest.raises(ConfigError, match="lora: sweep has .*'target_modules': None.*now .*'attention,mlp'"):
        check_or_write(tmp_path, settings(lora={**qv, "target_modules": "attention,mlp"}))
