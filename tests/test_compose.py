"""Adapter composition: exact ΔW by concatenation (ranks differ, modules only some sources adapt), the saved
adapter round trip through PEFT and the registry, the L1-penalised search, the head fit, task regrouping,
bad input, the CLI; and (slow) composition of adapters trained by the pipeline's own Ray training path."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from orchestrator.compose import (ComposeConfig, Few, MergedModel, compare, concatenate, fit_head, head_cv_loss,
                                  learn_weights, load_sources, load_task_spec, regroup, save_composed)
from orchestrator.data import Split, TaskData
from orchestrator.errors import UserError
from orchestrator.registry import Registry

# (module types, rank, alpha ratio, rsLoRA): ranks, scalings and covered modules all differ
SOURCES = {"alpha": (("query", "value"), 4, 2.0, False),
           "beta": (("query", "intermediate.dense"), 8, 1.0, False),
           "gamma": (("value",), 2, 4.0, True)}


def make_source(model_dir: Path, out: Path, types, rank: int, alpha_ratio: float, rslora: bool, seed: int):
    """A real PEFT LoRA adapter with random factors (B ≠ 0) and a head; returns the PeftModel."""
    from peft import get_peft_model

    from orchestrator.allocation import Allocation
    from orchestrator.models import adaptable_modules, head_modules, load_model

    base = load_model(str(model_dir), 2)
    config = Allocation.from_ranks({m.name: rank for m in adaptable_modules(base) if m.type in types},
                                   alpha_ratio).to_lora_config(head_modules(base))
    config.use_rslora = rslora
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    trained = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    with torch.no_grad():
        for param in trained:
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return model.eval()


def peft_delta(model, name: str) -> torch.Tensor:
    """PEFT's own ΔW of one module of a source (zeros where the source has no adapter)."""
    module = model.base_model.model.get_submodule(name)
    if "default" in getattr(module, "lora_A", {}):
        return module.get_delta_weight("default")
    return torch.zeros_like(module.weight)


@pytest.fixture(scope="module")
def pool(tiny_model_dir, tmp_path_factory):
    """A registry holding the three sources, and their PeftModels (the reference for ΔW)."""
    root = tmp_path_factory.mktemp("compose")
    registry = Registry(root / "registry")
    models = {}
    for seed, (name, (types, rank, ratio, rslora)) in enumerate(SOURCES.items()):
        models[name] = make_source(tiny_model_dir, root / name, types, rank, ratio, rslora, seed)
        registry.add(name, root / name, f"task-{name}", str(tiny_model_dir), None, {"accuracy": 0.5})
    return registry, models


@pytest.fixture(scope="module")
def sources(pool, tiny_model_dir):
    registry, _ = pool
    loaded, base = load_sources(registry, list(SOURCES), None)
    assert base == str(Path(tiny_model_dir).resolve())
    return loaded


def tiny_task(texts, labels, name="tiny") -> TaskData:
    """Train/eval halves of the conftest sentences (label 1 positive, 0 negative)."""
    return TaskData(name, ["negative", "positive"], Split(texts[:48], labels[:48]), Split(texts[48:], labels[48:]))


# ---------------------------------------------------------------- exact composition


def test_concatenation_is_exact_sum_of_peft_deltas(sources, pool):
    _, models = pool
    weights = [0.7, -1.2, 0.4]
    composed = concatenate(sources, weights)
    query, value, ffn = (f"bert.encoder.layer.1.{t}" for t in ("attention.self.query", "attention.self.value",
                                                                "intermediate.dense"))
    assert set(composed) == {f"bert.encoder.layer.{i}.{t}" for i in (0, 1)
                             for t in ("attention.self.query", "attention.self.value", "intermediate.dense")}
    # rank Σ r_i over the sources that adapt the module: q = alpha 4 + beta 8, v = alpha 4 + gamma 2, ffn = beta 8
    assert {n: composed[n][0].shape[0] for n in (query, value, ffn)} == {query: 12, value: 6, ffn: 8}
    for name, (A, B) in composed.items():
        expected = sum(w * peft_delta(models[s], name) for w, s in zip(weights, SOURCES))
        assert torch.allclose(B @ A, expected, atol=1e-6), name
    assert sources[2].blocks[value].scaling == pytest.approx(4.0 * 2 / 2 ** 0.5)  # rsLoRA: alpha / √r


