"""DeepSpeed's JIT-built ops: build them ahead of time, and find the build locks a killed build left behind.

DeepSpeed builds some ops on first use through torch's JIT extensions (on a CPU accelerator: the shared-memory
collectives and both Adams, compiled by the host's C++ compiler: minutes in all on a small machine). torch
guards each build with a ``lock`` file and any later process waits on that file *forever*; a build killed
mid-way (a timeout, Ctrl-C) leaves it, and every DeepSpeed run after it hangs silently. :func:`stale_locks`
finds such files; :func:`build` builds the ops once, in one process with no timeout, so that runs only load them.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from ftprof.runtime.distributed import age_s, each_process

#: The ops a DeepSpeed run on the CPU accelerator builds: comm (every run), FusedAdam, DeepSpeedCPUAdam (offload).
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")
#: A real build is never idle this long without a process working in its folder.
STALE_AFTER_S = 120.0


def extensions_root() -> Path:
    """Where torch's JIT extensions are built: ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _working_dirs() -> set[Path] | None:
    """The working directories of every process we can see (ninja and the compiler run in the build folder);
    None where /proc can't tell (not Linux)."""
    cwds = each_process(lambda entry: os.readlink(entry / "cwd"))
    return None if cwds is None else {Path(c) for c in cwds}


def stale_locks(root: Path | None = None, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Build locks under ``root`` that no build holds: older than ``older_than_s`` with no process working in
    their folder. Empty where processes can't be seen (then nothing can be called stale)."""
    root = extensions_root() if root is None else root
    locks = [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern)]
    old = [p for p in locks if (age_s(p) or 0) > older_than_s]
    if not old:
        return []
    busy = _working_dirs()
    if busy is None:
        return []
    return sorted(p for p in old if p.parent.resolve() not in busy)


def check_no_stale_locks() -> None:
    """Refuse, before any heavy work, to start a DeepSpeed run that would hang on a stale build lock."""
    locks = stale_locks()
    if locks:
        from ftprof.errors import ConfigError

        raise ConfigError(
            f"a killed DeepSpeed op build left {len(locks)} lock file(s) that every DeepSpeed run would wait on "
            f"forever; remove them: rm {' '.join(str(p) for p in locks)}"
        )


def accelerator_ops() -> tuple[str, ...]:
    """The builders DeepSpeed JIT-builds on this machine's accelerator (CUDA installs build theirs at need)."""
    from deepspeed.accelerator import get_accelerator

    return CPU_OPS if get_accelerator().device_name() == "cpu" else ()


def build(ops: tuple[str, ...] | None = None, clear_stale: bool = True) -> list[str]:
    """Build (or just load, when already built) each op; returns the names built or found. Stale locks are
    removed first when ``clear_stale`` (a caller building explicitly is the only builder), else refused."""
    if not clear_stale:
        check_no_stale_locks()
    for lock in stale_locks():
        print(f"removing stale build lock {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)
    from deepspeed.accelerator import get_accelerator

    remember_cpu_info()  # each op's load asks it twice
    names = []
    for op in accelerator_ops() if ops is None else ops:
        builder = get_accelerator().create_op_builder(op)
        if builder is None or not builder.is_compatible():
            continue
        builder.load(verbose=False)
        names.append(builder.absolute_name())
    return names


def remember_cpu_info() -> None:
    """Make py-cpuinfo's ``get_cpu_info`` answer once per process. Each call takes about a second (it times
    the clock in a subprocess), and DeepSpeed calls it twice for every op it loads, built or not
    (``op_builder/builder.py``: ``cpu_arch`` and ``simd_width`` for the compile flags), and once per
    ``DeepSpeedCPUAdam``: seconds of every run's start. The CPU does not change while a process runs. Call it
    before DeepSpeed loads an op; a forked child inherits the answer."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu instead
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)


if __name__ == "__main__":
    from ftprof.runtime.distributed import remove_stale_shm_buffers

    start = time.perf_counter()
    count, size = remove_stale_shm_buffers()
    if count:
        print(f"removed {count} DeepSpeed shm buffers ({size / 2**30:.1f} GiB) earlier runs left in /dev/shm")
    built = build()
    where = extensions_root()
    print(f"DeepSpeed ops ready in {where} ({time.perf_counter() - start:.0f} s): {', '.join(built) or 'none'}")
