"""Make DeepSpeed + HF Trainer see the right world on any launcher, CPU-only machines included.

Three gaps are closed here:

* Under ``srun`` each task gets ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, which torch,
  DeepSpeed and accelerate don't read: every task would train alone as rank 0 of 1 (so would
  ``deepspeed --launcher slurm``, which starts ranks through srun). :func:`adopt_slurm_env` maps them.
* Under plain ``python`` DeepSpeed looks for MPI when no launcher set ``RANK``/``WORLD_SIZE``; a single
  process only needs those variables set to "rank 0 of 1".
* On a machine with no CUDA device, accelerate (which TrainingArguments uses to set up devices) leaves
  its state at one process even after DeepSpeed has started a gloo group over every rank. Trainer then fills
  DeepSpeed's ``"auto"`` batch size for world size 1 (``16 != 16 * 1 * 2``) and would not shard the data.
  :func:`adopt_process_group` copies the group's real size and rank into accelerate's state.

And one leak: DeepSpeed's CPU collectives give each rank a 66 MiB shared-memory buffer in ``/dev/shm``
(``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) that nothing ever unlinks; every run leaves one per
rank, in RAM, until reboot (a day of sweeps and tests can fill most of a machine's RAM with them).
:func:`release_shm_buffer` unlinks a rank's own once every rank has mapped it (the mapping lives on), so a run
killed after start-up leaks nothing; :func:`remove_stale_shm_buffers` clears what earlier runs left.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import PartialState

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SHM_FOLDER = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"  # deepspeed/ops/csrc/cpu/comm/shm.cpp, SHM_BUFFER_NAME
SHM_STALE_AFTER_S = 60.0  # a starting rank maps its own buffer right after creating it


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``scontrol`` expands it, else :func:`parse_first_host`."""
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """The first host of a hostlist, parsed (the first bracket only).

    >>> parse_first_host("gpu[07-09,12],cpu1"), parse_first_host("node3,node4")
    ('gpu07', 'node3')
    """
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)
    return prefix + re.split(r"[-,\]]", rest)[0]


def adopt_slurm_env() -> bool:
    """Under srun, set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` from Slurm's
    variables; returns True when it did.

    Only inside a job step (``SLURM_STEP_ID`` set): an sbatch script's own shell also has ``SLURM_PROCID=0``
    and ``SLURM_NTASKS=N`` and must stay one process. Variables a launcher (or the user) set win.
    """
    env = os.environ
    if any(v in env for v in LAUNCHER_VARIABLES) or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return False
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=world, LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if env.get("SLURM_STEP_NUM_NODES", "1") == "1":
        env.setdefault("LOCAL_WORLD_SIZE", world)
        env.setdefault("LOCAL_SIZE", world)  # DeepSpeed's CPU shared-memory all-reduce needs all ranks local
        env.setdefault("MASTER_ADDR", "127.0.0.1")
    else:
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
    # The same on every task of a step, different between concurrent steps of one job.
    env.setdefault("MASTER_PORT", str(20000 + (int(env["SLURM_JOB_ID"]) * 16 + int(env["SLURM_STEP_ID"])) % 40000))
    return True


def ensure_single_process_env() -> bool:
    """Set rank-0-of-1 variables when no launcher (nor srun) did; returns True when it set them."""
    if any(v in os.environ for v in LAUNCHER_VARIABLES) or adopt_slurm_env():
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True


def adopt_process_group(state: PartialState | None) -> bool:
    """Copy the initialized process group's size and ranks into an accelerate ``PartialState``.

    Returns True when ``state`` had to be corrected. A no-op on GPUs, where accelerate gets it right.
    """
    import torch.distributed as dist

    if state is None or not (dist.is_available() and dist.is_initialized()):
        return False
    if state.num_processes == dist.get_world_size():
        return False
    state.backend = dist.get_backend()
    state.num_processes = dist.get_world_size()
    state.process_index = dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
    return True


def shm_buffer(rank: int) -> Path:
    """The shared-memory buffer DeepSpeed's CPU collectives create for ``rank`` of this process's group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_FOLDER / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> bool:
    """Unlink this rank's DeepSpeed shm buffer once every rank has it mapped; True when DeepSpeed made them.

    DeepSpeed's CPU backend makes the buffers when every rank is on this host (``LOCAL_SIZE`` = world size),
    and each rank maps every other's before its backend's constructor returns; a barrier after that means all
    have, so the names can go (the mappings, and the collectives, live on). The condition is the same on every
    rank, so either all take the barrier or none does.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:
        return False
    shm_op = getattr(ds_comm.cdb, "shm_comm_op", None) if ds_comm.cdb is not None else None
    if shm_op is None or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return False
    dist.barrier()
    shm_buffer(dist.get_rank()).unlink(missing_ok=True)
    return True


