"""Allocation: exact parameter counts, the PEFT model it builds, compact form, checks and ids (tiny BERT)."""

from __future__ import annotations

import hashlib

import pytest
from torch import nn

from orchestrator.allocation import Allocation, apply_lora, budget_params, uniform
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, head_params, load_model

PREFIX = "bert.encoder.layer."


def full(short: str) -> str:
    """'L0.attention.output.dense' -> 'bert.encoder.layer.0.attention.output.dense' (query/key/value sit in .self.)."""
    layer, _, kind = short[1:].partition(".")
    if kind in ("query", "key", "value"):
        kind = "attention.self." + kind
    return f"{PREFIX}{layer}.{kind}"


SINGLE = {full("L0.query"): 4}
MIXED = {  # attention.output.dense and output.dense share the `output.dense` suffix
    full("L0.attention.output.dense"): 8,
    full("L0.output.dense"): 2,
    full("L1.attention.output.dense"): 1,
    full("L1.output.dense"): 16,
    full("L1.key"): 4,
    full("L0.intermediate.dense"): 3,
}
# every module at its own rank, with module 0 switched off
ALL_VARIED = {f"{PREFIX}{layer}.{kind}": 1 + 6 * layer + i for layer in (0, 1) for i, kind in enumerate(
    ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
     "intermediate.dense", "output.dense"])}

CASES = {
    "single": (SINGLE, 4 * (32 + 32)),
    "mixed": (MIXED, 8 * 64 + 2 * 96 + 1 * 64 + 16 * 96 + 4 * 64 + 3 * 96),
    "all_rank2": ("all2", 2 * 2 * (4 * 64 + 2 * 96)),
    "all_varied": (ALL_VARIED, sum(r * (96 if "dense" in n and "attention" not in n else 64) for n, r in ALL_VARIED.items())),
}


def ranks_of(case, modules) -> dict[str, int]:
    ranks, _ = CASES[case]
    return {m.name: 2 for m in modules} if ranks == "all2" else dict(ranks)


def lora_layers(peft_model) -> dict[str, nn.Module]:
    """Base-model module name -> LoRA layer, for every module carrying a default adapter."""
    prefix = "base_model.model."
    return {name[len(prefix):]: module for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def test_tiny_model_modules(tiny_modules):
    assert len(tiny_modules) == 12
    assert [m.short for m in tiny_modules[:6]] == ["L0.query", "L0.key", "L0.value", "L0.attention.output.dense",
                                                  "L0.intermediate.dense", "L0.output.dense"]
    per_rank = {m.type: m.params_per_rank for m in tiny_modules}
    assert per_rank == {"query": 64, "key": 64, "value": 64, "attention.output.dense": 64,
                        "intermediate.dense": 96, "output.dense": 96}
    assert full("L1.attention.output.dense") == tiny_modules[9].name
    assert {m.name for m in tiny_modules} == {full(m.short) for m in tiny_modules}


def test_cli_modules_lists_each_module_with_its_cost_in_80_columns(tiny_model_dir, tiny_modules):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["modules", "--model", str(tiny_model_dir)], terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in result.output
    for module in tiny_modules:  # one row each: short name, params per unit of rank, the model's own name
        assert any(line.split() == [module.short, f"{module.params_per_rank:,}", module.name] for line in lines)


def test_wrapping_a_model_prints_no_transformers_deprecation_noise(tiny_model_dir):
    """A fresh process (as in a Ray worker): apply_lora must not print transformers' own FutureWarning."""
    import subprocess
    import sys

    script = ("from orchestrator.allocation import Allocation, apply_lora; from orchestrator.models import load_model; "
              f"apply_lora(load_model({str(tiny_model_dir)!r}, 2), Allocation.from_ranks({{'layer.0.attention.self.query': 1}}))")
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_params_and_peft_model_match(case, tiny_model_dir, tiny_modules):
    ranks = ranks_of(case, tiny_modules)
    allocation = Allocation.from_ranks(ranks)
    expected = CASES[case][1]
    assert allocation.trainable_params(tiny_modules) == expected

    model = apply_lora(load_model(str(tiny_model_dir), 2), allocation)
    lora_count = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "lora_" in name)
    assert lora_count == expected

    layers = lora_layers(model)
    assert set(layers) == set(ranks), "LoRA sits on exactly the allocated modules (no pooler, no suffix over-match)"
    for name, layer in layers.items():
        assert layer.lora_A["default"].weight.shape[0] == ranks[name], name
        assert layer.lora_B["default"].weight.shape[1] == ranks[name], name
        assert layer.r["default"] == ranks[name]
        assert layer.scaling["default"] == pytest.approx(allocation.alpha_ratio) == 2.0  # lora_alpha / r

    # only LoRA factors and the classification head train; the base stays frozen
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {name for name in trainable if ".classifier.modules_to_save.default." in name}
    assert head == {"base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"}
    assert all("lora_" in name for name in trainable - head)
    assert sum(p.numel() for name, p in model.named_parameters() if name in head) == head_params(
        load_model(str(tiny_model_dir), 2)) == 2 * 32 + 2


