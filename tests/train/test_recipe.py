"""One recipe for ``ftprof train`` and a sweep point: both feed the Trainer batches of the same shapes.

Each side is built through its real entry code, without training: the sweep's point (``SweepConfig`` →
``MeasureSpec`` → :func:`ftprof.sweep.measure.build_point`, what :func:`~ftprof.sweep.measure.measure` runs)
and the command the report recommends for it (:func:`ftprof.report.commands.train_command` → ``parse`` →
``setup``), on SST-2 with ``--bf16`` (DeepSpeed trains in bf16 on a CPU) and a ``seq_len`` that is not a
multiple of 8, so the collator's rounding up shows.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from ftprof.point import Point
from ftprof.report.commands import train_command
from ftprof.runtime.deepspeed_config import shipped_config
from ftprof.sweep.measure import MeasureSpec, build_point, training_args
from ftprof.sweep.point_run import SweepConfig
from ftprof.train.causal_lm_data import CausalLMCollator
from ftprof.train.recipe import Recipe
from ftprof.train.run import Setup, parse, setup
from ftprof.train.tasks import CausalLMTrainer
from tests.conftest import ROOT, SHARED_DATA, skip_or_fail

SST2 = SHARED_DATA / "sst2"
SEQ_LEN = 60  # not a multiple of 8: fp16/bf16 batches are padded to 64
BATCHES = 3


def bf16_point(seq_len: int = SEQ_LEN, precision: str = "bf16") -> Point:
    return Point(precision=precision, zero=0, seq_len=seq_len, batch_size=4)  # type: ignore[arg-type]


def sweep_point(cfg: SweepConfig, p: Point, out: Path) -> Recipe:
    """The point's Trainer as :func:`ftprof.sweep.point_run.run_point` specifies it and ``measure`` builds it."""
    spec = MeasureSpec(
        point=p,
        model=cfg.model,
        steps=cfg.steps,
        warmup=cfg.warmup,
        ds_config=cfg.ds_config(p),
        result_path=str(out / "result.json"),
        dataset=cfg.dataset,
        min_seconds=cfg.min_seconds,
        task=cfg.task,
    )
    return build_point(spec, training_args(spec, str(out)))


def recommended_train(cfg: SweepConfig, p: Point, dataset: Path, out: Path) -> Setup:
    """``ftprof train`` with the arguments of the command the report prints for ``p``, plus the user's data."""
    config_path = f"ds_configs/{shipped_config(p)}"  # what the report names when the shipped file is what ran
    record = cfg.record(p, "ok")  # Recommendation.command reads model, point and task off the record
    command = shlex.split(train_command(record.model, record.point, config_path, record.task))
    argv = command[command.index("launch/train.py") + 1 :]
    argv[argv.index("--ds_config") + 1] = str(ROOT / config_path)
    argv += ["--dataset", str(dataset), "--output_dir", str(out), "--report_to", "none"]
    return setup(*parse(argv))


def shapes(loader, n: int = BATCHES) -> list[dict[str, tuple[int, ...]]]:
    return [{k: tuple(v.shape) for k, v in batch.items()} for _, batch in zip(range(n), loader, strict=False)]


@pytest.fixture(scope="module")
def sst2() -> Path:
    if not (SST2 / "train.tsv").is_file():
        skip_or_fail(f"SST-2 is not at {SST2}: put GLUE's SST-2 train.tsv and dev.tsv there")
    return SST2


@pytest.fixture(scope="module")
def classification(sst2, tmp_path_factory) -> tuple[Recipe, Setup]:
    p = bf16_point()
    cfg = SweepConfig(model="tiny-bert", points=[p], out_dir=tmp_path_factory.mktemp("sweep"), dataset=str(sst2))
    return sweep_point(cfg, p, tmp_path_factory.mktemp("point")), recommended_train(
        cfg, p, sst2, tmp_path_factory.mktemp("train")
    )


