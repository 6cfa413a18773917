"""Adapter registry: versions, promote/rollback, remove, export, checksums, base-model check, pickles
refused, fp16/int8 storage round trips (LoRA and AdaLoRA), routed experts and damaged run.json refused, the CLI, and the
quantisation report (tiny model; on a real run: test_pipeline_integration)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.registry import (CONFIG_FILE, INT8_WEIGHTS_FILE, WEIGHTS_FILE, Registry, decode, encode,
                                   quantisation_report, quantise_int8)

TYPES = ("query", "value", "intermediate.dense")
RANK = 16


class WritesMarker:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. creates the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_adapter(model_dir: Path, out: Path, seed: int = 0):
    """A real PEFT adapter (rank 16 on query, value, intermediate.dense + classifier head) with random weights."""
    from orchestrator.allocation import apply_lora, uniform
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(str(model_dir), 2)
    modules = adaptable_modules(base)
    allocation = uniform(modules, TYPES, RANK)
    model = apply_lora(base, allocation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return model.eval(), allocation.compact(modules)


def make_shortcut_adapter(model_dir: Path, out: Path):
    """A PEFT adapter (rank 4 on one module) with two trained shortcut connections saved beside it; the model."""
    from orchestrator.allocation import Allocation, apply_lora, attach_allocation_shortcuts
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.shortcuts import save_shortcuts

    base = load_model(str(model_dir), 2)
    modules = adaptable_modules(base)
    allocation = Allocation.from_ranks({modules[0].name: 4, "L0.shortcut.residual": 2, "L1.shortcut.cross_block": 2})
    model = apply_lora(base, allocation)
    shortcut_set = attach_allocation_shortcuts(model, allocation, seed=0)
    with torch.no_grad():
        for b in (shortcut_set.factors(spec)[1] for spec in shortcut_set.specs):
            b.normal_(0, 0.5)  # trained shortcuts: they change the logits
    model.save_pretrained(out)
    save_shortcuts(shortcut_set, out)
    return model.eval()


def make_routed_adapter(model_dir: Path, out: Path) -> None:
    """Routed experts (2 experts of rank 1 on every query) as a `routed` run saves them, with save_routed."""
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.routing import attach_routed_adapters, save_routed

    model = load_model(str(model_dir), 2)
    queries = [m.name for m in adaptable_modules(model) if m.name.endswith("query")]
    save_routed(model, attach_routed_adapters(model, queries, 2, 1, 1), out)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from orchestrator.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """(adapter directory, reference PeftModel, compact allocation)."""
    out = tmp_path_factory.mktemp("adapter")
    model, compact = make_adapter(tiny_model_dir, out)
    return out, model, compact


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["the movie was good and very great!", "this plot was dull.", "a cold sad film"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def add(registry: Registry, adapter, model_dir, precision="fp32", name="sentiment", **kwargs):
    directory, _, compact = adapter
    return registry.add(name, directory, "tiny.csv", str(model_dir), compact, {"accuracy": 0.75, "f1": 0.7},
                        precision, **kwargs)


def base_sha(model_dir) -> str:
    """What an entry records of its base model: the SHA-256 of its config.json and weights files' SHA-256s."""
    files = ("config.json", "model.safetensors")
    return hashlib.sha256("\n".join(f"{f}:{sha(Path(model_dir) / f)}" for f in files).encode()).hexdigest()


def snapshot(root: Path) -> tuple[list, list[tuple[str, str]]]:
    """Every entry row and every stored file with its hash (the database file itself, WAL and staging aside)."""
    with sqlite3.connect(root / "registry.db") as conn:
        dump = conn.execute("SELECT * FROM entries ORDER BY name, version").fetchall()
    files = sorted((str(p.relative_to(root)), sha(p)) for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith("registry.db") and ".staging" not in p.parts)
    return dump, files


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


# ---------------------------------------------------------------- versions, metadata, current


