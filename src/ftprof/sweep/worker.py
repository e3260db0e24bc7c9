"""A pre-imported worker for sweep points: import once, fork a fresh child per point.

A fresh process per point costs seconds before its first step (imports of torch, transformers, datasets
and deepspeed, DeepSpeed's op loading). The worker pays that once: it imports everything a point needs,
loads DeepSpeed's CPU optimizer ops, and then waits; each point is a ``fork()`` of it, so the child starts
with the imports done and nothing else: no model, no tensor (the worker runs no torch op and starts no
thread of its own; ``fork()`` copies only the calling thread, so the idle helper threads some libraries
start at import, such as pyarrow's jemalloc one, are not copied). The child is its own process group and
session before the driver learns its pid, writes its output to a file, and exits; the worker reports its
exit status. A point of several ranks on this node is one such child that forks its ranks, with the
variables the ``deepspeed`` launcher would give them (:func:`rank_envs`), and ends as its first failing rank
does, stopping the others, as the launcher does. Only ``OMP_NUM_THREADS`` and ``CUDA_VISIBLE_DEVICES`` may
differ from the worker's environment (:data:`ftprof.sweep.point_run.WORKER_ENV`) besides the ranks' variables,
which are read at run time: other variables were read by the imports already, so a point that sets them
runs in a fresh process.

Isolation is what a fresh process gives: the child's memory is its own (copy-on-write pages of the
imports, which a fresh process holds too), and its peak is measured in the child. ``bench/bench_worker.py``
measures both on the same points side by side. CUDA must not be initialised before ``fork()``: the worker
never touches a GPU (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), but it is only the default on CPU-only machines.

Protocol (JSON lines): the driver writes ``{"id", "spec", "env", "memory_limit", "output", "world_size"}``
(and ``"master_port"`` for several ranks) to the worker's stdin; the worker answers ``{"id", "pid"}`` once
the child runs and ``{"pid", "returncode"}`` when it ends (negative: killed by that signal, as
:mod:`subprocess` reports it).

    python -m ftprof.sweep.worker          # started by ``ftprof sweep``; not for direct use
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ftprof.runtime.distributed import flush_stdio, free_port

READY_TIMEOUT_S = 600.0  # the first start may JIT-compile DeepSpeed's CPU ops, which takes minutes on small CPUs


def _preload() -> None:
    """Import what :func:`ftprof.sweep.measure.measure` imports before it loads the model, and load DeepSpeed's
    CPU optimizer ops. Nothing a fresh process imports later (DeepSpeed's engine set-up imports its Muon
    optimizer and with it torch.compile's modules, ~1 s and ~40 MB): the model-load phase's RSS would then
    differ from a fresh process's."""
    from ftprof.runtime.ds_ops import remember_cpu_info

    remember_cpu_info()  # asked while the ops load: once here, then every forked point has the answer
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import DataCollatorWithPadding, Trainer  # noqa: F401

    import ftprof.profiler  # noqa: F401
    import ftprof.runtime.deepspeed_config  # noqa: F401
    import ftprof.sweep.measure  # noqa: F401
    import ftprof.train.args  # noqa: F401
    import ftprof.train.recipe  # noqa: F401  # and through it tasks, data, causal_lm_data, models, metrics

    if not torch.cuda.is_available():  # GPU ops load in the child, after CUDA exists there
        from deepspeed.accelerator import get_accelerator

        for name in ("FusedAdamBuilder", "CPUAdamBuilder"):
            with contextlib.suppress(Exception):  # an op this build lacks is loaded (or not) by the child
                builder = get_accelerator().create_op_builder(name)
                if builder is not None:
                    builder.load(verbose=False)


def resident_file_pages() -> list[tuple[int, int]]:
    """(address, length) runs of this process's resident pages in readable file-backed mappings.

    ``fork()`` copies the page tables of anonymous memory but leaves file-backed mappings (the shared
    libraries' code and data) to page faults, so a child starts without the library pages the imports
    touched, and its RSS would be lower than a fresh process's by those (a hundred MB or more). The worker lists
    them once (``/proc/self/pagemap``'s present bit), and each child maps them again
    (:func:`touch_pages`): the child's RSS then starts where a fresh process's does after the same imports.
    """
    runs: list[tuple[int, int]] = []
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or not fields[1].startswith("r"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // page * 8)
            entries = pagemap.read((end - start) // page * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry >> 63:  # present in RAM and mapped by this process
                    address = start + i * page
                    if runs and runs[-1][0] + runs[-1][1] == address:
                        runs[-1] = (runs[-1][0], runs[-1][1] + page)
                    else:
                        runs.append((address, page))
    return runs


def touch_pages(runs: list[tuple[int, int]]) -> None:
    """Read one byte of every page of ``runs``, which maps each one into this process again."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    for start, length in runs:
        for address in range(start, start + length, page):
            ctypes.string_at(address, 1)


def _redirect(output: str) -> None:
    """Send this process's stdout and stderr to ``output`` (ranks forked after it share the open file, as a
    launcher's ranks share its output) and read stdin from /dev/null."""
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _rank(
    request: dict[str, Any], pages: list[tuple[int, int]], rank_env: dict[str, str], leader: int | None = None
) -> int:
    """In a forked point process: become a fresh process of the point (one rank) and measure it. A rank of
    several (``leader``: the point's process that forked it) dies with its leader, and writes its output a line
    at a time, as the launcher's ``python -u`` ranks do, so a rank stopped by another's failure loses none."""
    import resource

    if leader is not None:
        _die_with_parent(leader)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    touch_pages(pages)
    if request.get("memory_limit"):
        limit = int(request["memory_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.clear()
    os.environ.update({**request["env"], **rank_env})
    if "OMP_NUM_THREADS" in os.environ:  # read by torch when its thread pool starts: set it explicitly
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from ftprof.sweep import measure

    sys.argv = [measure.__file__, request["spec"]]
    return measure.main([request["spec"]])


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux ``PR_SET_PDEATHSIG``), so a rank
    cannot outlive its point's process; where that is not available, nothing."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent was gone before the request took effect
        os._exit(1)


def rank_envs(world_size: int, master_port: int, devices: str | None) -> list[dict[str, str]]:
    """The variables the ``deepspeed`` launcher (``deepspeed/launcher/launch.py``) sets for each of a one-node
    point's ranks; ``devices``: ``CUDA_VISIBLE_DEVICES`` as the point was given it (the launcher's
    ``--include``), else the first ``world_size`` (its ``--num_gpus``).

    >>> [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["CUDA_VISIBLE_DEVICES"]) for e in rank_envs(2, 29500, None)]
    [('0', '0', '2', '0,1'), ('1', '1', '2', '0,1')]
    """
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(world_size),
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
        "CUDA_VISIBLE_DEVICES": devices or ",".join(map(str, range(world_size))),
    }
    return [{**shared, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world_size)]


def _ranks(request: dict[str, Any], pages: list[tuple[int, int]]) -> int:
    """In a forked point process: fork one process per rank and wait for them, as the ``deepspeed`` launcher
    does: the first rank that fails ends the others, and its exit (a signal's too) is the point's."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # re-raising a rank's SIGABRT must not dump the worker
    envs = rank_envs(request["world_size"], request["master_port"], request["env"].get("CUDA_VISIBLE_DEVICES"))
    ranks: set[int] = set()
    try:
        for rank_env in envs:
            pid = os.fork()
            if pid == 0:
                _exit_with(functools.partial(_rank, request, pages, rank_env, leader=os.getppid()))
            ranks.add(pid)
    except BaseException:  # a rank that could not be forked: the others would wait for it until gloo's timeout
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    code = 0
    while ranks:
        pid, status = os.wait()
        ranks.discard(pid)
        returncode = os.waitstatus_to_exitcode(status)
        if returncode and not code:
            code = returncode
            for other in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)
    if code < 0:  # end as the rank ended, so the driver sees the signal (SIGKILL: the OOM killer)
        with contextlib.suppress(OSError):  # SIGKILL's can't be set, nor needs to be
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _point(request: dict[str, Any], pages: list[tuple[int, int]]) -> int:
    """In the forked child (already its own session): run the point's one rank here, or fork its ranks."""
    _redirect(request["output"])
    if request.get("world_size", 1) > 1:
        return _ranks(request, pages)
    return _rank(request, pages, {})


def _exit_with(body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in a forked process and leave with its exit code, never returning into the caller."""
    code = 1
    try:
        code = body()
    except SystemExit as exit_:  # as the interpreter exits: None is 0, a message goes to stderr with 1
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        flush_stdio()
        os._exit(code)


def _fork(request: dict[str, Any], protocol: int, pages: list[tuple[int, int]]) -> int:
    """Fork a child for ``request``; return once it leads its own process group (so a ``killpg`` of the pid
    the driver is told reaches it and every rank it forks, as for a fresh process)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        os.read(ready_r, 1)  # b"" if the child died before: the worker then reports its exit as usual
        os.close(ready_r)
        return pid

    def leader() -> int:
        os.setsid()
        os.close(ready_r)
        os.write(ready_w, b"1")
        os.close(ready_w)
        os.close(protocol)
        return _point(request, pages)

    _exit_with(leader)


def serve() -> int:
    """The worker's loop: fork a child per request, report each child's end; exit when stdin closes."""
    protocol = os.dup(1)
    os.dup2(2, 1)  # what imports print (DeepSpeed logs on stdout) must not reach the protocol
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    started = time.perf_counter()
    _preload()
    import torch

    if torch.cuda.is_initialized():  # a forked child could not use CUDA
        raise RuntimeError("CUDA was initialised while preloading: the worker cannot fork points")
    flush_stdio()  # nothing buffered may be copied into the children's output
    pages = resident_file_pages()

    def say(message: dict[str, Any]) -> None:
        os.write(protocol, (json.dumps(message) + "\n").encode())

    say({"ready": True, "preload_s": round(time.perf_counter() - started, 3), "pid": os.getpid()})
    children: set[int] = set()
    pending = b""
    request: Any = None
    open_ = True
    while open_ or children:
        readable, _, _ = select.select([0] if open_ else [], [], [], 0.05)
        if readable:
            data = os.read(0, 1 << 16)
            if not data:  # the driver is gone (or done): stop its points, then leave
                open_ = False
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    pid = _fork(request, protocol, pages)
                except Exception as err:  # this request fails (fork: EAGAIN, ENOMEM...), the others go on
                    say({"id": request.get("id") if isinstance(request, dict) else None, "error": repr(err)})
                    continue
                children.add(pid)
                say({"id": request["id"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            say({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
    return 0


class WorkerError(RuntimeError):
    """The worker could not start or has died."""


class ForkWorker:
    """The driver's side: start the worker, run points in it, wait for them (thread-safe)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="ftprof-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ftprof.sweep.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the driver, which stops the points itself
        )
        self._lock = threading.Condition()
        self._next_id = 0
        self._pids: dict[int, int] = {}  # request id -> child pid
        self._exits: dict[int, int] = {}  # child pid -> returncode
        self._errors: dict[int, str] = {}  # request id -> why the worker could not fork it
        self._abandoned: set[int] = set()  # request ids whose start() timed out
        self.ready: dict[str, Any] | None = None
        self._eof = False  # the worker's output ended: it is gone
        self._reader = threading.Thread(target=self._read, name="ftprof-worker-reader", daemon=True)
        self._reader.start()
        try:
            with self._lock:
                if not self._lock.wait_for(lambda: self.ready is not None or not self.alive, READY_TIMEOUT_S):
                    raise WorkerError(f"the worker did not start within {READY_TIMEOUT_S:.0f} s")
            if self.ready is None:
                raise WorkerError(f"the worker exited during start-up: {self.log_tail()}")
        except BaseException:  # a failed start or Ctrl-C: leave no worker behind
            self.proc.kill()
            self.close()
            raise

    @property
    def alive(self) -> bool:
        """Until the worker's output ends (after its last message has been read, so no exit is lost)."""
        return not self._eof

    def log_tail(self) -> str:
        """The last line the worker wrote to its log (the exception, when it failed)."""
        with contextlib.suppress(OSError):
            lines = Path(self._log.name).read_text(errors="replace").strip().splitlines()
            return lines[-1][-300:] if lines else "no output"
        return "no log"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                message = json.loads(line)
                with self._lock:
                    if message.get("ready"):
                        self.ready = message
                    elif "error" in message:
                        self._errors[message["id"]] = message["error"]
                    elif "id" in message and message["id"] in self._abandoned:  # its start() gave up: stop it
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(message["pid"], signal.SIGKILL)
                    elif "id" in message:
                        self._pids[message["id"]] = message["pid"]
                    else:
                        self._exits[message["pid"]] = message["returncode"]
                    self._lock.notify_all()
        finally:
            with self._lock:
                self._eof = True
                self._lock.notify_all()  # the worker is gone: wake every waiter

    def start(
        self, spec: Path, env: dict[str, str], output: Path, memory_limit: int | None = None, world_size: int = 1
    ) -> int:
        """Fork a child measuring ``spec`` with exactly ``env`` as its environment (plus, for ``world_size`` > 1,
        each rank's launcher variables); its pid (= the process group of every rank)."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            message: dict[str, Any] = {"id": request_id, "spec": str(spec), "env": env, "memory_limit": memory_limit}
            message.update(output=str(output), world_size=world_size)
            if world_size > 1:
                message["master_port"] = free_port()
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as err:  # a broken pipe, or stdin already closed
                raise WorkerError(f"the worker is gone: {self.log_tail()}") from err
            known = (self._pids, self._errors)
            if not self._lock.wait_for(lambda: any(request_id in d for d in known) or not self.alive, 60):
                self._abandoned.add(request_id)  # a child forked later is killed as its pid arrives
                raise WorkerError("the worker did not fork a child within 60 s")
            if request_id in self._errors:
                raise WorkerError(f"the worker could not fork the point: {self._errors.pop(request_id)}")
            if request_id not in self._pids:
                raise WorkerError(f"the worker died: {self.log_tail()}")
            return self._pids.pop(request_id)

    def wait(self, pid: int, timeout: float | None = None) -> int:
        """The child's return code; raises :class:`subprocess.TimeoutExpired` after ``timeout`` seconds."""
        with self._lock:
            if not self._lock.wait_for(lambda: pid in self._exits or not self.alive, timeout):
                raise subprocess.TimeoutExpired(f"worker child {pid}", timeout or 0)
            if pid not in self._exits:
                raise WorkerError(f"the worker died while point {pid} ran: {self.log_tail()}")
            return self._exits.pop(pid)

    def close(self) -> None:
        """Stop the worker (closing its stdin stops its children too)."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


if __name__ == "__main__":
    raise SystemExit(serve())
