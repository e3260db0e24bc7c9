"""Estimator accuracy on this machine's CPU: predicted vs measured peak RSS, on points not used to calibrate,
beside DeepSpeed's and accelerate's estimators on the same points.

    .venv/bin/python bench/bench_estimate.py                        # sweeps 4 models (~10 min on 2 cores)
    .venv/bin/python bench/bench_estimate.py --profiles DIR [DIR...] # judge existing sweeps instead

Models: two encoders and two decoders, tiny (presets) and small (4 layers, hidden 256, from local configs).
Grid per model: ZeRO 0 and 2, micro-batch 4/16/32, sequence 128/512, fp32 (CPU). Every other point (stable
order) calibrates the constants; the error is reported on the others.

Baselines, computed for the same points:
* DeepSpeed ``estimate_zero2_model_states_mem_needs`` (no offload, 1 rank): 2·P + 18·P bytes — model states only;
* accelerate ``estimate-memory``'s "Training using Adam": the largest item of ``estimate_training_usage``
  (16·P bytes in fp32) — also model states only, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMALL = {
    "small-bert": {
        "model_type": "bert",
        "vocab_size": 8192,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "max_position_embeddings": 512,
    },
    "small-gpt2": {
        "model_type": "gpt2",
        "vocab_size": 8192,
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 512,
        "bos_token_id": 8191,
        "eos_token_id": 8191,
    },
}
GRID = ["--zero", "0,2", "--batch_sizes", "4,16,32", "--seq_lens", "128,512", "--steps", "2", "--warmup", "1"]


def sweep(model: str, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "ftprof.cli.main", "sweep", "--model", model, *GRID, "--out", str(out), "--no_report"],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
    )
    return out


def evaluate(profiles: list[Path]) -> dict:
    """Fit on half, judge on the other half; print a table and return the summary."""
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.calibration import calibrate, error_summary, errors, observations_from_records, split_holdout
    from ftprof.estimate.estimator import Calibration
    from ftprof.records.results import latest, read_records, results_path
    from ftprof.units import GIB

    records = [r for p in profiles for r in latest(read_records(results_path(p)))]
    archs = {m: arch_for(m) for m in {r.model for r in records}}
    observations = observations_from_records(records, archs.__getitem__)
    fit, held_out = split_holdout(observations)
    cal = calibrate(fit, "cpu", Calibration(device="cpu", reserved_factor=1.0))
    ours = errors(held_out, cal)
    deepspeed_errs, accelerate_errs = [], []
    print(f"{'model':<16}{'setting':<22}{'measured GiB':>13}{'ftprof':>9}{'DeepSpeed':>11}{'accelerate':>11}")
    for ob, err in zip(held_out, ours, strict=True):
        p = ob.arch.params
        ds = estimate_zero2_model_states_mem_needs(p, 1, 1, cpu_offload=False)[1]
        acc = max(estimate_training_usage(4 * p, "float32").values())
        deepspeed_errs.append((ds - ob.measured) / ob.measured)
        accelerate_errs.append((acc - ob.measured) / ob.measured)
        s = ob.point
        print(
            f"{ob.arch.name:<16}{f'z{s.zero} b{s.batch_size} s{s.seq_len}':<22}{ob.measured / GIB:>13.3f}"
            f"{100 * err:>+8.1f}%{100 * deepspeed_errs[-1]:>+10.1f}%{100 * accelerate_errs[-1]:>+10.1f}%"
        )
    summary = {
        "points_fit": len(fit),
        "points_judged": len(held_out),
        "ftprof": error_summary(ours),
        "deepspeed_zero2_estimator": error_summary(deepspeed_errs),
        "accelerate_estimate_memory": error_summary(accelerate_errs),
        "calibration": {
            "runtime_gib": round(cal.runtime_bytes / GIB, 3),
            "activation_factor": round(cal.activation_factor, 3),
            "zero_runtime_gib": round(cal.zero_runtime_bytes / GIB, 3),
        },
    }
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="*", type=Path, help="existing sweep folders to judge")
    a = parser.parse_args()
    if a.profiles:
        evaluate(a.profiles)
        return
    with tempfile.TemporaryDirectory() as tmp:
        profiles = []
        for name in ("tiny-bert", "tiny-gpt2", *SMALL):
            model = name
            if name in SMALL:
                model_dir = Path(tmp) / name
                model_dir.mkdir()
                (model_dir / "config.json").write_text(json.dumps(SMALL[name]))
                model = str(model_dir)
            profiles.append(sweep(model, Path(tmp) / f"profile-{name}"))
            print(f"swept {name}", flush=True)
        evaluate(profiles)


if __name__ == "__main__":
    main()