def test_add_list_versions_monotonic(registry, adapter, tiny_model_dir):
    directory, _, compact = adapter
    entries = [add(registry, adapter, tiny_model_dir) for _ in range(3)]
    assert [e.version for e in entries] == [1, 2, 3]
    assert [e.parent_version for e in entries] == [None, 1, 2]
    listed = registry.list()
    assert [(e.name, e.version, e.current) for e in listed] == [("sentiment", 1, False), ("sentiment", 2, False),
                                                                  ("sentiment", 3, True)]
    first = listed[0]
    assert first.task == "tiny.csv" and first.precision == "fp32" and first.metrics == {"accuracy": 0.75, "f1": 0.7}
    assert first.allocation == compact and compact.startswith("L0.query:16,L0.value:16,L0.intermediate.dense:16")
    assert first.base_model == str(Path(tiny_model_dir).resolve())
    assert first.base_model_sha256 == base_sha(tiny_model_dir)
    assert first.path == registry.root / "sentiment" / "v1"
    assert sorted(p.name for p in first.path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert (first.path / WEIGHTS_FILE).read_bytes() == (directory / WEIGHTS_FILE).read_bytes()  # fp32: bytes kept
    assert first.files == {name: sha(first.path / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    # a removed version's number is never reused
    registry.remove("sentiment", 2)
    assert add(registry, adapter, tiny_model_dir).version == 4
    assert add(registry, adapter, tiny_model_dir, name="other").version == 1
    assert [(e.name, e.version) for e in registry.list()] == [("other", 1), ("sentiment", 1), ("sentiment", 3),
                                                              ("sentiment", 4)]
    with sqlite3.connect(registry.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_promote_and_rollback_keep_later_versions(registry, adapter, tiny_model_dir):
    for _ in range(3):
        add(registry, adapter, tiny_model_dir)
    assert registry.show("sentiment").version == 3
    assert registry.rollback("sentiment").version == 2
    assert [e.version for e in registry.list()] == [1, 2, 3]  # v3 kept
    assert registry.show("sentiment").version == 2 and not registry.show("sentiment", 3).current
    assert registry.rollback("sentiment").version == 1
    before = snapshot(registry.root)
    with pytest.raises(UserError, match="oldest version.*promote"):
        registry.rollback("sentiment")
    assert snapshot(registry.root) == before
    assert registry.promote("sentiment", 3).current
    assert [e.version for e in registry.list() if e.current] == [3]
    # a version added without --promote does not take over, but records the current one as its parent
    fourth = add(registry, adapter, tiny_model_dir, promote=False)
    assert not fourth.current and fourth.parent_version == 3 and registry.show("sentiment").version == 3
    with pytest.raises(UserError, match="no version 9"):
        registry.promote("sentiment", 9)
    assert registry.show("sentiment").version == 3


def test_concurrent_adds_get_distinct_versions(registry, adapter, tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(lambda _: add(registry, adapter, tiny_model_dir).version, range(4)))
    assert versions == [1, 2, 3, 4]
    assert sum(e.current for e in registry.list()) == 1
    assert sorted(p.name for p in (registry.root / "sentiment").iterdir()) == ["v1", "v2", "v3", "v4"]


def test_remove(registry, adapter, tiny_model_dir):
    add(registry, adapter, tiny_model_dir)
    add(registry, adapter, tiny_model_dir)
    before = snapshot(registry.root)
    with pytest.raises(UserError, match="v2 is the current version"):
        registry.remove("sentiment", 2)
    assert snapshot(registry.root) == before
    registry.remove("sentiment", 1)
    assert not (registry.root / "sentiment" / "v1").exists()
    assert [e.version for e in registry.list()] == [2]
    with pytest.raises(UserError, match="no version 1"):
        registry.show("sentiment", 1)
    registry.remove("sentiment", 2)  # the last one left may go, current or not
    assert registry.list() == []
    assert not list((registry.root / ".staging").iterdir())


def test_an_add_clears_staging_copies_a_killed_add_left(registry, adapter, tiny_model_dir):
    from orchestrator.registry import STALE_STAGING_S

    add(registry, adapter, tiny_model_dir)
    killed, running = registry.root / ".staging" / "tmpkilled", registry.root / ".staging" / "tmpbusy"
    for left in (killed, running):
        left.mkdir()
        (left / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    old = time.time() - STALE_STAGING_S - 60
    os.utime(killed, (old, old))  # a copy no add is still making
    add(registry, adapter, tiny_model_dir)
    assert sorted(p.name for p in (registry.root / ".staging").iterdir()) == ["tmpbusy"]  # another add's, in progress


def test_a_staging_copy_that_vanishes_while_an_add_clears_stale_ones_is_skipped(registry, adapter, tiny_model_dir,
                                                                              monkeypatch):
    """Another add moves its staged copy into place between this add's listing of .staging/ and its stat."""
    add(registry, adapter, tiny_model_dir)
    staging = registry.root / ".staging"
    other = staging / "tmpother"
    other.mkdir()
    listed = Path.iterdir

    def iterdir(self):
        entries = list(listed(self))
        if self == staging and other.exists():
            other.rename(registry.root / "moved-into-place")
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert add(registry, adapter, tiny_model_dir).version == 2


def test_an_add_after_a_restored_backup_numbers_past_the_versions_on_disk(registry, adapter, tiny_model_dir, tmp_path):
    """The README's fix for a damaged registry.db is a backup: versions stored after it keep their files."""
    add(registry, adapter, tiny_model_dir)
    shutil.copy(registry.db_path, tmp_path / "backup.db")
    later = add(registry, adapter, tiny_model_dir, precision="int8")
    files = sorted((p.name, sha(p)) for p in later.path.iterdir())
    shutil.copy(tmp_path / "backup.db", registry.db_path)  # restored: v2 has no row now
    assert add(registry, adapter, tiny_model_dir).version == 3
    assert sorted((p.name, sha(p)) for p in later.path.iterdir()) == files
    assert [e.version for e in registry.list()] == [1, 3]


def test_disk_full_while_an_add_stages_is_one_line_and_changes_nothing(registry, adapter, tiny_model_dir, monkeypatch):
    import errno

    add(registry, adapter, tiny_model_dir)
    before = snapshot(registry.root)
    written = Path.write_bytes

    def full(self, data):
        if ".staging" in self.parts and len(data) > 10_000:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return written(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError) as err:
        add(registry, adapter, tiny_model_dir)
    assert str(err.value) == (f"registry: could not write to '{registry.root}' (No space left on device); free disk space "
                              "or fix permissions, then run the command again")
    assert snapshot(registry.root) == before and not list((registry.root / ".staging").iterdir())
    full_db = registry._db_error(sqlite3.OperationalError("database or disk is full"))
    assert "free disk space or fix permissions, then run the command again" in str(full_db)
    assert "backup" not in str(full_db)


DIES_BEFORE_COMMIT = """
import contextlib, os, sys
from orchestrator.registry import Registry
opened = Registry._connect

@contextlib.contextmanager
def dying(self, write, create=False):
    with opened(self, write, create) as conn:
        yield conn
        os._exit(9)  # the process dies after the command's writes, before its COMMIT

Registry._connect = dying
Registry(sys.argv[1]).remove("sentiment", 1)
"""


def test_a_remove_killed_before_its_commit_keeps_the_version_whole(registry, adapter, tiny_model_dir):
    add(registry, adapter, tiny_model_dir)
    add(registry, adapter, tiny_model_dir)
    killed = subprocess.run([sys.executable, "-c", DIES_BEFORE_COMMIT, str(registry.root)], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert [e.version for e in registry.list()] == [1, 2]
    assert registry.verify("sentiment", 1).version == 1  # every file there, checksums intact


def test_unknown_names_and_versions(registry, adapter, tiny_model_dir):
    assert registry.list() == [] and not registry.root.exists()  # reading creates nothing
    with pytest.raises(UserError, match="no adapter named 'nope'.*registry list"):
        registry.show("nope")
    add(registry, adapter, tiny_model_dir)
    with pytest.raises(UserError, match="no version 7 \\(it has v1\\)"):
        registry.load("sentiment", 7)
    for bad in ("../escape", "a/b", "", ".hidden", "sentiment\n", "registry.db", "registry.db-wal"):
        with pytest.raises(UserError, match="not a valid adapter name"):
            add(registry, adapter, tiny_model_dir, name=bad)
    with pytest.raises(UserError, match="precision 'bf16' is unknown"):
        add(registry, adapter, tiny_model_dir, precision="bf16")
    assert [e.version for e in registry.list()] == [1]
    damaged = bytearray(registry.db_path.read_bytes())
    damaged[4096:8192] = b"\xff" * 4096  # a page past the header: sqlite opens it, then reads garbage
    registry.db_path.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="registry.db cannot be used \\(database disk image is malformed\\).*backup"):
        registry.list()
    registry.db_path.write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="registry.db cannot be used.*restore it from a backup"):
        registry.list()


def test_an_add_refused_for_its_base_model_creates_no_registry(registry, adapter, tmp_path):
    with pytest.raises(UserError):
        add(registry, adapter, tmp_path / "no-such-model")
    assert not registry.root.exists()


# ---------------------------------------------------------------- load, export, integrity


def test_load_reproduces_the_adapter(registry, adapter, tiny_model_dir, tokenizer):
    _, reference, _ = adapter
    add(registry, adapter, tiny_model_dir)
    model = registry.load("sentiment")
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    torch.testing.assert_close(logits(model, tokenizer), logits(reference, tokenizer), rtol=0, atol=1e-6)


def test_export_round_trip(registry, adapter, tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    from orchestrator.models import load_model

    directory, reference, compact = adapter
    add(registry, adapter, tiny_model_dir)
    out = registry.export("sentiment", None, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "registry_entry.json"]
    assert sha(out / WEIGHTS_FILE) == sha(directory / WEIGHTS_FILE)
    assert json.loads((out / "registry_entry.json").read_text())["version"] == 1
    plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir), 2), out)  # a plain PEFT adapter directory
    torch.testing.assert_close(logits(plain, tokenizer), logits(reference, tokenizer), rtol=0, atol=1e-6)
    again = registry.add("reimported", out, "tiny.csv", str(tiny_model_dir))  # allocation read from the config
    assert again.files[WEIGHTS_FILE] == sha(directory / WEIGHTS_FILE) and again.allocation == compact
    a_file, a_link = tmp_path / "a-file", tmp_path / "a-link"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    a_link.symlink_to(tmp_path / "empty")
    for target, message in ((out, "exists and is not an empty directory"), (a_file, "exists and is not an empty directory"),
                            (a_link, "exists and is not an empty directory"), (a_file / "sub", "cannot export to")):
        with pytest.raises(UserError, match=message):
            registry.export("sentiment", 1, target)
    assert a_file.read_text() == "x" and not list((tmp_path / "empty").iterdir())


def test_an_adapter_with_shortcuts_is_stored_loaded_and_exported_whole(registry, tiny_model_dir, tokenizer, tmp_path):
    """The shortcut files ride with the PEFT adapter: without them the stored model would load as another model."""
    from orchestrator.registry import SHORTCUT_FILES

    directory = tmp_path / "with_shortcuts"
    expected = logits(make_shortcut_adapter(tiny_model_dir, directory), tokenizer)

    entry = registry.add("shortcut", directory, "tiny.csv", str(tiny_model_dir))
    assert set(SHORTCUT_FILES) <= set(entry.files)
    assert entry.allocation == "L0.query:4,L0.shortcut.residual:2,L1.shortcut.cross_block:2"  # read from the files
    loaded = registry.load("shortcut")
    assert not any(p.requires_grad for p in loaded.base_model.model.shortcuts.parameters())  # frozen, as loaded
    torch.testing.assert_close(logits(loaded, tokenizer), expected, rtol=0, atol=1e-6)
    out = registry.export("shortcut", None, tmp_path / "exported")
    assert all(sha(out / name) == sha(directory / name) for name in SHORTCUT_FILES)

    from orchestrator.compose import load_sources

    registry.add("shortcut2", directory, "tiny.csv", str(tiny_model_dir))
    with pytest.raises(UserError, match=r"compose --adapters: shortcut@1 carries shortcut connections .* which compose "
                                        "cannot merge"):
        load_sources(registry, ["shortcut", "shortcut2"])

    (directory / SHORTCUT_FILES[1]).unlink()  # half a pair
    with pytest.raises(UserError, match=r"holds shortcuts.json without its partner"):
        registry.add("half", directory, "tiny.csv", str(tiny_model_dir))


def test_tampered_file_is_refused_and_nothing_changes(registry, adapter, tiny_model_dir, tmp_path):
    entry = add(registry, adapter, tiny_model_dir)
    weights = entry.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one tensor value
    weights.write_bytes(bytes(data))
    before = snapshot(registry.root)
    with pytest.raises(UserError, match="adapter_model.safetensors is corrupt or was modified.*remove sentiment 1") as err:
        registry.load("sentiment")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="corrupt"):
        registry.export("sentiment", 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert snapshot(registry.root) == before
    (entry.path / CONFIG_FILE).unlink()
    with pytest.raises(UserError, match="missing adapter_config.json"):
        registry.load("sentiment")


def test_base_model_mismatch_is_refused(registry, adapter, tiny_model_dir, tmp_path):
    other = tmp_path / "other_bert"
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "model.safetensors")
    key = next(k for k in tensors if k.endswith("query.weight"))
    tensors[key] = tensors[key] + 1e-3  # same architecture, different weights
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    add(registry, adapter, tiny_model_dir)
    before = snapshot(registry.root)
    with pytest.raises(UserError, match="is not the one sentiment v1 was stored with.*load it on that model"):
        registry.load("sentiment", base_model=str(other))
    assert snapshot(registry.root) == before
    assert registry.load("sentiment", base_model=str(tiny_model_dir)) is not None


def test_a_changed_base_model_config_is_refused_and_entries_hashed_before_still_load(registry, adapter, tiny_model_dir,
                                                                                      tmp_path):
    """Same weights, another model (heads, activation): other logits. Entries stored before config.json was hashed
    recorded the weights' SHA-256 alone, and still load."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    add(registry, adapter, base)
    original = (base / "config.json").read_bytes()
    config = json.loads(original)
    (base / "config.json").write_text(json.dumps(config | {"num_attention_heads": 4, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="is not the one sentiment v1 was stored with.*load it on that model"):
        registry.load("sentiment")
    (base / "config.json").write_bytes(original)
    assert registry.load("sentiment") is not None
    with sqlite3.connect(registry.db_path) as conn:  # as stored before 2026-12-07
        conn.execute("UPDATE entries SET base_model_sha256 = ?", (sha(base / "model.safetensors"),))
    assert registry.load("sentiment") is not None


def test_an_adapter_that_does_not_load_on_its_base_model_is_refused(registry, adapter, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """Trained on another base model (other shapes), or naming modules the base lacks: refused by `add`, and an entry
    stored before `add` tried loading it is one line from `load`."""
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import TINY, VOCAB
    from orchestrator import registry as registry_module

    wider = tmp_path / "wider"
    shutil.copytree(tiny_model_dir, wider)
    BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), num_labels=2, **(TINY | {"hidden_size": 48}))
                                  ).save_pretrained(wider)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(adapter[0], elsewhere)
    config = json.loads((elsewhere / CONFIG_FILE).read_text())
    (elsewhere / CONFIG_FILE).write_text(json.dumps(config | {"target_modules": ["no_such_module"], "rank_pattern": {},
                                                              "alpha_pattern": {}}))
    for source, base, reason in ((adapter[0], wider, r"Error\(s\) in loading state_dict.*size mismatch"),
                                 (elsewhere, tiny_model_dir, "No modules were targeted")):
        with pytest.raises(UserError, match=f"registry: '{source}' does not load on base model '{base}' \\({reason}.*"
                                            "use the base model it was trained on") as err:
            registry.add("bad", source, "tiny.csv", str(base))
        assert "\n" not in str(err.value) and not registry.root.exists()
    monkeypatch.setattr(registry_module, "peft_model_from_tensors", lambda *args: None)  # add as it was before
    registry.add("bad", adapter[0], "tiny.csv", str(wider))
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"registry: bad v1 does not load on base model .*size mismatch.*"
                                        r"remove it \(`lora-search registry remove bad 1`\)") as err:
        registry.load("bad")
    assert "\n" not in str(err.value)


def test_pickled_weights_are_refused_and_never_unpickled(registry, adapter, tiny_model_dir, tmp_path):
    armed = tmp_path / "armed-check"  # prove the payload is live: unpickling it does create its marker
    torch.save(WritesMarker(armed), tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)
    assert armed.exists()

    marker = tmp_path / "pwned"
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(adapter[0] / CONFIG_FILE, directory / CONFIG_FILE)
    for name in ("adapter_model.bin", "adapter_model.pt"):
        torch.save(WritesMarker(marker), directory / name)
        with pytest.raises(UserError, match="pickled weights.*refused.*safe_serialization=True"):
            registry.add("evil", directory, "tiny.csv", str(tiny_model_dir))
        (directory / name).unlink()
    # a pickle renamed to .safetensors fails the safetensors parser, which runs nothing
    torch.save(WritesMarker(marker), directory / WEIGHTS_FILE)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        registry.add("evil", directory, "tiny.csv", str(tiny_model_dir))
    assert not marker.exists()
    assert registry.list() == [] and not (registry.root / "evil").exists()


def test_routed_experts_are_refused_with_how_to_load_them(registry, tiny_model_dir, tmp_path):
    """A routed model has no PEFT adapter to re-save: the message says where its experts load from instead."""
    directory = tmp_path / "routed"
    make_routed_adapter(tiny_model_dir, directory)
    with pytest.raises(UserError, match=r"holds routed experts \(routed_config.json\), which the registry cannot store.*"
                                        r"orchestrator.routing.load_routed\(base_model, ") as err:
        registry.add("routed", directory, "tiny.csv", str(tiny_model_dir))
    assert "\n" not in str(err.value) and not registry.root.exists()


# ---------------------------------------------------------------- low-precision storage


def test_fp16_and_int8_round_trips(registry, adapter, tiny_model_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file

    _, reference, _ = adapter
    tensors = load_file(adapter[0] / WEIGHTS_FILE)
    lora = [k for k in tensors if ".lora_" in k]
    assert lora and all(tensors[k].ndim == 2 for k in lora)

    name, blob = encode(tensors, "fp16")
    assert name == WEIGHTS_FILE
    for key, value in decode(blob, "fp16").items():
        torch.testing.assert_close(value, tensors[key], rtol=2**-10, atol=1e-7)

    name, blob = encode(tensors, "int8")
    assert name == INT8_WEIGHTS_FILE
    from safetensors.torch import load

    stored = load(blob)
    restored = decode(blob, "int8")
    assert set(restored) == set(tensors)
    assert {tensors[k].shape[0] < tensors[k].shape[1] for k in lora} == {True, False}  # lora_A (r × in), lora_B (out × r)
    for key in lora:
        assert stored[f"{key}.qweight"].dtype == torch.int8 and key not in stored
        per_row = tensors[key].shape[0] <= tensors[key].shape[1]
        scale = stored[f"{key}.scale" if per_row else f"{key}.col_scale"]
        assert f"{key}.{'col_scale' if per_row else 'scale'}" not in stored
        assert scale.dtype == torch.float32 and scale.shape == (RANK,)  # one per rank channel, rows of A, columns of B
        axis = 1 if per_row else 0  # the axis each scale covers
        error = (restored[key] - tensors[key]).abs().amax(dim=axis)
        assert torch.all(error <= scale / 2 * (1 + 1e-5) + 1e-8), key
        torch.testing.assert_close(scale, tensors[key].abs().amax(dim=axis) / 127, rtol=1e-6, atol=0)
    head = next(k for k in tensors if "classifier" in k and k.endswith("weight"))
    assert stored[head].dtype == torch.float16

    sizes = {}
    for precision in ("fp32", "fp16", "int8"):
        entry = add(registry, adapter, tiny_model_dir, precision)
        sizes[precision] = (entry.path / entry.weights_file).stat().st_size
        model = registry.load("sentiment", entry.version)
        tolerance = {"fp32": 1e-6, "fp16": 1e-2, "int8": 5e-2}[precision]
        torch.testing.assert_close(logits(model, tokenizer), logits(reference, tokenizer), rtol=0, atol=tolerance)
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"], sizes
    # an int8 version exports as a plain (dequantised fp32) PEFT adapter
    out = registry.export("sentiment", 3, tmp_path / "int8-export")
    assert load_file(out / WEIGHTS_FILE)[lora[0]].dtype == torch.float32


def test_encoding_the_same_tensors_gives_the_same_bytes(adapter):
    """safetensors writes its metadata in hash-map order; encode sorts it (before 2026-12-07 an fp16 or int8 encoding
    changed from call to call, and add_from_run stored a run's adapter again about every other time)."""
    from safetensors.torch import load_file

    tensors = load_file(adapter[0] / WEIGHTS_FILE)
    for precision in ("fp16", "int8"):
        blobs = {encode(tensors, precision)[1] for _ in range(16)}
        assert len(blobs) == 1 and decode(blobs.pop(), precision).keys() == tensors.keys(), precision


def test_int8_zero_rows_and_exact_bound():
    weight = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-3.0, 2.0, 1e-4]])
    q, scale = quantise_int8(weight)
    assert scale[0] == 0 and torch.all(q[0] == 0) and q[1, 0] == 127 and q[2, 0] == -127
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7)
    q_col, scale_col = quantise_int8(weight.T, per_row=False)  # per column: the same numbers, transposed
    assert torch.equal(q_col, q.T) and torch.equal(scale_col, scale)
    assert torch.all((q_col.float() * scale_col[None, :] - weight.T).abs() <= scale_col[None, :] / 2 + 1e-7)


