"""A generated sentiment task that needs no network and that a model can actually learn.

Each text mixes neutral filler with sentiment words; the label is the polarity that has more words in it
(ties never happen). A bag-of-words model reaches ~100%, a random guess 50%, so accuracy shows learning.
"""

from __future__ import annotations

import random

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

POSITIVE = [
    "good",
    "great",
    "superb",
    "moving",
    "delightful",
    "charming",
    "brilliant",
    "funny",
    "warm",
    "clever",
    "touching",
    "fresh",
    "wonderful",
    "gripping",
    "beautiful",
    "smart",
]
NEGATIVE = [
    "bad",
    "dull",
    "boring",
    "awful",
    "tedious",
    "clumsy",
    "weak",
    "bland",
    "stale",
    "lifeless",
    "messy",
    "shallow",
    "painful",
    "forgettable",
    "tiresome",
    "flat",
]
FILLER = [
    "the",
    "film",
    "story",
    "plot",
    "cast",
    "movie",
    "director",
    "script",
    "scenes",
    "actors",
    "music",
    "this",
    "that",
    "it",
    "was",
    "is",
    "and",
    "but",
    "with",
    "a",
    "of",
    "an",
    "its",
    "their",
    "very",
    "quite",
    "rather",
    "overall",
    "ending",
    "pace",
    "camera",
]
LABELS = ["negative", "positive"]


def make_text(rng: random.Random, label: int) -> str:
    """One text whose majority polarity is ``label``."""
    n_major = rng.randint(1, 3)
    n_minor = rng.randint(0, n_major - 1)
    major, minor = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    words = [rng.choice(major) for _ in range(n_major)] + [rng.choice(minor) for _ in range(n_minor)]
    words += [rng.choice(FILLER) for _ in range(rng.randint(3, 30))]
    rng.shuffle(words)
    return " ".join(words)


def synthetic_dataset(n_train: int = 2000, n_eval: int = 500, seed: int = 0) -> DatasetDict:
    """Train and validation splits with columns ``text`` and ``label`` (a ClassLabel)."""
    rng = random.Random(seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=LABELS)})

    def split(n: int) -> Dataset:
        labels = [rng.randint(0, 1) for _ in range(n)]
        return Dataset.from_dict({"text": [make_text(rng, y) for y in labels], "label": labels}, features=features)

    return DatasetDict(train=split(n_train), validation=split(n_eval))
