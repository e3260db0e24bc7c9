"""Stale DeepSpeed op build locks: found (old, nobody building), not confused with a live build, refused by
`ftprof sweep` and `ftprof train` in one line before any work, and removed by an explicit build."""

import os
import subprocess
import time

import pytest

from ftprof.cli import sweep as sweep_cli
from ftprof.cli import train as train_cli
from ftprof.errors import ConfigError
from ftprof.runtime import ds_ops
from tests.conftest import ROOT


def make_lock(root, op, age_s):
    folder = root / op
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    past = time.time() - age_s
    os.utime(lock, (past, past))
    return lock


@pytest.fixture
def ext_root(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def test_only_old_locks_nobody_builds_in_are_stale(ext_root):
    killed = make_lock(ext_root, "fused_adam", age_s=600)
    nested = make_lock(ext_root / "py311_cpu", "cpu_adam", age_s=600)  # the layout without TORCH_EXTENSIONS_DIR
    fresh = make_lock(ext_root, "deepspeed_shm_comm", age_s=5)
    building = make_lock(ext_root, "cpu_lion", age_s=600)
    compiler = subprocess.Popen(["sleep", "60"], cwd=building.parent)  # what ninja and the compiler look like
    try:
        assert ds_ops.stale_locks() == sorted([killed, nested])
        assert fresh in ds_ops.stale_locks(older_than_s=1)  # its age alone kept it out above
        assert building not in ds_ops.stale_locks(ext_root, older_than_s=1)
    finally:
        compiler.kill()
        compiler.wait()
    assert building in ds_ops.stale_locks()  # the build is gone: now its lock is stale


def test_sweep_refuses_to_start_on_a_stale_lock(ext_root, tmp_path, capsys):
    lock = make_lock(ext_root, "fused_adam", age_s=600)
    out = tmp_path / "sweep"
    code = sweep_cli.main(["--model", "tiny-bert", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("ftprof: error: a killed DeepSpeed op build left 1 lock file"), err
    assert err[-1].endswith(f"rm {lock}")
    assert not out.exists()
    assert lock.exists()


def test_train_refuses_to_start_on_a_stale_lock(ext_root, tmp_path, capsys):
    lock = make_lock(ext_root, "cpu_adam", age_s=600)
    argv = ["--model", "tiny-bert", "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
    code = train_cli.main([*argv, "--ds_config", str(ROOT / "ds_configs" / "zero2.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].endswith(f"rm {lock}"), err
    assert not (tmp_path / "out").exists()


def test_an_explicit_build_removes_stale_locks_or_refuses_them(ext_root, capsys):
    lock = make_lock(ext_root, "fused_adam", age_s=600)
    with pytest.raises(ConfigError, match=f"rm {lock}"):
        ds_ops.build(ops=(), clear_stale=False)
    assert lock.exists()
    assert ds_ops.build(ops=()) == []
    assert not lock.exists()
    assert f"removing stale build lock {lock}" in capsys.readouterr().err


def test_cpu_info_is_asked_once_per_process_and_deepspeed_reads_the_answer(monkeypatch):
    import cpuinfo
    from deepspeed.accelerator import get_accelerator

    from ftprof.runtime.ds_ops import remember_cpu_info

    calls = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: calls.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    remember_cpu_info()
    remember_cpu_info()  # idempotent: not wrapped twice
    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    flags = (builder.cpu_arch(), builder.simd_width(), builder.cpu_arch())  # what a load computes, per op
    assert flags[0] == "-march=native"
    assert "AVX256" in flags[1]  # the answer's avx2, as DeepSpeed reads it
    assert len(calls) == 1