def lora_pair(rank: int, width: int = 384) -> dict:
    """lora_A (rank × width) and lora_B (width × rank) of one module, random."""
    generator = torch.Generator().manual_seed(rank)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    return {f"{prefix}.lora_A.weight": torch.randn(rank, width, generator=generator),
            f"{prefix}.lora_B.weight": torch.randn(width, rank, generator=generator)}


def test_int8_is_smaller_than_fp16_at_rank_1():
    """Per-row scales gave lora_B (384 × 1) 384 fp32 scales, an int8 file larger than the fp16 one."""
    tensors = lora_pair(1)
    size = {precision: len(encode(tensors, precision)[1]) for precision in ("fp32", "fp16", "int8")}
    assert size["int8"] < size["fp16"] < size["fp32"], size


def test_int8_files_with_per_row_scales_still_decode():
    """A file written before per-column scales holds `<key>.scale` per row for lora_B too: it decodes as it did."""
    from safetensors.torch import save

    tensors = lora_pair(4)
    old = {}
    for key, weight in tensors.items():  # the per-row quantisation of those files, for both matrices
        scale = weight.abs().amax(dim=1) / 127
        old[f"{key}.qweight"] = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        old[f"{key}.scale"] = scale
    restored = decode(save(old, metadata={"format": "pt", "lora_search_precision": "int8"}), "int8")
    assert set(restored) == set(tensors)
    for key in tensors:
        torch.testing.assert_close(restored[key], old[f"{key}.qweight"].float() * old[f"{key}.scale"][:, None],
                                   rtol=0, atol=0)


