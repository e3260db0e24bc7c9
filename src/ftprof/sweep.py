"""Run sweep points, each in a fresh process (the ``deepspeed`` launcher for world size > 1), and record them.

A point that runs out of memory is a result (``oom``); a crash is ``error`` and a hang ``timeout``, with
the tail of its output; the sweep goes on either way. Every finished point is appended to
``results.jsonl`` at once (see :mod:`ftprof.results`), and ``resume`` skips points already there.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftprof import measure
from ftprof.deepspeed_config import DeepSpeedConfig, ds_config_for, for_point
from ftprof.distributed import free_port
from ftprof.point import Point
from ftprof.results import Record, Status, append_record, latest
from ftprof.run_profile import Profile
from ftprof.sweep_plan import must_oom, next_batch_to_try
from ftprof.units import GIB

# What an out-of-memory looks like in a child's output, on GPUs and CPUs.
OOM_MARKERS = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "out of memory",
    "DefaultCPUAllocator: can't allocate",
    "std::bad_alloc",
    "MemoryError",
    "Cannot allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)
TAIL_CHARS = 2000


@dataclass
class SweepConfig:
    """What to measure and how (the CLI builds it from flags)."""

    model: str
    points: list[Point]
    out_dir: Path
    steps: int = 3  # at least this many measured steps...
    warmup: int = 1
    min_seconds: float = 0.0  # ...and at least this long
    dataset: str | None = None
    base_ds_config: DeepSpeedConfig | None = None
    timeout_s: float = 600.0
    find_max_batch: bool = False
    max_batch: int = 1024
    child_memory_limit: int | None = None  # RLIMIT_AS for each point's process(es), bytes
    prune: bool = True  # skip points that must OOM
    predict: Callable[[Point], int] | None = None  # the estimator's device-used bytes for a point
    budget: int | None = None  # memory per rank; with ``predict``, grid points sure to exceed it aren't run
    margin: float = 0.5  # "sure": predicted above budget x (1 + margin); 0.1 once calibrated on this device
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.jsonl"


def classify(returncode: int, output: str, has_result: bool) -> tuple[Status, str | None]:
    """(status, reason) of a finished child process.

    >>> classify(0, "", True)
    ('ok', None)
    >>> classify(1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False)[0]
    'oom'
    >>> classify(-9, "", False)
    ('oom', 'killed by SIGKILL (the kernel OOM killer, most likely)')
    """
    if returncode == 0 and has_result:
        return "ok", None
    if any(marker in output for marker in OOM_MARKERS):
        line = next((ln for ln in reversed(output.splitlines()) if any(m in ln for m in OOM_MARKERS)), "")
        return "oom", line.strip()[-300:]
    if returncode == -signal.SIGKILL:
        return "oom", "killed by SIGKILL (the kernel OOM killer, most likely)"
    last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), f"exit code {returncode}")
    return "error", last.strip()[-300:]


def _command(spec_path: Path, world_size: int) -> list[str]:
    script = measure.__file__
    if world_size == 1:
        return [sys.executable, script, str(spec_path)]
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(world_size), "--master_port", str(free_port()), script, str(spec_path)]


def run_point(cfg: SweepConfig, p: Point) -> Record:
    """Measure ``p`` in a fresh process group; never raises for the point's own failures."""
    base = cfg.base_ds_config or DeepSpeedConfig(ds_config_for(p.zero))
    with tempfile.TemporaryDirectory(prefix="ftprof-point-") as tmp:
        result_path = Path(tmp) / "result.json"
        spec = measure.MeasureSpec(
            point=p,
            model=cfg.model,
            steps=cfg.steps,
            warmup=cfg.warmup,
            ds_config=for_point(base, p),
            result_path=str(result_path),
            dataset=cfg.dataset,
            min_seconds=cfg.min_seconds,
        )
        spec_path = spec.write(Path(tmp) / "spec.json")
        limit = cfg.child_memory_limit

        def preexec() -> None:
            os.setsid()  # own process group: a timeout kills every rank
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        started = time.perf_counter()
        proc = subprocess.Popen(
            _command(spec_path, p.world_size),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=preexec,
            env=_child_env(),
        )
        try:
            output, _ = proc.communicate(timeout=cfg.timeout_s)
            status, reason = classify(proc.returncode, output, result_path.is_file())
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status, reason = "timeout", f"no result after {cfg.timeout_s:.0f} s"
        wall = time.perf_counter() - started
        profile = Profile.from_json(json.loads(result_path.read_text())) if status == "ok" else None
        return Record(
            point=p,
            status=status,
            model=cfg.model,
            peak_bytes=(profile.peak() or None) if profile else None,
            profile=profile,
            reason=reason,
            stderr_tail=None if status == "ok" else output[-TAIL_CHARS:],
            wall_s=round(wall, 3),
            env={**cfg.env, "world_size": p.world_size},
        )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def iterate_sweep(
    cfg: SweepConfig, done: dict[str, Record], run: Callable[[SweepConfig, Point], Record] = run_point
) -> Iterator[Record]:
    """Yield each new record (already appended to the results file), skipping points in ``done``."""
    oomed = [r.point for r in done.values() if r.status == "oom"]

    def settle(p: Point, bisecting: bool = False) -> Record:
        """Run ``p``, or record why not. A prediction never stands in for a measurement while bisecting."""
        if p.key in done and not (bisecting and done[p.key].status == "over_budget"):
            return done[p.key]
        proof = must_oom(p, oomed) if cfg.prune else None
        predicted = cfg.predict(p) if cfg.predict else None
        if proof is not None:
            record = Record(
                point=p,
                status="skipped",
                model=cfg.model,
                env=dict(cfg.env),
                reason=f"must OOM: {proof.key} did with a batch and sequence no larger",
            )
        elif not bisecting and cfg.prune and predicted and cfg.budget and predicted > cfg.budget * (1 + cfg.margin):
            record = Record(
                point=p,
                status="over_budget",
                model=cfg.model,
                env=dict(cfg.env),
                reason=f"not run: predicted {predicted / GIB:.2f} GiB exceeds the {cfg.budget / GIB:.1f} GiB "
                f"budget by more than {cfg.margin:.0%}",
            )
        else:
            record = run(cfg, p)
            if record.status == "oom":
                oomed.append(p)
        if predicted:
            record.predicted_bytes = predicted
        append_record(cfg.results_path, record)
        done[p.key] = record
        return record

    if not cfg.find_max_batch:
        # Smallest predicted peak first (the grid's own order without a predictor): smaller points run
        # before the larger ones their OOM would rule out.
        predict = cfg.predict
        order = sorted(cfg.points, key=lambda p: (predict(p), p)) if predict else cfg.points
        for p in order:
            if p.key not in done:
                yield settle(p)
        return
    start = min(p.batch_size for p in cfg.points)
    for setting in sorted({p.with_batch(1) for p in cfg.points}):  # one search per setting but the batch
        fits: set[int] = set()
        ooms: set[int] = set()
        for r in done.values():
            if r.point.with_batch(1) == setting and r.status == "ok":
                fits.add(r.point.batch_size)
            elif r.point.with_batch(1) == setting and r.status in ("oom", "skipped"):
                ooms.add(r.point.batch_size)
        while (batch := next_batch_to_try(fits, ooms, start, cfg.max_batch)) is not None:
            p = setting.with_batch(batch)
            fresh = p.key not in done or done[p.key].status == "over_budget"
            record = settle(p, bisecting=True)
            if fresh:
                yield record
            if record.status == "ok":
                fits.add(batch)
            elif record.status in ("oom", "skipped"):
                ooms.add(batch)
            else:  # an error or timeout says nothing about memory: stop searching this setting
                break


def close_calls(records: list[Record], budget: int | None) -> list[Point]:
    """The fastest recommendation and the points whose throughput is within noise of it: the ones to measure
    again, longer, before the report picks between them."""
    from ftprof.recommend import recommend

    recs = recommend(latest(records), budget)
    if not recs or not recs[0].within_noise_of:
        return []
    by_key = {r.point.key: r.point for r in records}
    return [recs[0].record.point, *(by_key[k] for k in recs[0].within_noise_of)]


def remeasure(
    cfg: SweepConfig, points: list[Point], run: Callable[[SweepConfig, Point], Record] = run_point
) -> Iterator[Record]:
    """Measure ``points`` again over a window three times as long; each new record is appended and, being
    the latest for its point, replaces the earlier measurement in reports."""
    longer = replace(cfg, steps=3 * cfg.steps, min_seconds=3 * cfg.min_seconds)
    for p in points:
        record = run(longer, p)
        append_record(cfg.results_path, record)
        yield record
