"""Encoder families beside BERT: DistilBERT (its own module names, a two-layer head), DeBERTa (the pooler belongs to
the head) and RoBERTa (a two-layer classifier). Each adapts, trains its whole head and reloads as BERT does."""

import math

import pandas as pd
import pytest
import torch

from orchestrator import report
from orchestrator.allocation import apply_lora, uniform
from orchestrator.config import MODULE_TYPES, load_config
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, head_modules, head_params, load_model, load_tokenizer

HEADS = {"distilbert": ["pre_classifier", "classifier"], "deberta": ["pooler", "classifier"],
         "deberta3": ["pooler", "classifier"], "roberta": ["classifier"]}


def logits(model, model_dir) -> torch.Tensor:
    batch = load_tokenizer(str(model_dir))(["the movie was good and very great!", "this plot was dull."],
                                           padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def randomise(model, *markers: str) -> None:
    """Trained-looking weights on every parameter whose name holds a marker, so a part left unsaved would show."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(marker in name for marker in markers):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", HEADS)
def test_the_head_and_bert_module_types(encoder_dir, family):
    model = load_model(str(encoder_dir(family)), 3)
    assert head_modules(model) == HEADS[family]
    assert head_params(model) == sum(p.numel() for head in HEADS[family] for p in model.get_submodule(head).parameters())
    modules = adaptable_modules(model)
    for layer in (0, 1):  # BERT's six: not DeBERTa's pos_key_proj and pos_query_proj, which project positions
        assert sorted(m.type for m in modules if m.layer == layer) == sorted(MODULE_TYPES)
    # the baselines and the search space name BERT's types, whatever the model calls them
    assert uniform(modules, ("query", "value"), 4).compact(modules) == "L0.query:4,L0.value:4,L1.query:4,L1.value:4"
    for m in modules:
        assert report.module_cell(m.name) == (m.layer, m.type)


def test_the_modules_command_shows_distilberts_names_whole(encoder_dir):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    model_dir = encoder_dir("distilbert")
    result = CliRunner().invoke(app, ["modules", "--model", str(model_dir)], terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for module in adaptable_modules(load_model(str(model_dir), 2)):  # names to copy: longer lines, never folded
        assert any(line.split() == [module.short, f"{module.params_per_rank:,}", module.name] for line in lines)


def test_distilbert_and_deberta_names_map_to_bert_types():
    assert report.module_cell("distilbert.transformer.layer.1.attention.q_lin") == (1, "query")
    assert report.module_cell("distilbert.transformer.layer.1.attention.out_lin") == (1, "attention.output.dense")
    assert report.module_cell("distilbert.transformer.layer.0.ffn.lin1") == (0, "intermediate.dense")
    assert report.module_cell("distilbert.transformer.layer.0.ffn.lin2") == (0, "output.dense")
    assert report.module_cell("deberta.encoder.layer.3.attention.self.value_proj") == (3, "value")
    assert report.module_cell("bert.encoder.layer.2.attention.output.dense") == (2, "attention.output.dense")


@pytest.mark.parametrize("family", HEADS)
def test_a_lora_adapter_trains_and_saves_the_whole_head(encoder_dir, family, tmp_path):
    from peft import PeftModel

    model_dir = encoder_dir(family)
    base = load_model(str(model_dir), 3)
    model = apply_lora(base, uniform(adaptable_modules(base), ("query", "value"), 4))
    trainable = {name.split(".")[2] for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    assert trainable == set(HEADS[family])  # base_model.model.<head>.modules_to_save…
    randomise(model, "lora_", "modules_to_save")
    model.save_pretrained(tmp_path)
    # a base drawn with another seed has other fresh head weights: the adapter must bring every head layer
    reloaded = PeftModel.from_pretrained(load_model(str(model_dir), 3, seed=99), tmp_path)
    torch.testing.assert_close(logits(reloaded, model_dir), logits(model, model_dir), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["distilbert", "deberta"])
def test_a_routed_adapter_trains_and_saves_the_whole_head(encoder_dir, family, tmp_path):
    from orchestrator.routing import attach_routed_adapters, load_routed, save_routed

    model_dir = encoder_dir(family)
    model = load_model(str(model_dir), 3)
    queries = [m.name for m in adaptable_modules(model) if m.type == "query"]
    state = attach_routed_adapters(model, queries, 2, 1)
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert set(HEADS[family]) <= trained
    randomise(model, "classifier", "pooler", "experts")
    save_routed(model, state, tmp_path)
    fresh = load_model(str(model_dir), 3, seed=99)
    load_routed(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, model_dir), logits(model, model_dir), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["distilbert", "deberta3"])
def test_every_proxy_scores_every_module(encoder_dir, family, sentences):
    from orchestrator.data import Split
    from orchestrator.proxies import PROXIES, score_modules

    model_dir = encoder_dir(family)
    modules = adaptable_modules(load_model(str(model_dir), 2))
    scores = score_modules(str(model_dir), 2, Split(*map(list, sentences)), modules, sorted(PROXIES), probe_rank=2,
                           num_batches=1, batch_size=8, max_length=16, seed=0)
    for proxy in PROXIES:  # nwot on DeBERTa-v3 scores the tokens' query_proj call, not the positions' one
        assert all(math.isfinite(scores.unit[proxy][m.name]) for m in modules), proxy


def test_fisher_pairs_the_tokens_activations_and_gradients_on_deberta3(encoder_dir, sentences, monkeypatch):
    """query_proj and key_proj run twice per forward on DeBERTa-v3, the second time on 2·buckets position rows:
    fisher's per-example sums must take the tokens' call (it took the last one)."""
    from orchestrator.data import Split
    from orchestrator.proxies import score_modules

    model_dir = encoder_dir("deberta3")
    modules = [m for m in adaptable_modules(load_model(str(model_dir), 2)) if m.type in ("query", "key")]
    einsum, paired = torch.einsum, []
    monkeypatch.setattr(torch, "einsum", lambda spec, *ops: paired.append(ops[1].shape[0]) or einsum(spec, *ops))
    score_modules(str(model_dir), 2, Split(*map(list, sentences)), modules, ["fisher"], probe_rank=2,
                  num_batches=1, batch_size=8, max_length=16, seed=0)
    assert paired == [8] * len(modules)  # the batch's 8 examples, not 1 row of positions


def test_routing_refuses_modules_that_also_project_positions(encoder_dir):
    from orchestrator.routing import check_routable

    for family in ("distilbert", "deberta", "roberta"):
        model = load_model(str(encoder_dir(family)), 2)
        check_routable(model, [m.name for m in adaptable_modules(model)])
    model = load_model(str(encoder_dir("deberta3")), 2)
    names = [m.name for m in adaptable_modules(model)]
    with pytest.raises(UserError, match=r"^space.module_types: \['key', 'query'\] also run on inputs other than the "
                                        r"tokens .*; with routing.enabled, leave them out of space.module_types$"):
        check_routable(model, names)
    check_routable(model, [m.name for m in adaptable_modules(model) if m.type not in ("query", "key")])


def test_the_registry_reloads_a_distilbert_adapter(encoder_dir, tmp_path):
    from orchestrator.registry import Registry

    model_dir = encoder_dir("distilbert")
    base = load_model(str(model_dir), 2)
    modules = adaptable_modules(base)
    allocation = uniform(modules, ("query", "value"), 4)
    model = apply_lora(base, allocation)
    randomise(model, "lora_", "modules_to_save")
    model.save_pretrained(tmp_path / "adapter")
    registry = Registry(tmp_path / "registry")
    registry.add("distil", tmp_path / "adapter", "tiny.csv", str(model_dir), allocation.compact(modules),
                 {"accuracy": 0.7}, "fp32")
    torch.testing.assert_close(logits(registry.load("distil"), model_dir), logits(model, model_dir), rtol=0, atol=1e-6)


def test_distilbert_refuses_shortcuts_in_one_line(encoder_dir):
    from orchestrator.shortcuts import shortcut_sites

    model_dir = encoder_dir("distilbert")
    with pytest.raises(UserError, match=r"not DistilBERT\) or search without them \(space.shortcuts: \[\]\)$"):
        shortcut_sites(load_model(str(model_dir), 2))


@pytest.mark.parametrize("family, last", [("distilbert", "classifier"), ("deberta", "classifier"),
                                          ("roberta", "classifier.out_proj")])
def test_the_heads_last_linear_maps_to_the_labels(encoder_dir, family, last):
    from orchestrator.models import output_layer

    model = load_model(str(encoder_dir(family)), 3)
    assert output_layer(model, 3) == last and model.get_submodule(last).out_features == 3
    hidden = model.config.hidden_size if family != "distilbert" else model.config.dim
    with pytest.raises(UserError, match=rf"^compose --model: the classification head of \w+ has no Linear layer\(s\) "
                                        rf"with {hidden + 1} outputs"):
        output_layer(model, hidden + 1, "compose --model")


@pytest.mark.slow
def test_a_run_on_distilbert_searches_trains_and_registers(encoder_dir, tmp_path, embedded_ray):
    from orchestrator import pipeline
    from orchestrator.data import load_task, make_loader
    from orchestrator.registry import Registry
    from orchestrator.train import evaluate

    model_dir = encoder_dir("distilbert")
    cfg = load_config("search_spaces/quickstart.yaml", [
        "name=distil", f"results_dir={tmp_path}", f"model.name={model_dir}", "model.max_length=16",
        "data.train_size=64", "data.eval_size=32", "screen.num_trials=1", "screen.candidates_per_trial=4",
        "screen.survivors=1", "screen.proxy_batches=1", "screen.batch_size=8", "train.batch_size=16",
        "train.eval_batch_size=16", "train.baselines=[uniform_qv]"])
    table = pipeline.run(cfg)
    assert sorted(table.kind) == ["baseline", "searched"] and table.accuracy.notna().all()
    assert (table.head_params == head_params(load_model(str(model_dir), 2))).all()  # pre_classifier + classifier
    assert table[table.kind == "baseline"].allocation.iloc[0] == "L0.query:8,L0.value:8,L1.query:8,L1.value:8"
    # the registered best reloads on a fresh base and scores what the report says
    entry = Registry(cfg.registry_root).show("rotten_tomatoes")
    task = load_task(cfg.data)
    loader = make_loader(task.eval, load_tokenizer(str(model_dir)), cfg.model.max_length, 16, shuffle=False)
    accuracy = evaluate(Registry(cfg.registry_root).load("rotten_tomatoes"), loader, torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(entry.metrics["accuracy"], abs=1e-9)
    assert pd.read_csv(cfg.run_dir / "report.csv").candidate_id.tolist() == table.candidate_id.tolist()