def test_an_int8_file_without_a_scale_is_one_line(registry, adapter, tiny_model_dir, tmp_path):
    from safetensors.torch import load, save

    entry = add(registry, adapter, tiny_model_dir, "int8")
    copy = tmp_path / "copy"
    shutil.copytree(entry.path, copy)  # a stored version copied out as it is
    tensors = load((copy / INT8_WEIGHTS_FILE).read_bytes())
    del tensors[next(k for k in tensors if k.endswith(".col_scale"))]
    (copy / INT8_WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt", "lora_search_precision": "int8"}))
    with pytest.raises(UserError, match=r"registry: int8 weights hold '.*lora_B.weight.qweight' without its '.scale' or "
                                        r"'.col_scale'; the file is damaged: store the adapter again from its fp32 original"):
        registry.add("copy", copy, "tiny.csv", str(tiny_model_dir))


def test_an_adalora_adapter_is_stored_as_int8(registry, tiny_model_dir, tokenizer, tmp_path):
    """AdaLoRA's keys end in `.lora_A` / `.lora_B` (no `.weight`): int8 quantises them too, not fp16 under the int8 label."""
    from safetensors.torch import load_file

    from orchestrator.allocation import Allocation, apply_adalora
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(str(tiny_model_dir), 2)
    names = [m.name for m in adaptable_modules(base)[:2]]
    model = apply_adalora(base, Allocation.from_ranks({name: 4 for name in names}), 100)
    # what AdaLoRA's pruning leaves in its config: a mask per module keyed by its lora_E vector (all kept here)
    config = model.peft_config["default"]
    config.rank_pattern = {f"{name}.lora_E": [True] * config.init_r for name in names}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(tmp_path / "adalora")
    lora = [k for k in load_file(tmp_path / "adalora" / WEIGHTS_FILE) if k.endswith((".lora_A", ".lora_B"))]
    assert len(lora) == 4

    entry = registry.add("adalora", tmp_path / "adalora", "tiny.csv", str(tiny_model_dir), precision="int8")
    stored = load_file(entry.path / INT8_WEIGHTS_FILE)
    assert all(stored[f"{key}.qweight"].dtype == torch.int8 and key not in stored for key in lora)
    with warnings.catch_warnings():  # and loads without PEFT's false alarm about those keys (README)
        warnings.simplefilter("error", RuntimeWarning)
        loaded = registry.load("adalora")
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model, tokenizer), rtol=0, atol=5e-2)


