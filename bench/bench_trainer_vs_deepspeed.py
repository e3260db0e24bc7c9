"""Plain HF Trainer against the DeepSpeed launcher's ZeRO-0 and ZeRO-2 on one device: samples/s side by side.

    python bench/bench_trainer_vs_deepspeed.py --model bert-base-uncased --batch_size 32 --seq_len 128
    python bench/bench_trainer_vs_deepspeed.py --model tiny-bert --batch_size 8 --seq_len 64 --precision fp32

Each variant is one sweep point measured exactly as ``ftprof sweep`` measures it (``ftprof.sweep.measure`` in a
fresh process: random weights, synthetic rows, the profiler's window of ``--steps`` steps and ``--min_seconds``),
the plain variant with no DeepSpeed config at all. The table gives each variant's median samples/s with its ~95%
interval, its ratio to plain Trainer, and its peaks. Goals (issue 24): ZeRO-0 >= 1.0x, ZeRO-2 >= 0.95x.
Set FTPROF_DS_OPTIMIZER=torch to step every variant with the same torch optimizer (Trainer's --optim).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ftprof.point import Point
from ftprof.records.profile import Profile
from ftprof.runtime.deepspeed_config import ds_config_for
from ftprof.sweep import measure

VARIANTS = {"plain": None, "zero0": 0, "zero2": 2}


def run_variant(args: argparse.Namespace, zero: int | None, folder: Path) -> tuple[Profile | None, str]:
    """The variant's profile (None when it failed) and its output tail."""
    point = Point(precision=args.precision, zero=zero or 0, seq_len=args.seq_len, batch_size=args.batch_size)
    spec = measure.MeasureSpec(
        point=point,
        model=args.model,
        steps=args.steps,
        warmup=args.warmup,
        ds_config=None if zero is None else ds_config_for(zero),
        result_path=str(folder / "result.json"),
        min_seconds=args.min_seconds,
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, measure.__file__, str(spec.write(folder / "spec.json"))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    result = folder / "result.json"
    profile = Profile.from_json(json.loads(result.read_text())) if out.returncode == 0 and result.exists() else None
    return profile, (out.stdout + out.stderr)[-2000:]


def row(name: str, profile: Profile, plain: Profile | None) -> dict:
    rank = profile.ranks[0]
    ratio = profile.samples_per_s / plain.samples_per_s if plain and plain.samples_per_s else None
    return {
        "variant": name,
        "samples_per_s": profile.samples_per_s,
        "step_s_median": profile.step_time_median_s,
        "step_s_low": profile.step_time_median_low_s,
        "step_s_high": profile.step_time_median_high_s,
        "steps": profile.steady_steps,
        "ratio_to_plain": ratio,
        "peak_bytes": profile.peak(),
        "torch_allocated_peak_bytes": rank.peak("torch_allocated_bytes") or None,
        "torch_reserved_peak_bytes": rank.peak("torch_reserved_bytes") or None,
        "optimizer": rank.levers.get("optimizer"),
        "optimizer_impl": rank.levers.get("optimizer_impl"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min_seconds", type=float, default=3.0)
    parser.add_argument("--variants", default="plain,zero0,zero2")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--jsonl", type=Path, help="also write one JSON line per variant here")
    args = parser.parse_args()
    rows, plain = [], None
    for name in args.variants.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            profile, tail = run_variant(args, VARIANTS[name], Path(tmp))
        if profile is None:
            print(f"{name}: failed\n{tail}", file=sys.stderr)
            rows.append({"variant": name, "error": tail[-500:]})
            continue
        plain = profile if name == "plain" else plain
        rows.append(row(name, profile, plain))
    print(f"{args.model} {args.precision} batch {args.batch_size} seq {args.seq_len}")
    print(f"{'variant':8} {'samples/s':>10} {'step ms (95% CI)':>24} {'x plain':>8} {'peak GiB':>9}  optimizer")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:8} failed")
            continue
        ci = f"{r['step_s_median'] * 1e3:.1f} ({r['step_s_low'] * 1e3:.1f}-{r['step_s_high'] * 1e3:.1f})"
        ratio = f"{r['ratio_to_plain']:.3f}" if r["ratio_to_plain"] else "-"
        print(
            f"{r['variant']:8} {r['samples_per_s']:10.1f} {ci:>24} {ratio:>8} {r['peak_bytes'] / 2**30:9.2f}"
            f"  {r['optimizer']} ({r['optimizer_impl']})"
        )
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