def test_an_interrupted_save_keeps_the_adapter_an_earlier_compose_saved(sources, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    from peft import PeftModel

    head = fit_head(np.random.default_rng(0).normal(size=(12, 32)), [0, 1] * 6, 2)
    out = save_composed(sources, [1.0, 1.0, 1.0], head, str(tiny_model_dir), tmp_path / "composed")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(self, save_directory, **kwargs):
        (Path(save_directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_composed(sources, [0.5, -0.25, 1.0], head, str(tiny_model_dir), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".composed")) == []


def test_saved_adapter_loads_with_peft_and_registry_and_matches_merged(sources, pool, tiny_model_dir, tmp_path, sentences):
    from peft import PeftModel

    from orchestrator.data import make_loader
    from orchestrator.models import load_model, load_tokenizer

    registry, _ = pool
    weights = [0.5, -0.25, 1.0]
    head = fit_head(np.random.default_rng(0).normal(size=(12, 32)), [0, 1] * 6, 2)
    out = save_composed(sources, weights, head, str(tiny_model_dir), tmp_path / "composed")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"][0] == "classifier"
    assert config["rank_pattern"][r"bert\.encoder\.layer\.0\.attention\.self\.query"] == 12
    assert all(config["alpha_pattern"][k] == r for k, r in config["rank_pattern"].items())  # scaling 1

    texts, labels = sentences
    loader = make_loader(Split(texts[:16], labels[:16]), load_tokenizer(str(tiny_model_dir)), 32, 16, shuffle=False)
    merged = MergedModel(str(tiny_model_dir), 2, sources, torch.device("cpu"))
    merged.set_weights(weights)
    merged.set_head(head)
    batch = next(iter(loader))
    batch.pop("labels")
    with torch.no_grad():
        want = merged.model(**batch).logits
        peft_model = PeftModel.from_pretrained(load_model(str(tiny_model_dir), 2), out).eval()
        assert torch.allclose(peft_model(**batch).logits, want, atol=1e-5)
        entry = registry.add("composed", out, "tiny", str(tiny_model_dir), None, {"accuracy": 0.5})
        assert entry.allocation.startswith("L0.query:12,L0.value:6,L0.intermediate.dense:8")
        assert torch.allclose(registry.load("composed")(**batch).logits, want, atol=1e-5)


def test_merged_weights_zero_is_base_model(sources, tiny_model_dir):
    from orchestrator.models import load_model

    merged = MergedModel(str(tiny_model_dir), 2, sources, torch.device("cpu"))
    base = load_model(str(tiny_model_dir), 2).state_dict()
    merged.set_weights([1.0, 1.0, 1.0])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(merged.model.state_dict()[name], base[name])
    merged.set_weights([0.0, 0.0, 0.0])
    assert all(torch.equal(t, base[k]) for k, t in merged.model.state_dict().items() if "classifier" not in k)


# ---------------------------------------------------------------- the head and the search


def test_fit_head_matches_sklearn_and_cv_loss_tracks_signal():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 8)
    informative = np.eye(3)[labels] * 3 + rng.normal(scale=0.3, size=(24, 3))
    features = np.concatenate([informative, rng.normal(size=(24, 5))], axis=1)
    for k, y in ((3, labels), (2, labels % 2)):
        head = fit_head(features, y, k)
        assert head.weight.shape == (k, 8) and head.bias.shape == (k,)
        probs = torch.softmax(torch.from_numpy(features @ head.weight.T + head.bias).double(), -1).numpy()
        reference = LogisticRegression(C=1.0, max_iter=2000).fit(features, y).predict_proba(features)
        assert np.allclose(probs, reference, atol=1e-5)
    noise = rng.normal(size=(24, 8))
    assert head_cv_loss(features, labels, 3, 4, 0) < 0.5 < head_cv_loss(noise, labels, 3, 4, 0)


@pytest.fixture(scope="module")
def few(sources, tiny_model_dir, sentences):
    from orchestrator.data import make_loader
    from orchestrator.models import load_tokenizer

    texts, labels = sentences
    loader = make_loader(Split(texts[:16], labels[:16]), load_tokenizer(str(tiny_model_dir)), 32, 16, shuffle=False)
    merged = MergedModel(str(tiny_model_dir), 2, sources, torch.device("cpu"))
    return lambda cfg: Few(merged, loader, labels[:16], 2, cfg)


def test_learned_search_objective_and_l1_shrinks_weights(few):
    free_cfg, cfg = ComposeConfig(trials=15, l1=0.0), ComposeConfig(trials=15, l1=5.0)
    free, free_study = learn_weights(few(free_cfg), 3, free_cfg)
    shrunk, study = learn_weights(few(cfg), 3, cfg)
    assert study.trials[0].params == {f"w{i}": pytest.approx(1 / 3) for i in range(3)}  # starts at uniform
    for trial in study.trials:  # objective = few-shot CV loss + l1 · Σ|w|
        assert trial.value == pytest.approx(trial.user_attrs["loss"] + 5.0 * sum(abs(v) for v in trial.params.values()))
    assert sum(map(abs, shrunk)) < sum(map(abs, free)) and sum(map(abs, shrunk)) <= 1.0 + 1e-9
    assert all(abs(w) <= 1.5 for w in free + shrunk)
    assert free_study.best_value <= free_study.trials[0].value


def test_compare_all_methods_on_held_out_split(sources, tiny_model_dir, sentences):
    texts, labels = sentences
    cfg = ComposeConfig(shots=6, trials=6, train_epochs=2, max_length=32)
    table, outcomes = compare(sources, str(tiny_model_dir), tiny_task(texts, labels), cfg, torch.device("cpu"))
    assert table.method.tolist() == list(cfg.methods)
    assert (table.few_shot_examples == 12).all() and (table.eval_examples == 16).all()
    assert table.accuracy.between(0, 1).all() and (table.search_s > 0).all() and (table.cost_usd > 0).all()
    weights = {m: json.loads(w) for m, w in zip(table.method, table.weights) if isinstance(w, str)}
    assert list(weights["uniform"].values()) == pytest.approx([1 / 3] * 3, abs=1e-6) and set(weights["zero_shot"].values()) == {0}
    assert sorted(weights["single_best"].values()) == [0, 0, 1]
    chosen = table.set_index("method").chosen["single_best"]
    losses = outcomes["single_best"].extra["source_losses"]
    assert chosen == min(losses, key=losses.get)
    assert outcomes["few_shot_training"].weights is None and pd.isna(table.set_index("method").weights["few_shot_training"])


@pytest.mark.parametrize("family", ["distilbert", "deberta", "roberta"])
def test_compose_fits_the_heads_last_linear_and_saves_the_whole_head(family, encoder_dir, tmp_path, sentences):
    """DistilBERT's pre_classifier, DeBERTa's pooler and RoBERTa's dense come before the layer compose fits: they keep
    the base model's weights, and the saved adapter holds them, so PEFT and the registry reload the composed model."""
    from peft import PeftModel

    from orchestrator.models import load_model, load_tokenizer

    model_dir = str(encoder_dir(family))
    registry = Registry(tmp_path / "registry")
    for seed, name in enumerate(("alpha", "beta")):
        make_source(model_dir, tmp_path / name, *SOURCES[name], seed)
        registry.add(name, tmp_path / name, f"task-{name}", model_dir, None, {"accuracy": 0.5})
    sources, base_model = load_sources(registry, ["alpha", "beta"])
    texts, labels = sentences
    cfg = ComposeConfig(shots=6, trials=4, max_length=32, methods=("uniform", "learned"))
    table, outcomes = compare(sources, base_model, tiny_task(texts, labels), cfg, torch.device("cpu"))
    assert table.accuracy.between(0, 1).all() and table.few_shot_cv_loss.notna().all()

    learned = outcomes["learned"]
    out = save_composed(sources, learned.weights, learned.head, base_model, tmp_path / "composed")
    merged = MergedModel(base_model, 2, sources, torch.device("cpu"))
    merged.set_weights(learned.weights)
    merged.set_head(learned.head)
    batch = load_tokenizer(model_dir)(texts[48:], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = merged.model(**batch).logits
        reloaded = PeftModel.from_pretrained(load_model(model_dir, 2, seed=9), out).eval()  # another fresh head
        torch.testing.assert_close(reloaded(**batch).logits, want, rtol=0, atol=1e-5)
        registry.add("composed", out, "tiny", model_dir, None, {"accuracy": 0.5})
        torch.testing.assert_close(registry.load("composed")(**batch).logits, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- tasks


def test_regroup_and_few_shot_sample(sentences):
    from orchestrator.compose import few_shot_sample

    texts, labels = sentences
    task = TaskData("src", ["sci.med", "sci.space", "rec.autos"], Split(texts[:30], [i % 3 for i in range(30)]),
                    Split(texts[30:], [i % 3 for i in range(34)]))
    pair = regroup(task, ["sci.*", "rec.autos"], "src:sci.*,rec.autos")
    assert pair.label_names == ["sci.*", "rec.autos"] and pair.train.labels == [0, 0, 1] * 10
    assert pair.train.texts == texts[:30]
    space = regroup(task, ["sci.space", "rec.autos+sci.med"], "x")
    assert space.train.labels == [1, 0, 1] * 10
    sample = few_shot_sample(pair.train, 2, 5, seed=3)
    assert sorted(sample.labels) == [0] * 5 + [1] * 5 and set(sample.texts) <= set(texts[:30])
    for groups, message in ((["sci.*", "talk.*"], "group 'talk.*' matches no label"),
                            (["sci.*", "sci.space"], "must not share a label"), (["sci.*"], "at least 2")):
        with pytest.raises(UserError, match=message):
            regroup(task, groups, "x")
    with pytest.raises(UserError, match="--shots: class 1 has only 10 training examples, fewer than 11; use --shots 10"):
        few_shot_sample(pair.train, 2, 11, seed=0)
    lonely = Split(texts[:9], [0, 1] * 4 + [2])  # one example of class 2: no --shots value can work
    with pytest.raises(UserError, match="class 2 has only 1 training examples, fewer than 2; no --shots works"):
        few_shot_sample(lonely, 3, 2, seed=0)


def test_learned_search_starts_inside_its_bound(few):
    cfg = ComposeConfig(trials=3, bound=0.2)
    weights, study = learn_weights(few(cfg), 3, cfg)  # uniform would be 1/3, outside ±0.2
    assert study.trials[0].params == {f"w{i}": pytest.approx(0.2) for i in range(3)}
    assert all(abs(w) <= 0.2 for trial in study.trials for w in trial.params.values())


def test_an_adapter_with_lora_weights_compose_cannot_merge_is_refused(pool):
    from orchestrator.compose import lora_blocks

    registry, _ = pool
    entry = registry.show("alpha")
    config = json.loads((entry.path / "adapter_config.json").read_text())
    tensors = load_file(entry.path / "adapter_model.safetensors")
    assert lora_blocks(config, tensors, "alpha")  # as trained: composable
    tensors["base_model.model.bert.embeddings.word_embeddings.lora_embedding_A"] = torch.zeros(4, 8)
    with pytest.raises(UserError, match=r"compose: 'alpha' holds LoRA weights compose cannot merge "
                                        r"\(.*word_embeddings.lora_embedding_A\); compose adapters on Linear"):
        lora_blocks(config, tensors, "alpha")


def test_max_length_beyond_the_models_positions_is_refused_before_any_method(sources, tiny_model_dir, sentences):
    texts, labels = sentences
    with pytest.raises(UserError, match="model.max_length: 256 is more tokens than the model's 128 positions"):
        compare(sources, str(tiny_model_dir), tiny_task(texts, labels), ComposeConfig(shots=2, max_length=256),
                torch.device("cpu"))


def test_load_task_spec_regroups_a_builtin_task():
    task = load_task_spec("newsgroups20:sci.med,sci.space", eval_size=50, seed=0)
    assert task.label_names == ["sci.med", "sci.space"] and len(task.eval) == 50
    assert set(task.train.labels) == {0, 1} and len(task.train) > 500


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_user_error(pool, tiny_model_dir, tmp_path):
    registry, _ = pool
    for kwargs, message in (({"shots": 1}, "compose --shots: 1 is too few"),
                            ({"methods": ("magic",)}, "compose --method"),
                            ({"methods": ("uniform", "learned", "uniform")},  # it would run, and be reported, twice
                             "compose --method: uniform is given twice; give each method once"),
                            ({"trials": 0}, "compose --trials"), ({"l1": -1}, "compose --l1"),
                            ({"eval_size": 0}, "compose --eval-size: 0 is too small; use at least 8$"),
                            ({"seed": -1}, r"compose --seed: -1 is not a seed in \[0, 2\*\*32\)"),
                            ({"seed": 2**32}, "compose --seed: 4294967296 is not a seed")):
        with pytest.raises(UserError, match=message):
            ComposeConfig(**kwargs)
    for names, message in ((["alpha", "nope"], "no adapter named 'nope'"), (["alpha"], "at least 2"),
                           (["alpha", "alpha"], "twice"), (["alpha", "beta@x"], "NAME@VERSION"),
                           (["alpha", "beta@²"], "NAME@VERSION"), (["alpha", "beta@"], "NAME@VERSION"),
                           (["alpha", "alpha@1"], "names alpha@1 twice"),  # v1 is alpha's current version
                           (["alpha", "beta@7"], "has no version 7")):
        with pytest.raises(UserError, match=message):
            load_sources(registry, names)
    other = tmp_path / "other_model"  # same architecture, different weights
    shutil.copytree(tiny_model_dir, other)
    from orchestrator.models import load_model

    model = load_model(str(other), 2)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(1.01)
    model.save_pretrained(other, safe_serialization=True)
    with pytest.raises(UserError, match="--model: .* is not the base model"):
        load_sources(registry, ["alpha", "beta"], str(other))
    registry.add("stranger", pool[0].show("alpha").path, "t", str(other), None, {})
    with pytest.raises(UserError, match="different base models"):
        load_sources(registry, ["alpha", "stranger"])
    registry.add("older", pool[0].show("alpha").path, "t", str(tiny_model_dir), None, {})
    with sqlite3.connect(registry.db_path) as conn:  # stored before config.json was hashed too: the weights' hash alone
        conn.execute("UPDATE entries SET base_model_sha256 = ? WHERE name = 'older'",
                     (registry.base_model_hashes(str(tiny_model_dir))[1],))
    assert len(load_sources(registry, ["alpha", "older"])[0]) == 2  # one base model, two hashes of it
    registry.remove("older", 1)


def test_cli_compose(monkeypatch, capsys, pool, tiny_model_dir, tmp_path, sentences):
    from test_registry import cli

    registry, _ = pool
    texts, labels = sentences
    data = tmp_path / "target.csv"
    pd.DataFrame({"text": texts, "label": ["neg", "pos"] * 32}).to_csv(data, index=False)
    common = ["compose", "--registry", registry.root, "--task", data, "--max-length", "32", "--trials", "4"]
    code, out, err = cli(monkeypatch, capsys, *common, "--adapters", "alpha,beta,gamma", "--shots", "4",
                         "--method", "uniform,learned", "--out", tmp_path / "out", "--register", "tiny-composed")
    assert code == 0, err
    assert "| uniform" in out and "| learned" in out and "Registered tiny-composed v1" in out
    table = pd.read_csv(tmp_path / "out" / "compose.csv")
    assert table.method.tolist() == ["uniform", "learned"]
    assert (tmp_path / "out" / "compose.png").stat().st_size > 0 and (tmp_path / "out" / "adapters" / "learned").is_dir()
    entry = registry.show("tiny-composed")
    assert entry.metrics["method"] == "learned" and entry.metrics["sources"] == ["alpha@1", "beta@1", "gamma@1"]
    assert entry.metrics["accuracy"] == pytest.approx(table.accuracy.iloc[1])
    for args, message in ((["--adapters", "alpha,nope", "--shots", "4"], "no adapter named 'nope'"),
                          (["--adapters", "alpha,beta", "--shots", "0"], "compose --shots: 0 is too few"),
                          (["--adapters", "alpha,beta", "--method", "uniform,uniform"],
                           "compose --method: uniform is given twice"),
                          # the model and data helpers are `run`'s: their errors name compose's flags here
                          (["--adapters", "alpha,beta", "--task", tmp_path / "none.csv"], "compose --task: file '"),
                          (["--adapters", "alpha,beta", "--model", tmp_path / "none"], "compose --model: '"),
                          (["--adapters", "alpha,beta", "--max-length", "1000"],
                           "compose --max-length: 1000 is more tokens than the model's 128 positions"),
                          (["--adapters", "alpha,beta", "--eval-size", "0"],
                           "compose --eval-size: 0 is too small; use at least 8\n"),
                          (["--adapters", "alpha,beta", "--shots", "40"], "--shots: class 0 has only"),
                          (["--adapters", "alpha,beta", "--register", "bad/name"], "not a valid adapter name")):
        code, _, err = cli(monkeypatch, capsys, *common, *args, "--out", tmp_path / "bad")
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    for flag in ("--registry", "--root"):  # `registry` commands spell it --root; both work here
        code, _, err = cli(monkeypatch, capsys, "compose", flag, tmp_path / "none", "--task", data, "--adapters", "a,b")
        assert code == 2 and "no registry at" in err, flag


def test_bad_out_or_register_fails_before_anything_runs(monkeypatch, capsys, tmp_path):
    from test_registry import cli

    taken = tmp_path / "taken.txt"
    taken.write_text("not a directory")
    common = ["compose", "--registry", tmp_path / "none", "--task", "rotten_tomatoes", "--adapters", "a,b"]
    for args, message in ((["--out", taken], f"--out: '{taken}' cannot be made a directory ('{taken}' is a file)"),
                          (["--out", taken / "sub"], f"--out: '{taken / 'sub'}' cannot be made a directory"),
                          (["--out", tmp_path / "out", "--method", "zero_shot,single_best", "--register", "mine"],
                           "--register: --method zero_shot,single_best composes no adapter to register")):
        code, _, err = cli(monkeypatch, capsys, *common, *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.txt"]  # no registry read, nothing written


def test_a_full_disk_leaves_no_temp_file_and_no_open_figure(monkeypatch, tmp_path):
    """compose.png goes through report.write_atomic like the csv/md: one line, no temp file, the figure closed."""
    import errno

    import matplotlib.figure
    import matplotlib.pyplot as plt

    from orchestrator.compose import write_report

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    table = pd.DataFrame([{"task": "t", "shots": 4, "seed": 0, "method": m, "accuracy": 0.5, "f1": 0.5, "search_s": 1.0,
                           "cost_usd": 0.0, "weights": None} for m in ("zero_shot", "uniform")])
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    open_before = plt.get_fignums()
    with pytest.raises(UserError, match="could not write '.*compose.png' \\(No space left on device\\)"):
        write_report(table, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compose.csv", "compose.md"]
    assert plt.get_fignums() == open_before


def test_the_markdown_leaves_a_one_seed_std_blank(tmp_path):
    """As report.md does: the std of one seed is undefined, an empty cell, not `nan` (before 2026-12-07 `nan`)."""
    from orchestrator.compose import write_report

    rows = [{"task": "t", "shots": 4, "seed": seed, "method": method, "accuracy": 0.5 + seed / 10, "f1": 0.5,
             "search_s": None if method == "zero_shot" else 1.0, "cost_usd": 0.0, "weights": None}
            for method, seeds in (("zero_shot", [0]), ("uniform", [0, 1])) for seed in seeds]
    write_report(pd.DataFrame(rows), tmp_path)
    text = (tmp_path / "compose.md").read_text()
    assert "nan" not in text.lower()
    mean = text.split("## Mean over seeds")[1].split("## Every run")[0]
    cells = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in mean.splitlines() if line.startswith("| t ")}
    assert cells["zero_shot"][4] == "" and cells["uniform"][4] == "0.07071", mean  # accuracy_std


def test_the_report_is_written_before_the_composition_is_registered(monkeypatch, pool, tmp_path, sentences):
    """A failed report write leaves nothing registered, so running compose again does not store a second version."""
    import orchestrator.compose as compose

    registry, _ = pool
    texts, _ = sentences
    data = tmp_path / "target.csv"
    pd.DataFrame({"text": texts, "label": ["neg", "pos"] * 32}).to_csv(data, index=False)

    def disk_full(*args, **kwargs):
        raise UserError("write: could not write 'compose.csv' (No space left on device)")

    monkeypatch.setattr(compose, "write_report", disk_full)
    cfg = ComposeConfig(shots=4, methods=("uniform",), max_length=32)
    with pytest.raises(UserError, match="No space left"):
        compose.run_compose(registry.root, ["alpha", "beta"], str(data), cfg, tmp_path / "out", "unreported")
    assert "unreported" not in {e.name for e in registry.list()}


def test_ctrl_c_is_one_line_saying_what_was_written(monkeypatch, capsys, tmp_path):
    from test_registry import cli

    import orchestrator.compose as compose

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compose, "run_compose", interrupted)
    common = ["compose", "--registry", tmp_path, "--adapters", "a,b", "--task", "x.csv", "--out"]
    code, out, err = cli(monkeypatch, capsys, *common, tmp_path / "out")
    assert (code, out) == (130, "")
    assert err == "interrupted: compose stopped; nothing was registered; nothing was written; run it again\n"
    (tmp_path / "out").mkdir()  # what it had saved (an adapter, a report file) by then
    code, _, err = cli(monkeypatch, capsys, *common, tmp_path / "out")
    assert code == 130 and err.count("\n") == 1 and f"'{tmp_path / 'out'}' may hold this run's adapters or report files beside older ones" in err


def test_seed_draws_the_few_shot_sample_not_the_eval_split(pool, tmp_path, sentences):
    """The split is the one the source runs used (data.split_seed's default) whatever --seed is: the class count
    the --shots check reports is the default split's."""
    from orchestrator.compose import run_compose
    from orchestrator.config import DataConfig
    from orchestrator.data import load_task

    registry, _ = pool
    texts, _ = sentences
    data = tmp_path / "target.csv"
    pd.DataFrame({"text": texts, "label": ["neg", "pos"] * 32}).to_csv(data, index=False)
    train = load_task(DataConfig(task=str(data), train_size=None)).train
    for seed in (0, 1, 2):
        with pytest.raises(UserError, match=f"class 0 has only {train.labels.count(0)} training examples"):
            run_compose(registry.root, ["alpha", "beta"], str(data), ComposeConfig(shots=60, seed=seed),
                        tmp_path / "out")


# ---------------------------------------------------------------- adapters trained by the pipeline (slow)


@pytest.mark.slow
def test_compose_adapters_trained_by_the_pipeline(tiny_model_dir, tmp_path, sentences, embedded_ray):
    """A source task trained by orchestrator.train.run_training (Ray Tune + Ray Train) and registered, composed
    with a second registered source for a third task; the registered composition loads and predicts as evaluated.
    (One Ray training, not two: each costs ~30 s of Ray Train start-up; the second source is a random adapter.)"""
    from orchestrator.allocation import uniform
    from orchestrator.compose import run_compose
    from orchestrator.config import ModelConfig, RunConfig, TrainConfig
    from orchestrator.data import make_loader
    from orchestrator.models import adaptable_modules, load_model, load_tokenizer
    from orchestrator.train import TrainJob, evaluate, run_training

    texts, labels = sentences
    registry = Registry(tmp_path / "registry")
    ranks = uniform(adaptable_modules(load_model(str(tiny_model_dir), 2)), ("query", "value"), 4).as_dict()
    cfg = RunConfig(name="sentiment", results_dir=str(tmp_path / "runs"), model=ModelConfig(str(tiny_model_dir), 32),
                    train=TrainConfig(epochs=1, batch_size=16, eval_batch_size=32))
    task = TaskData("sentiment", ["no", "yes"], Split(texts[:48], labels[:48]), Split(texts[48:], labels[48:]))
    row = run_training(cfg, task, [TrainJob("uniform_qv", "baseline", "uniform_qv", ranks, 0)])["uniform_qv-s0"]
    assert row["status"] == "completed"
    registry.add("sentiment", cfg.run_dir / row["adapter_dir"], "sentiment", str(tiny_model_dir), None,
                 {"accuracy": row["accuracy"]})
    make_source(tiny_model_dir, tmp_path / "long", ("query", "intermediate.dense"), 8, 1.0, False, seed=7)
    registry.add("long", tmp_path / "long", "long", str(tiny_model_dir), None, {"accuracy": 0.5})
    target = tmp_path / "exclaim.csv"  # a third task: sentiment with its labels named differently
    pd.DataFrame({"text": texts, "label": ["flat" if y == 0 else "bang" for y in labels]}).to_csv(target, index=False)
    cfg = ComposeConfig(shots=6, trials=8, max_length=32, train_epochs=2)
    table, done = run_compose(registry.root, ["sentiment", "long"], str(target), cfg, tmp_path / "out", "composed")
    assert table.method.tolist() == list(cfg.methods) and table.accuracy.between(0, 1).all()
    entry = done["entry"]
    assert entry.name == "composed" and entry.metrics["sources"] == ["sentiment@1", "long@1"]
    # the registered adapter, loaded by the registry through PEFT, scores what the report says on the eval split
    task = load_task_spec(str(target), cfg.eval_size)  # the split compose uses: data.split_seed's default
    loader = make_loader(task.eval, load_tokenizer(str(tiny_model_dir)), 32, 32, shuffle=False)
    metrics = evaluate(registry.load("composed"), loader, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(entry.metrics["accuracy"])
    assert metrics["eval_loss"] == pytest.approx(entry.metrics["eval_loss"], rel=1e-4)
    assert "Adapter composition" in (tmp_path / "out" / "compose.md").read_text()


def test_a_checkpoint_with_a_head_for_another_label_count_gets_a_fresh_head(tiny_model_dir):
    """The tiny checkpoint holds a 2-label classifier; a 3-class task (a compose target, a run) gets a fresh head, as
    a checkpoint without one does, not a size-mismatch traceback."""
    from orchestrator.models import load_model

    model = load_model(str(tiny_model_dir), 3)
    assert model.classifier.out_features == 3
    kept = load_model(str(tiny_model_dir), 2)  # the same label count keeps the checkpoint's head, as before
    assert torch.equal(kept.classifier.weight, load_model(str(tiny_model_dir), 2, seed=5).classifier.weight)