# ---------------------------------------------------------------- runs and the CLI


@pytest.fixture(scope="module")
def fake_run(tiny_model_dir, tmp_path_factory, sentences):
    """A finished run as the pipeline leaves it: run.json, report.parquet, adapters/<candidate_id>/, a CSV task.
    s1 has shortcut connections; r1 is a routed model (routed experts, kind "routed"), the run's most accurate;
    dyn-a1 is a1 trained dynamically (train.dynamic_every), more accurate than every plain searched model."""
    run = tmp_path_factory.mktemp("results") / "tiny-run"
    texts, labels = sentences
    (run / "adapters").mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(run.parent / "tiny.csv", index=False)
    allocations = {cid: make_adapter(tiny_model_dir, run / "adapters" / cid, seed=seed)[1]
                   for seed, cid in enumerate(("a1", "a2", "b1"))}
    make_shortcut_adapter(tiny_model_dir, run / "adapters" / "s1")
    make_routed_adapter(tiny_model_dir, run / "adapters" / "r1")
    allocations |= {"s1": "L0.query:4,L0.shortcut.residual:2,L1.shortcut.cross_block:2", "r1": "L0.query:1,L1.query:1",
                    "dyn-a1": allocations["a1"]}
    rows = [dict(candidate_id=cid, kind=kind, label=label, allocation=allocations[cid], trainable_params=1000,
                 head_params=66, accuracy=accuracy, f1=accuracy - 0.05, eval_loss=0.6, seed=0, status="completed",
                 adapter_dir=f"adapters/{cid}")
            for cid, kind, label, accuracy in [("a1", "searched", "screen#1", 0.60), ("a2", "searched", "screen#2", 0.70),
                                               ("b1", "baseline", "uniform_qv", 0.90), ("s1", "searched", "screen#3", 0.50),
                                               ("r1", "routed", "screen#2 sparse top-1 E=2", 0.95),
                                               ("dyn-a1", "searched", "screen#1+dynamic", 0.80)]]
    pd.DataFrame(rows).to_parquet(run / "report.parquet")
    config = {"name": "tiny-run", "model": {"name": str(tiny_model_dir), "max_length": 32},
              "data": {"task": str(run.parent / "tiny.csv"), "eval_path": None, "train_size": None, "eval_size": None,
                       "eval_fraction": 0.25, "split_seed": 0},
              "train": {"eval_batch_size": 16}}
    (run / "run.json").write_text(json.dumps({"config": config, "task": {"task": "tiny"}}))
    return run