def test_scaling_follows_alpha_ratio(tiny_model_dir):
    allocation = Allocation.from_ranks({full("L0.query"): 2, full("L1.value"): 8}, alpha_ratio=0.5)
    layers = lora_layers(apply_lora(load_model(str(tiny_model_dir), 2), allocation))
    assert {name: layer.scaling["default"] for name, layer in layers.items()} == {
        full("L0.query"): 0.5, full("L1.value"): 0.5}


def test_lora_config_is_exact(tiny_modules):
    config = Allocation.from_ranks(MIXED).to_lora_config(["classifier"])
    assert set(config.target_modules) == set(MIXED)
    assert (config.r, config.lora_alpha) == (8, 16.0)  # all ranks differ: the first (by name) is the default
    assert config.rank_pattern == {name.replace(".", r"\."): r for name, r in MIXED.items()}
    assert config.alpha_pattern == {name.replace(".", r"\."): 2.0 * r for name, r in MIXED.items()}
    assert config.lora_dropout == 0.0
    assert list(config.modules_to_save) == ["classifier"]


def test_from_ranks_drops_zero_and_sorts():
    allocation = Allocation.from_ranks({full("L1.query"): 2, full("L0.key"): 0, full("L0.query"): 4})
    assert allocation.ranks == ((full("L0.query"), 4), (full("L1.query"), 2))
    assert allocation.total_rank == 6
    assert allocation.as_dict() == {full("L0.query"): 4, full("L1.query"): 2}


@pytest.mark.parametrize("bad", [-1, 1.5, "4", None])
def test_from_ranks_refuses_bad_ranks(bad):
    with pytest.raises(UserError, match="ranks must be integers ≥ 0"):
        Allocation.from_ranks({full("L0.query"): bad})


@pytest.mark.parametrize("case", list(CASES))
def test_compact_round_trip(case, tiny_modules):
    allocation = Allocation.from_ranks(ranks_of(case, tiny_modules))
    text = allocation.compact(tiny_modules)
    assert Allocation.from_compact(text, tiny_modules) == allocation


def test_compact_format(tiny_modules):
    assert Allocation.from_ranks(SINGLE).compact(tiny_modules) == "L0.query:4"
    assert Allocation.from_ranks(MIXED).compact(tiny_modules) == (
        "L0.attention.output.dense:8,L0.intermediate.dense:3,L0.output.dense:2,L1.key:4,"
        "L1.attention.output.dense:1,L1.output.dense:16")  # model order, not name order
    parsed = Allocation.from_compact(" L1.output.dense:16 , L0.attention.output.dense:8,", tiny_modules)
    assert parsed.as_dict() == {full("L1.output.dense"): 16, full("L0.attention.output.dense"): 8}


@pytest.mark.parametrize("text", ["L0.query", "L0.query:x", "L9.query:4", "query:4", "L0.dense:2", "L0.query:-1"])
def test_from_compact_refuses_bad_items(text, tiny_modules):
    with pytest.raises(UserError, match="is not `L<layer>.<module type>:<rank>`"):
        Allocation.from_compact(text, tiny_modules)


