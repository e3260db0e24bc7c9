"""The estimator judged item by item against the measured breakdown, and its peak on models nobody fitted it to.

    .venv/bin/python bench/bench_breakdown.py activations   # saved activations, 5 families (~30 s)
    .venv/bin/python bench/bench_breakdown.py states        # model states, ZeRO 0-3 x 1-2 ranks (~5 min)
    .venv/bin/python bench/bench_breakdown.py peaks         # base-size models' peak RSS (~10 min)

* activations: predicted vs :class:`SavedActivationMeter` on real forwards of bert, roberta, gpt2 (classification
  and causal LM), llama and distilbert; eager and SDPA, dropout on and off, checkpointing on and off, fp32 and
  bf16. **distilbert is the held-out family**: no test, fit or formula change looked at it.
* states: a tiny-bert (``--model``) sweep over ZeRO 0-3 x 1 and 2 ranks x fp32 and bf16 x optimizer offload
  off and on; each rank's measured parameters, gradients, master weights, optimizer states and offload
  buffers against the prediction for that rank.
* peaks: gpt2, roberta-base and distilbert-base-uncased (full size, random weights), ZeRO 0 and 2, micro-batch
  1 and 4, sequence 128, fp32 on this CPU; calibrated only on the committed tiny profiles (profiles/), so none
  of these points was fitted. Baselines judged on what they estimate, model states against the measured
  model-state bytes, each on the points it models: DeepSpeed's ``estimate_zero2_model_states_mem_needs`` on the
  ZeRO-2 points, accelerate's ``estimate-memory`` ("Training using Adam") on the ZeRO-0 points (the states part
  adds bf16, two ranks and DeepSpeed's ZeRO-3 estimator); ftprof's full estimate against the full peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # architectures only: known offline
HELD_OUT = "distilbert"


def pct(errs: list[float]) -> str:
    absolute = sorted(abs(e) * 100 for e in errs)
    return f"median {statistics.median(absolute):.2f}%, worst {absolute[-1]:.2f}% ({len(absolute)} cases)"


def activations() -> None:
    from ftprof.estimate.calibration import saved_activations_case
    from ftprof.point import Point

    families = [
        ("tiny-bert", "classification"),
        ("tiny-roberta", "classification"),
        ("tiny-gpt2", "classification"),
        ("tiny-gpt2", "causal-lm"),
        ("tiny-llama", "causal-lm"),
        ("tiny-distilbert", "classification"),
    ]
    by_family: dict[str, list[float]] = {}
    for model, task in families:
        for attention in ("eager", "sdpa"):
            for dropout in (False,) if model == "tiny-llama" else (True, False):  # Llama-style: no dropout
                for ckpt in (False, True):
                    for precision in ("fp32", "bf16"):
                        p = Point(batch_size=4, seq_len=128, precision=precision, zero=0, gradient_checkpointing=ckpt)
                        predicted, measured = saved_activations_case(model, p, attention, dropout, task)
                        err = (predicted - measured) / measured
                        by_family.setdefault(f"{model} {task}", []).append(err)
                        print(
                            f"{model:<16}{task:<15}{attention:<6}dropout={int(dropout)} ckpt={int(ckpt)} {precision} "
                            f"predicted {predicted:>10} measured {measured:>10} {100 * err:+7.2f}%"
                        )
    tuned = [e for k, errs in by_family.items() if HELD_OUT not in k for e in errs]
    for k, errs in by_family.items():
        print(f"{k:<32}{pct(errs)}{'  (held out)' if HELD_OUT in k else ''}")
    print(f"{'families tested on':<32}{pct(tuned)}")


def sweep(args: list[str], out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "ftprof.cli.main", "sweep", *args, "--out", str(out), "--no_report", "--no_skip"],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
    )
    from ftprof.records.results import results_path

    return results_path(out)


def baseline_states(arch, pt) -> dict[str, float]:
    """What DeepSpeed's ZeRO-2/3 estimators and accelerate's "Training using Adam" say of a point's model
    states, each only on the points it models."""
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = pt.world_size
    if pt.zero == 2:
        return {"DeepSpeed": estimate_zero2_model_states_mem_needs(arch.params, n, 1, cpu_offload=False)[1]}
    if pt.zero == 3:
        ds = estimate_zero3_model_states_mem_needs(arch.params, arch.largest_param, n, 1, cpu_offload=False)[1]
        return {"DeepSpeed": ds}
    if pt.zero == 0:
        dtype = "float32" if pt.precision == "fp32" else "bfloat16"
        return {"accelerate": max(estimate_training_usage(4 * arch.params, dtype).values())}
    return {}


def states(out: Path, model: str) -> None:
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.estimator import MODEL_STATES, estimate, measured_bytes
    from ftprof.records.results import latest, read_records, results_path

    grid = ["--zero", "0,1,2,3", "--precision", "fp32,bf16", "--world_size", "1,2", "--offload", "none,optimizer"]
    grid += ["--batch_sizes", "2", "--seq_lens", "32", "--steps", "1", "--min_seconds", "0", "--warmup", "0"]
    results = results_path(out)
    if not results.is_file():
        sweep(["--model", model, *grid], out)
    arch = arch_for(model)
    errs: dict[str, list[float]] = {}
    baselines: dict[str, list[float]] = {"ftprof": [], "DeepSpeed": [], "accelerate": []}
    for r in latest(read_records(results)):
        if r.status != "ok":
            print(f"{r.point.key}: {r.status}")
            continue
        pt = r.point
        for rank in r.profile.ranks if r.profile else []:
            est = estimate(arch, pt, device="cpu", rank=rank.rank)
            cells = []
            for item in (*MODEL_STATES, "offload_buffers"):
                m, p = measured_bytes(rank.breakdown, item), est.items.get(item, 0)
                if max(m, p) > 1024:  # DeepSpeed's scalars (norms, flags) are not model state
                    err = (p - m) / m if m else float("inf")
                    errs.setdefault(item, []).append(err)
                    cells.append(f"{item} {100 * err:+.2f}%")
            print(f"{pt.key:<40}rank {rank.rank}: " + ", ".join(cells))
            if pt.offload != "none":
                continue
            # Baselines on the points each one estimates (no offload), against the rank's model-state bytes.
            states_measured = sum(measured_bytes(rank.breakdown, item) for item in MODEL_STATES)
            baselines["ftprof"].append(sum(est.items[i] for i in MODEL_STATES) / states_measured - 1)
            for name, predicted in baseline_states(arch, pt).items():
                baselines[name].append(predicted / states_measured - 1)
    for item, e in errs.items():
        exact = sum(abs(x) <= 0.01 for x in e)
        print(f"{item:<20}{pct(e)}; within 1%: {exact} of {len(e)}")
    print("model states per rank, no offload (DeepSpeed: its ZeRO-2/3 estimators on ZeRO-2/3 points; accelerate on")
    print("ZeRO-0 points, what it models), signed median and worst:")
    for name, e in baselines.items():
        if e:
            print(f"  {name:<12}{pct(e)}; signed median {100 * statistics.median(e):+.1f}%")


def peaks(out: Path) -> None:
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.calibration import calibrate, errors, observations_from_records
    from ftprof.estimate.estimator import MODEL_STATES, Calibration, estimate, measured_bytes
    from ftprof.records.results import latest, read_records, results_path
    from ftprof.units import GIB

    fit_records = [
        r
        for p in ("cpu-2core-tiny-bert", "cpu-2core-tiny-gpt2")
        for r in latest(read_records(results_path(ROOT / "profiles" / p)))
    ]
    archs = {m: arch_for(m) for m in {r.model for r in fit_records}}
    cal = calibrate(
        observations_from_records(fit_records, archs.__getitem__), "cpu", Calibration(device="cpu", reserved_factor=1.0)
    )
    print(f"calibrated on {len(fit_records)} tiny points: {cal}")
    grid = [
        "--zero",
        "0,2",
        "--batch_sizes",
        "1,4",
        "--seq_lens",
        "128",
        "--steps",
        "2",
        "--min_seconds",
        "0",
        "--warmup",
        "1",
    ]
    ours: dict[str, list[float]] = {}
    states_errs: dict[str, list[float]] = {"ftprof": [], "DeepSpeed": [], "accelerate": []}
    for model in ("gpt2", "roberta-base", "distilbert-base-uncased"):
        results = results_path(out / model)
        if not results.is_file():
            sweep(["--model", model, *grid], out / model)
        records = [r for r in latest(read_records(results)) if r.status == "ok"]
        arch = arch_for(model)
        obs = observations_from_records(records, lambda _m, arch=arch: arch)
        for r, ob, err in zip(records, obs, errors(obs, cal), strict=True):
            ours.setdefault(model, []).append(err)
            est = estimate(arch, r.point, cal, "cpu")
            measured = r.profile.ranks[0].breakdown if r.profile else {}
            m_states = sum(measured_bytes(measured, item) for item in MODEL_STATES)
            p_states = sum(est.items.get(item, 0) for item in MODEL_STATES)
            # Each baseline on the points it models: DeepSpeed's ZeRO-2 estimator at ZeRO-2, accelerate at ZeRO-0.
            ds = estimate_zero2_model_states_mem_needs(arch.params, 1, 1, cpu_offload=False)[1]
            acc = max(estimate_training_usage(4 * arch.params, "float32").values())
            states_errs["ftprof"].append((p_states - m_states) / m_states)
            if r.point.zero == 2:
                states_errs["DeepSpeed"].append((ds - m_states) / m_states)
            if r.point.zero == 0:
                states_errs["accelerate"].append((acc - m_states) / m_states)
            baseline = "DeepSpeed" if r.point.zero == 2 else "accelerate"
            print(
                f"{model:<26}{r.point.key:<24} peak {ob.measured / GIB:6.3f} GiB, ftprof {100 * err:+6.1f}% | "
                f"model states {m_states / GIB:6.3f} GiB: ftprof {100 * states_errs['ftprof'][-1]:+6.1f}%, "
                f"{baseline} {100 * states_errs[baseline][-1]:+6.1f}%"
            )
    for model, e in ours.items():
        print(f"peak, {model:<24}{pct(e)}{'  (held-out family)' if HELD_OUT in model else ''}")
    print(f"peak, all{'':<21}{pct([e for v in ours.values() for e in v])}")
    for name, e in states_errs.items():
        print(f"model states, {name:<16}{pct(e)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["activations", "states", "peaks"])
    parser.add_argument("--out", type=Path, help="keep (and reuse) the sweeps here")
    parser.add_argument("--model", default="tiny-bert", help="states: the model swept")
    a = parser.parse_args()
    if a.part == "activations":
        return activations()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        if a.part == "states":
            states(out, a.model)
        else:
            peaks(out)
    print(json.dumps({"done": a.part}))


if __name__ == "__main__":
    main()