def test_add_from_run_picks_best_searched(registry, fake_run):
    entry = registry.add_from_run(fake_run)
    assert (entry.name, entry.version, entry.metrics["candidate_id"], entry.metrics["accuracy"]) == ("tiny", 1, "a2", 0.70)
    assert entry.metrics["run"] == "tiny-run" and entry.metrics["evaluated_at"] == "fp32"
    assert "val_accuracy" not in entry.metrics  # the run held no validation split out
    assert entry.source.endswith(":a2:seed0")
    assert entry.files[WEIGHTS_FILE] == sha(fake_run / "adapters" / "a2" / WEIGHTS_FILE)
    baseline = registry.add_from_run(fake_run, "b1", name="tiny-base", precision="int8")
    assert baseline.metrics["kind"] == "baseline" and baseline.precision == "int8"
    with pytest.raises(UserError, match="candidate 'zz' has no trained adapter.*choose one of a1, a2, b1, s1$"):
        registry.add_from_run(fake_run, "zz")  # r1, routed, is not one to choose


def test_a_run_registers_its_adapter_once_per_precision(registry, fake_run, monkeypatch, capsys, tmp_path):
    """A resumed run whose run.json missed the first registration (its write failed, or Ctrl-C) stores nothing twice."""
    from types import SimpleNamespace

    from orchestrator.pipeline import register_best

    cfg = SimpleNamespace(run_dir=fake_run, registry_root=registry.root,
                          register=SimpleNamespace(best=True, name=None, precision="fp32"))
    first = register_best(cfg)
    assert register_best(cfg) == first == {"name": "tiny", "version": 1, "root": str(registry.root)}
    assert registry.add_from_run(fake_run).version == 1
    assert registry.add_from_run(fake_run, precision="int8").version == 2  # another precision is another version
    assert registry.add_from_run(fake_run, "a1").version == 3
    capsys.readouterr()  # register_best's own lines
    code, out, _ = cli(monkeypatch, capsys, "registry", "add", fake_run, "--root", registry.root)
    assert code == 0 and out.startswith("Already stored as tiny v1 (fp32") and len(registry.list()) == 3
    # the run deleted and run again under its name: the same source string, other weights, a version of their own
    from safetensors.torch import load_file, save_file

    # `registry add results/x` from the run's parent: the same run as the absolute path the run registered under
    monkeypatch.chdir(fake_run.parent)
    assert registry.add_from_run(fake_run.name).version == 1
    assert registry.show("tiny", 1).source == f"{fake_run.resolve()}:a2:seed0"
    rerun = shutil.copytree(fake_run, tmp_path / "tiny-run")  # fake_run is shared by the module's tests
    assert registry.add_from_run(rerun).version == 4
    weights = rerun / "adapters" / "a2" / "adapter_model.safetensors"
    save_file({k: v + 1 for k, v in load_file(weights).items()}, weights)
    assert registry.add_from_run(rerun).version == 5


def test_add_from_run_reads_and_encodes_the_adapter_once_and_a_plain_add_still_stores_twice(registry, fake_run,
                                                                                             adapter, tiny_model_dir,
                                                                                             monkeypatch):
    """The already-stored check's int8 encoding is the one add stores (before 2026-12-07 add quantised it again)."""
    from orchestrator import registry as registry_module

    calls = []
    real = registry_module.encode
    monkeypatch.setattr(registry_module, "encode", lambda *args, **kwargs: calls.append(args[1]) or real(*args, **kwargs))
    entry = registry.add_from_run(fake_run, precision="int8")
    assert calls == ["int8"] and entry.version == 1
    assert registry.add_from_run(fake_run, precision="int8").version == 1 and calls == ["int8"] * 2  # the check's own
    assert [add(registry, adapter, tiny_model_dir, "int8").version for _ in range(2)] == [1, 2]  # "sentiment": no check


def test_an_entry_stored_with_a_relative_source_is_found_from_anywhere(registry, fake_run, tmp_path, monkeypatch):
    """Entries stored before sources were absolute name the run as it was given (`results/x`), from a directory no
    one recorded: the run given absolute, or relative from elsewhere, is found by the path's last parts (and weights)."""
    assert registry.add_from_run(fake_run).version == 1
    relative = f"{fake_run.parent.name}/{fake_run.name}"
    with sqlite3.connect(registry.db_path) as conn:
        conn.execute("UPDATE entries SET source = ?", (f"{relative}:a2:seed0",))
    monkeypatch.chdir(tmp_path)
    assert registry.add_from_run(fake_run).version == 1  # absolute, from another directory
    monkeypatch.chdir(fake_run.parent.parent)
    assert registry.add_from_run(f"./{relative}").version == 1
    monkeypatch.chdir(fake_run)
    assert registry.add_from_run("../tiny-run").version == 1
    assert len(registry.list()) == 1
    with sqlite3.connect(registry.db_path) as conn:  # another run's path: its own version
        conn.execute("UPDATE entries SET source = ?", (f"other/{fake_run.name}:a2:seed0",))
    assert registry.add_from_run(fake_run).version == 2


