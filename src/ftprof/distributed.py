"""Make DeepSpeed + HF Trainer see the right world on any launcher, CPU-only machines included.

Two gaps are closed here:

* Under plain ``python`` DeepSpeed looks for MPI when no launcher set ``RANK``/``WORLD_SIZE``; a single
  process only needs those variables set to "rank 0 of 1".
* On a machine with no CUDA device, accelerate (which TrainingArguments uses to set up devices) leaves
  its state at one process even after DeepSpeed has started a gloo group over every rank. Trainer then fills
  DeepSpeed's ``"auto"`` batch size for world size 1 (``16 != 16 * 1 * 2``) and would not shard the data.
  :func:`adopt_process_group` copies the group's real size and rank into accelerate's state.
"""

from __future__ import annotations

import os
import socket

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_single_process_env() -> bool:
    """Set rank-0-of-1 variables when no launcher did; returns True when it set them."""
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True


def adopt_process_group(state) -> bool:
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


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Exiting with the group alive lets C++ threads of the comm backend be torn down mid-flight, which can
    abort a rank (``terminate called without an active exception``) after a run that succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
