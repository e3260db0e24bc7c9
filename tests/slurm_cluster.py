"""A real one-node Slurm cluster for the tests, from ``launch/slurm_cluster.sh``.

``slurm_cluster`` (session-scoped) starts the cluster once (installing slurm-wlm and munge with apt-get on
first use), yields the environment that srun/sbatch need (``SLURM_CONF`` set, no ``SLURM_*`` job
variables inherited from an outer job) and stops it after the session. A cluster that was already running
(``slurm_cluster.sh start`` by hand) is reused and left running. The tests skip with one line only where
Slurm cannot be installed (no apt-get, not root, apt-get failing), and fail instead in CI (``CI`` set: see
:func:`tests.conftest.skip_or_fail`); a cluster that is installed but does not start is a failure, with the
daemons' logs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, skip_or_fail

SCRIPT = ROOT / "launch" / "slurm_cluster.sh"
UNAVAILABLE = 3  # slurm_cluster.sh's exit code when Slurm is missing and cannot be installed here
START_TIMEOUT = 900  # seconds; the first start includes apt-get
HOW_TO_GET = "to get it: `sudo bash launch/slurm_cluster.sh start` (installs slurm-wlm and munge with apt-get)"


def slurm_env() -> dict[str, str]:
    """This process's environment without variables of an enclosing Slurm job (they would make srun try
    to add a step to a job id that the test cluster does not know)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    return env


def _script(command: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="session")
def slurm_cluster(request) -> Iterator[dict[str, str]]:
    """The environment for srun/sbatch against a running one-node cluster (``SLURM_CONF`` set)."""
    env = slurm_env()
    reused = _script("status", env, 60).returncode == 0
    started = time.monotonic()
    missing = None  # skipped or failed outside the except clauses: no chained traceback
    try:
        proc = _script("start", env, START_TIMEOUT)
    except subprocess.TimeoutExpired:
        missing = (
            f"slurm: launch/slurm_cluster.sh start did not finish in {START_TIMEOUT} s "
            f"(apt-get hanging without a reachable package mirror?): {HOW_TO_GET}"
        )
    except OSError as err:  # no bash
        missing = f"slurm: cannot run launch/slurm_cluster.sh ({err}): install bash"
    if missing:
        skip_or_fail(missing)
    seconds = time.monotonic() - started
    if proc.returncode == UNAVAILABLE:
        reason = (proc.stderr.strip().splitlines() or ["Slurm is not installed"])[-1]
        skip_or_fail(f"slurm: {reason.removeprefix('slurm_cluster: ')}: {HOW_TO_GET}")
    if proc.returncode != 0:
        pytest.fail(
            f"launch/slurm_cluster.sh start exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}",
            pytrace=False,
        )
    exports = [line for line in proc.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    assert exports, f"slurm_cluster.sh printed no SLURM_CONF:\n{proc.stdout}{proc.stderr}"
    env["SLURM_CONF"] = exports[-1].removeprefix("export SLURM_CONF=")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        how = "reused a running cluster" if reused else "cluster started"
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"slurm: {how} in {seconds:.1f} s ({env['SLURM_CONF']})")
    yield env
    if not reused:
        _script("stop", env, 120)