def each_process(read: Callable[[Path], str]) -> list[str] | None:
    """``read(/proc/<pid>)`` for every process we can see (those gone or another user's skipped); None where
    /proc can't tell (not Linux)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                out.append(read(entry))
            except OSError:
                continue
    return out


def age_s(path: Path) -> float | None:
    """Seconds since ``path`` last changed; None once it is gone (another process may remove it any time)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _mapped_shm_buffers() -> set[str] | None:
    """The DeepSpeed shm buffers any process we can see maps (/proc/*/maps); None where /proc can't tell."""
    maps = each_process(lambda entry: (entry / "maps").read_text())
    if maps is None:
        return None
    return {line.split(maxsplit=5)[-1] for text in maps for line in text.splitlines() if SHM_PREFIX in line}


def stale_shm_buffers(folder: Path = SHM_FOLDER, older_than_s: float = SHM_STALE_AFTER_S) -> list[Path]:
    """This user's DeepSpeed shm buffers that no process maps, older than ``older_than_s``: what finished or
    killed runs left."""
    candidates = [p for p in folder.glob(f"{SHM_PREFIX}_{os.getuid()}_*") if (age_s(p) or 0) > older_than_s]
    mapped = _mapped_shm_buffers() if candidates else set()
    if mapped is None:
        return []
    return sorted(p for p in candidates if str(p) not in mapped)


def remove_stale_shm_buffers(folder: Path = SHM_FOLDER) -> tuple[int, int]:
    """Remove :func:`stale_shm_buffers`; returns how many and their bytes. Each is aged again just before:
    a new run of the same address and port reopens (and rewrites) the same name."""
    count = size = 0
    for path in stale_shm_buffers(folder):
        try:
            nbytes = path.stat().st_size
            if (age_s(path) or 0) > SHM_STALE_AFTER_S:
                path.unlink()
                count, size = count + 1, size + nbytes
        except FileNotFoundError:  # another cleaner got there first
            continue
    return count, size


def shutdown() -> int:
    """Leave the process group cleanly: wait for every rank, then destroy it; returns the world size it had
    (0 when there was no group). A process that was one of several ranks then calls :func:`exit_rank`.

    The barrier is skipped for a world of one: there is no peer to wait for, and a gloo barrier keeps the
    collectives still in flight alive until a worker thread releases it, which is what :func:`exit_rank` is
    about.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    world_size = dist.get_world_size()
    if world_size > 1:
        dist.barrier()
    dist.destroy_process_group()
    return world_size


def exit_rank(world_size: int) -> None:
    """After :func:`shutdown` of a group of several ranks, end this process now: flush, then ``os._exit(0)``.

    Interpreter finalization is not safe while gloo's worker threads live, and nothing lets them end sooner:
    ``destroy_process_group`` only forgets the group (gloo's ``shutdown``/``abort`` leave the threads running),
    and the threads stop only when the backend object is freed, which DeepSpeed prevents (module-level
    ``FWD_MODULE_STACK`` and a class-level ``lru_cache`` in the ZeRO-3 parameter coordinator keep the model,
    whose parameters hold the groups). A worker releases each finished collective after the caller has moved
    on, and the gloo barrier holds every collective in flight when it was issued; when those hold tensors
    whose Python objects DeepSpeed already dropped, the release must take the GIL. Once finalization has
    begun, Python ends such a thread with ``pthread_exit``, whose unwinding crosses a ``noexcept`` C++
    destructor: ``terminate called without an active exception``, SIGABRT, after a run that succeeded
    (seen in CI; the core's aborting thread is ``ProcessGroupGloo::runLoop`` → ``~AsyncBarrierWork`` →
    ``~AsyncAllgatherWork`` → ``TensorImpl::decref_pyobject`` → ``take_gil`` → ``PyThread_exit_thread``).

    Only a process started as one rank of several reaches the exit: a launcher (deepspeed, torchrun, srun)
    started it for this run alone, and every rank has passed the barrier, so nothing is left to do but leave.
    A world of one (an in-process run, or ``python launch/train.py``) returns here and exits as usual.
    Failures never get here: they raise before :func:`shutdown`.
    """
    if world_size <= 1:
        return
    import logging

    logging.shutdown()  # what atexit would have flushed
    flush_stdio()
    os._exit(0)


def flush_stdio() -> None:
    """Flush Python's and C's output buffers (``os._exit`` skips both; C++ ops print through stdio)."""
    import contextlib
    import sys

    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)