def test_an_entry_stored_with_its_metadata_in_another_order_is_found(registry, fake_run):
    """An fp16 or int8 entry stored before 2026-12-07 may hold safetensors metadata in hash-map order: its recorded
    hash is not the sorted encoding's, yet it holds the same weights, so add_from_run returns it (before, a duplicate)."""
    import struct

    for version, precision in enumerate(("fp16", "int8"), start=1):
        entry = registry.add_from_run(fake_run, precision=precision)
        path = entry.path / entry.weights_file
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header["__metadata__"] = dict(reversed(header["__metadata__"].items()))  # as the old code could write it
        reordered = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        assert len(reordered) == length and reordered != data[8:8 + length], precision
        path.write_bytes(data[:8] + reordered + data[8 + length:])
        with sqlite3.connect(registry.db_path) as conn:  # its recorded hash is of those bytes, as the old code's was
            conn.execute("UPDATE entries SET files = ? WHERE name = ? AND version = ?",
                         (json.dumps(entry.files | {entry.weights_file: sha(path)}), entry.name, entry.version))
        assert entry.version == version and registry.verify(entry.name, version).version == version
        assert registry.add_from_run(fake_run, precision=precision).version == version, precision
        assert registry.verify(entry.name, version).files[entry.weights_file] == sha(path)
    assert [e.version for e in registry.list("tiny")] == [1, 2]
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # modified since: not the entry it was, a version of its own
    assert registry.add_from_run(fake_run, precision="int8").version == 3


def test_a_best_model_that_does_not_beat_the_majority_class_is_stored_but_not_made_current(registry, fake_run, tmp_path,
                                                                                            capsys):
    """It learned nothing: made current, it replaced a model of an earlier run that did."""
    from types import SimpleNamespace

    from orchestrator.pipeline import register_best

    assert registry.add_from_run(fake_run).current  # an earlier run's adapter, current
    run = shutil.copytree(fake_run, tmp_path / "tiny-run")
    frame = pd.read_parquet(run / "report.parquet")
    frame.assign(beats_majority=frame.candidate_id != "a2").to_parquet(run / "report.parquet")
    cfg = SimpleNamespace(run_dir=run, registry_root=registry.root,
                          register=SimpleNamespace(best=True, name=None, precision="fp32"))
    assert register_best(cfg)["version"] == 2 and registry.show("tiny").version == 1
    out = capsys.readouterr().out
    assert "stored tiny v2 in" in out and out.rstrip().endswith("(not made current: it does not beat the majority class)")


def test_a_routed_candidate_is_refused_with_how_to_load_it(registry, fake_run, monkeypatch, capsys):
    """r1 is the run's most accurate model, but routed: never the default pick, and refused by name with the way to
    load it (not with a save_pretrained fix that cannot apply)."""
    assert registry.add_from_run(fake_run).metrics["candidate_id"] == "a2"
    message = "holds routed experts (routed_config.json), which the registry cannot store"
    for call in (registry.add_from_run, quantisation_report):
        with pytest.raises(UserError, match=r"r1' holds routed experts.*orchestrator.routing.load_routed"):
            call(fake_run, "r1")
    for args in (("add", "--root", registry.root), ("quantise",)):
        code, _, err = cli(monkeypatch, capsys, "registry", args[0], fake_run, "--candidate", "r1", *args[1:])
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_dynamic_model_is_never_the_default_pick_and_is_refused_with_its_static_twin(registry, fake_run):
    """Its adapter is the top rank on every module, masked: stored, its allocation and size would be wrong."""
    assert registry.add_from_run(fake_run).metrics["candidate_id"] == "a2"
    for call in (registry.add_from_run, quantisation_report):
        with pytest.raises(UserError, match=r"^registry: candidate 'dyn-a1' is a dynamic model: .*twin 'a1'"):
            call(fake_run, "dyn-a1")


def damaged_run(fake_run: Path, tmp_path: Path, drop: str | None) -> Path:
    """A copy of fake_run whose run.json lacks config.<drop>, or is a JSON list (drop None)."""
    run = tmp_path / f"without-{drop}"
    shutil.copytree(fake_run, run)
    config = json.loads((fake_run / "run.json").read_text())["config"]
    damaged = [config] if drop is None else {"config": {k: v for k, v in config.items() if k != drop}}
    (run / "run.json").write_text(json.dumps(damaged))
    return run


def test_a_damaged_run_json_is_one_line_naming_what_is_missing(registry, fake_run, tmp_path, monkeypatch, capsys):
    calls = (registry.add_from_run, quantisation_report)  # each names the first key it reads that is missing
    for drop, missing in ((None, ("config.name", "config.data.task")), ("data", ("config.data.task",) * 2),
                          ("model", ("config.model.name",) * 2)):
        run = damaged_run(fake_run, tmp_path, drop)
        for call, key in zip(calls, missing):
            with pytest.raises(UserError, match=f"run.json' has no '{key}'; restore it from a backup"):
                call(run)
    run = damaged_run(fake_run, tmp_path, "train")
    assert registry.add_from_run(run).version == 1  # add reads no training settings
    code, _, err = cli(monkeypatch, capsys, "registry", "quantise", run)
    assert code == 2 and "run.json' has no 'config.train.eval_batch_size'" in err and err.count("\n") == 1, err


def test_quantisation_report_counts_the_shortcut_weights(registry, fake_run, tmp_path):
    """s1's shortcuts.safetensors is stored (fp32) at every precision: its size is part of what each one costs."""
    from orchestrator.registry import SHORTCUT_WEIGHTS, write_quantisation_report

    source = fake_run / "adapters" / "s1"
    tensors = decode((source / WEIGHTS_FILE).read_bytes(), "fp32")
    table = quantisation_report(fake_run, "s1").set_index("precision")
    for precision, size in table.size_bytes.items():
        assert size == len(encode(tensors, precision)[1]) + (source / SHORTCUT_WEIGHTS).stat().st_size, precision
    entry = registry.add_from_run(fake_run, "s1", precision="int8")  # what the registry stores, fp32 shortcuts and all
    assert table.size_bytes["int8"] == sum((entry.path / f).stat().st_size for f in (INT8_WEIGHTS_FILE, SHORTCUT_WEIGHTS))
    write_quantisation_report(table.reset_index(), tmp_path)
    assert "shortcuts.safetensors (fp32 at every precision)" in (tmp_path / "quantisation.md").read_text()