def test_classification_point_measures_the_batches_train_feeds(classification):
    point, train = classification
    trainer = train.trainer
    assert type(point.trainer) is type(trainer)
    assert type(point.model) is type(trainer.model)
    assert point.collator.pad_to_multiple_of == trainer.data_collator.pad_to_multiple_of == 8
    # The same tokenization (a tokenizer trained on the same texts: its ids of equally frequent pieces may differ
    # from run to run, its pieces do not), truncated to the same --max_length, in the same columns.
    assert point.train.column_names == trainer.train_dataset.column_names
    assert len(point.tokenizer) == len(trainer.processing_class) == point.model.config.vocab_size
    lengths = sorted((len(ids) for ids in trainer.train_dataset["input_ids"]), reverse=True)
    assert lengths[0] == SEQ_LEN  # SST-2 has sentences longer than 60 tokens: truncated to --max_length
    # The point's first batch is train's worst case: its longest rows, padded to a multiple of 8.
    point_batches = list(zip(range(BATCHES), point.trainer.get_train_dataloader(), strict=False))
    assert [len(ids) for ids in point.train[:4]["input_ids"]] == lengths[:4]
    assert shapes(b for _, b in point_batches)[0] == {"input_ids": (4, 64), "attention_mask": (4, 64), "labels": (4,)}
    # Train's collator makes exactly the point's batches from the same rows.
    for i, batch in point_batches:
        again = trainer.data_collator([point.train[j] for j in range(4 * i, 4 * i + 4)])
        assert again.keys() == batch.keys()
        assert all(torch.equal(again[k], batch[k]) for k in batch)
    # Train's own batches (in random order): each padded to its longest row, rounded up to 8, as the point pads.
    for batch in (b for _, b in zip(range(BATCHES), trainer.get_train_dataloader(), strict=False)):
        longest_row = int(batch["attention_mask"].sum(dim=1).max())
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == (4, -(-longest_row // 8) * 8)


@pytest.fixture(scope="module")
def causal_lm(sst2, tmp_path_factory) -> tuple[Recipe, Setup]:
    p = bf16_point()
    cfg = SweepConfig(
        model="tiny-gpt2", points=[p], out_dir=tmp_path_factory.mktemp("sweep"), dataset=str(sst2), task="causal-lm"
    )
    return sweep_point(cfg, p, tmp_path_factory.mktemp("point")), recommended_train(
        cfg, p, sst2, tmp_path_factory.mktemp("train")
    )


def test_causal_lm_point_measures_the_blocks_train_feeds(causal_lm):
    point, train = causal_lm
    trainer = train.trainer
    assert type(point.trainer) is type(trainer) is CausalLMTrainer
    assert type(point.model) is type(trainer.model)
    assert point.collator == trainer.data_collator == CausalLMCollator(trainer.processing_class.pad_token_id)
    # Packed blocks of exactly --max_length tokens (never padded, so no multiple of 8 and no attention mask).
    expected = [{"input_ids": (4, SEQ_LEN), "labels": (4, SEQ_LEN)}] * BATCHES
    assert shapes(point.trainer.get_train_dataloader()) == shapes(trainer.get_train_dataloader()) == expected
    assert {len(ids) for ids in point.train["input_ids"]} == {len(ids) for ids in trainer.train_dataset["input_ids"]}


@pytest.mark.parametrize(
    ("precision", "width"),
    [("bf16", 64), ("fp32", SEQ_LEN)],  # before the shared recipe a bf16 point ran unpadded 60-token rows
)
def test_synthetic_rows_are_padded_as_train_pads_them(tmp_path, precision, width):
    p = bf16_point(precision=precision)
    cfg = SweepConfig(model="tiny-bert", points=[p], out_dir=tmp_path / "sweep")
    point = sweep_point(cfg, p, tmp_path / "point")
    assert (
        shapes(point.trainer.get_train_dataloader())
        == [{"input_ids": (4, width), "attention_mask": (4, width), "labels": (4,)}] * BATCHES
    )
    assert point.model.config.vocab_size == 4096  # the preset's own embedding, whatever the tokenizer