@pytest.mark.parametrize("text", ["L0.query:8,L0.query:4", "L0.query:8,L1.shortcut.residual:2,L1.shortcut.residual:4"])
def test_from_compact_refuses_a_module_given_twice(text, tiny_modules):
    """The later rank silently won."""
    with pytest.raises(UserError, match=r"^allocation: 'L\d\.[a-z.]+:4' gives a module a second rank in"):
        Allocation.from_compact(text, tiny_modules)


def test_check_against_accepts_exact_names(tiny_model):
    Allocation.from_ranks(MIXED).check_against(tiny_model)
    Allocation.from_ranks({m.name: 1 for m in adaptable_modules(tiny_model)}).check_against(tiny_model)


@pytest.mark.parametrize("key, hits", [
    ("bert.encoder.layer.7.attention.self.query", 0),  # no such layer
    ("attention.self.qkv", 0),
    ("dense", 7),  # 3 per layer + the pooler
    ("output.dense", 4),  # attention.output.dense and output.dense, both layers
    ("query", 2),
    ("attention.output.dense", 2),
])
def test_check_against_refuses_ambiguous_or_missing(key, hits, tiny_model):
    allocation = Allocation.from_ranks({key: 2})
    with pytest.raises(UserError) as err:
        allocation.check_against(tiny_model)
    assert str(err.value).startswith(f"allocation: module '{key}' matches {hits} Linear modules of the model;")


def test_check_against_refuses_empty(tiny_model):
    with pytest.raises(UserError, match="no LoRA module has a rank > 0"):
        Allocation.from_ranks({full("L0.query"): 0}).check_against(tiny_model)


def test_model_dropout_sets_every_dropout_layer_and_none_keeps_the_checkpoints(tiny_model_dir):
    rates = lambda model: {m.p for m in model.modules() if isinstance(m, nn.Dropout)}  # noqa: E731
    assert rates(load_model(str(tiny_model_dir), 2)) == {0.1}  # BertConfig's hidden and attention dropout
    assert rates(load_model(str(tiny_model_dir), 2, dropout=0.0)) == {0.0}
    assert rates(load_model(str(tiny_model_dir), 2, dropout=0.3)) == {0.3}


def test_apply_lora_refuses_bad_key_before_wrapping(tiny_model_dir):
    model = load_model(str(tiny_model_dir), 2)
    with pytest.raises(UserError, match="matches 4 Linear modules"):
        apply_lora(model, Allocation.from_ranks({"output.dense": 4}))
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_candidate_id_stable_and_distinct(tiny_modules):
    single = Allocation.from_ranks(SINGLE)
    text = f"{full('L0.query')}:4"
    assert single.candidate_id == "a" + hashlib.sha1(text.encode()).hexdigest()[:10]
    assert len(single.candidate_id) == 11 and single.candidate_id[0] == "a"
    int(single.candidate_id[1:], 16)
    # independent of insertion order, and of zero-rank entries
    shuffled = dict(reversed(list(MIXED.items())))
    assert Allocation.from_ranks(shuffled).candidate_id == Allocation.from_ranks(MIXED).candidate_id
    assert Allocation.from_ranks(SINGLE | {full("L1.key"): 0}).candidate_id == single.candidate_id
    # a different rank or a different module gives a different id
    ids = {Allocation.from_ranks(ranks_of(case, tiny_modules)).candidate_id for case in CASES}
    ids.add(Allocation.from_ranks({full("L0.query"): 8}).candidate_id)
    ids.add(Allocation.from_ranks({full("L1.query"): 4}).candidate_id)
    assert len(ids) == len(CASES) + 2


def test_candidate_id_golden():
    # ids name adapters and report rows on disk: they must not change between versions
    assert Allocation.from_ranks(SINGLE).candidate_id == GOLDEN_SINGLE_ID


GOLDEN_SINGLE_ID = "af4fc9b2900"


def test_uniform_and_budget_params(tiny_modules):
    qv = uniform(tiny_modules, ("query", "value"), 8)
    assert qv.as_dict() == {full(f"L{i}.{t}"): 8 for i in (0, 1) for t in ("query", "value")}
    assert budget_params(tiny_modules, None, 8) == 4 * 64 * 8 == 2048
    assert budget_params(tiny_modules, None, 3) == 768
    assert budget_params(tiny_modules, 5000, None) == 5000