def test_quantisation_report_on_a_run(fake_run):
    table = quantisation_report(fake_run)
    assert list(table.precision) == ["fp32", "fp16", "int8"]
    assert table.attrs["candidate_id"] == "a2" and table.attrs["eval_examples"] == 16
    sizes = table.set_index("precision").size_bytes
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert table.accuracy_change_pts.iloc[0] == 0 and table.max_abs_weight_error.iloc[0] == 0
    assert table.accuracy.between(0, 1).all()


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `lora-search ARGS` in this process through cli.main: (exit code, stdout, stderr)."""
    from orchestrator import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["lora-search", *map(str, args)])
    code = 0
    try:
        cli_module.main()
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_commands(monkeypatch, capsys, fake_run, tmp_path):
    root = ["--root", tmp_path / "reg"]
    code, out, _ = cli(monkeypatch, capsys, "registry", "add", fake_run, *root)
    assert code == 0 and "Added tiny v1 (fp32" in out and "current" in out and "candidate a2" in out
    code, out, _ = cli(monkeypatch, capsys, "registry", "add", fake_run, "--candidate", "a1", "--precision", "int8", *root)
    assert code == 0 and "Added tiny v2 (int8" in out
    code, out, _ = cli(monkeypatch, capsys, "registry", "list", "--registry", tmp_path / "reg")  # compose's spelling
    assert code == 0 and "tiny" in out and "int8" in out and "fp32" in out
    # captured output is 80 columns wide: the list folds text and cuts no number
    assert "…" not in out and all(f"{e.size_bytes:,}" in out for e in Registry(tmp_path / "reg").list())
    code, out, _ = cli(monkeypatch, capsys, "registry", "show", "tiny", "--version", "1", *root)
    assert code == 0 and "SHA-256" in out and "candidate_id=a2" in out and "allocation  L0.query:16" in out
    code, out, _ = cli(monkeypatch, capsys, "registry", "rollback", "tiny", *root)
    assert code == 0 and "tiny v1" in out
    code, out, err = cli(monkeypatch, capsys, "registry", "rollback", "tiny", *root)
    assert code == 2 and err.startswith("error: registry: 'tiny' v1 is its oldest version") and err.count("\n") == 1
    code, out, _ = cli(monkeypatch, capsys, "registry", "promote", "tiny", 2, *root)
    assert code == 0 and "Current: tiny v2" in out
    code, out, _ = cli(monkeypatch, capsys, "registry", "export", "tiny", tmp_path / "exp", "--version", 1, *root)
    assert code == 0 and sha(tmp_path / "exp" / WEIGHTS_FILE) == sha(fake_run / "adapters" / "a2" / WEIGHTS_FILE)
    for args, message in ((("show", "tiny", "--version", "5"), "no version 5 (it has v1, v2)"),
                          (("remove", "tiny", "2"), "v2 is the current version"),
                          (("add", tmp_path / "no-run"), "has no run.json"),
                          (("add", fake_run, "--precision", "int4"), "precision 'int4' is unknown")):
        code, _, err = cli(monkeypatch, capsys, "registry", *args, *root)
        assert code == 2 and message in err, (args, err)
    code, out, _ = cli(monkeypatch, capsys, "registry", "remove", "tiny", 1, *root)
    assert code == 0 and "Removed tiny v1" in out
    code, out, _ = cli(monkeypatch, capsys, "registry", "quantise", fake_run, "--out", tmp_path / "q")
    assert code == 0 and "int8" in out and "accuracy_change_pts" in out
    assert pd.read_csv(tmp_path / "q" / "quantisation.csv").precision.tolist() == ["fp32", "fp16", "int8"]
    assert "Low-precision adapter storage" in (tmp_path / "q" / "quantisation.md").read_text()


def test_cli_list_never_folds_a_name(monkeypatch, capsys, registry, adapter, tiny_model_dir):
    """In 80 columns (a narrow terminal, a pipe) a name is shown whole, to be copied into `show`/`promote`; task, base
    model and date fold, and a name too long for the width makes longer lines, with no column cut off (before
    2026-12-07 names longer than 8 characters were folded)."""
    long = "rotten_tomatoes-int8-distilled.v12"
    for name in ("rotten_tomatoes", long):
        add(registry, adapter, tiny_model_dir, name=name)
    code, out, _ = cli(monkeypatch, capsys, "registry", "list", "--root", registry.root)
    rows = [line.split() for line in out.splitlines() if line.startswith("rotten")]
    assert code == 0 and [row[:3] for row in rows] == [["rotten_tomatoes", "1", "*"], [long, "1", "*"]], out
    assert all(f"{e.size_bytes:,}" in row and e.created_at[:10] in row for e, row in zip(registry.list(), rows)), out


def test_cli_bad_or_missing_root_is_one_line_and_changes_nothing(monkeypatch, capsys, fake_run, tmp_path):
    """--root a file, under a file, or a new empty directory: exit 2, one line, and nothing made (no registry.db)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a registry")
    empty = tmp_path / "empty"
    empty.mkdir()
    fix = "; point --root at a registry directory you can write"
    cases = [(a_file, args, f"registry --root: '{a_file}' is not a directory{fix}")
             for args in (("promote", "tiny", 1), ("rollback", "tiny"), ("remove", "tiny", 1), ("list",), ("add", fake_run))]
    cases += [(a_file / "sub", ("add", fake_run), f"registry --root: cannot open '{a_file / 'sub'}' (Not a directory){fix}")]
    cases += [(empty, args, f"registry: no adapter named 'nosuch' in {empty}; see `lora-search registry list")
              for args in (("promote", "nosuch", 1), ("rollback", "nosuch"), ("remove", "nosuch", 1), ("show", "nosuch"))]
    for root, args, message in cases:
        code, _, err = cli(monkeypatch, capsys, "registry", *args, "--root", root)
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, (root, args, err)
    assert a_file.read_text() == "not a registry" and list(empty.iterdir()) == []


def test_cli_entry_point_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "registry", "show", "nope", "--root", str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: registry: no adapter named 'nope'") and done.stderr.count("\n") == 1
