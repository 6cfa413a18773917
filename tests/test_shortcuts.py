"""LoRA-adapted shortcuts (tiny BERT, hidden 32, 2 layers): B = 0 is a no-op, exact semantics of every kind,
exact parameter counts, gradients, save/load alone and beside a PEFT adapter, errors that name the field."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.models import load_model
from orchestrator.shortcuts import (
    KINDS, SPECS_FILE, WEIGHTS_FILE, ShortcutSpec, attach_shortcuts, check_specs, format_compact, has_shortcuts,
    load_shortcuts, parse_compact, save_shortcuts, shortcut_sites, specs_params)

HIDDEN = 32
ONE_OF_EACH = {"residual": ShortcutSpec("residual", 0, 4), "cross_block": ShortcutSpec("cross_block", 0, 4),
               "cross_layer": ShortcutSpec("cross_layer", 1, 4)}
EVERY_SITE = [ShortcutSpec(kind, layer, 1 + layer + 2 * i) for layer in (0, 1) for i, kind in enumerate(KINDS)
              if not (kind == "cross_layer" and layer == 0)]


@pytest.fixture
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), 2).eval()


@pytest.fixture
def batch(tiny_model_dir, sentences):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts, labels = sentences
    encoded = tokenizer(texts[:6], padding=True, return_tensors="pt")  # varied lengths: padding is exercised
    return {**encoded, "labels": torch.tensor(labels[:6])}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def randomize_b(shortcut_set, seed: int = 7, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for spec in shortcut_set.specs:
            weight = shortcut_set.module(spec).B.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("kind", [*KINDS, "all"])
def test_zero_b_leaves_outputs_bit_identical(model, batch, kind):
    before = logits(model, batch)
    specs = EVERY_SITE if kind == "all" else [ONE_OF_EACH[kind]]
    shortcut_set = attach_shortcuts(model, specs, seed=0)
    assert all(torch.count_nonzero(shortcut_set.module(s).A.weight) > 0 for s in specs)  # A is not zero, only B
    assert torch.equal(logits(model, batch), before)
    randomize_b(shortcut_set)
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)
    shortcut_set.detach()
    assert torch.equal(logits(model, batch), before)
    assert not any("shortcut" in name for name, _ in model.named_parameters())


def capture_layers(model, batch) -> dict:
    """Per layer: input h, attention output a (FFN input), FFN output f before the LayerNorm, layer output."""
    seen, handles = {}, []
    for i, layer in enumerate(model.bert.encoder.layer):
        handles.append(layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("h", i), args[0])))
        handles.append(layer.intermediate.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("a", i), args[0])))
        handles.append(layer.output.dropout.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("f", i), out)))
        handles.append(layer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("out", i), out)))
    logits(model, batch)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_reads_and_adds_where_documented(model, batch, kind):
    """On the last layer (1), recompute the layer's output by hand from the plain model's activations."""
    plain = capture_layers(model, batch)
    spec = ShortcutSpec(kind, 1, 3)
    shortcut_set = attach_shortcuts(model, [spec], seed=1)
    randomize_b(shortcut_set)
    got = capture_layers(model, batch)
    layer = model.bert.encoder.layer[1]
    delta = shortcut_set.module(spec)
    assert delta.scaling == 2.0  # alpha = 2r
    a_weight, b_weight = shortcut_set.factors(spec)
    low_rank = lambda x: 2.0 * x @ a_weight.T @ b_weight.T  # noqa: E731
    h, a, f = plain[("h", 1)], plain[("a", 1)], plain[("f", 1)]
    with torch.no_grad():
        if kind == "residual":  # reads the FFN input a_1, adds before the final LayerNorm: LN(f + (I + sBA) a)
            expected = layer.output.LayerNorm(f + a + low_rank(a))
        elif kind == "cross_block":  # reads the layer input h_1, adds before the final LayerNorm
            expected = layer.output.LayerNorm(f + a + low_rank(h))
        else:  # reads layer 0's FFN input a_0, adds to layer 1's attention output (the FFN input and its residual)
            a_new = a + low_rank(plain[("a", 0)])
            assert torch.allclose(got[("a", 1)], a_new, atol=1e-6)
            expected = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a_new)) + a_new)
    assert torch.equal(got[("out", 0)], plain[("out", 0)])  # layer 0 is untouched
    assert torch.allclose(got[("out", 1)], expected, atol=1e-5)
    assert not torch.allclose(got[("out", 1)], plain[("out", 1)], atol=1e-3)


def test_state_is_cleared_after_each_forward(model, batch):
    shortcut_set = attach_shortcuts(model, EVERY_SITE, seed=0)
    randomize_b(shortcut_set)
    first = logits(model, batch)
    assert shortcut_set._state == {}
    small = {k: v[:2] for k, v in batch.items()}  # another batch size: no stale activations may be used
    logits(model, small)
    assert torch.allclose(logits(model, batch), first, atol=0)


# ---------------------------------------------------------------- parameters and gradients


def test_trainable_params_counted_exactly(model):
    before = sum(p.numel() for p in model.parameters())
    shortcut_set = attach_shortcuts(model, EVERY_SITE)
    expected = sum(spec.params(HIDDEN) for spec in EVERY_SITE)
    assert expected == sum(s.rank for s in EVERY_SITE) * 2 * HIDDEN
    assert shortcut_set.trainable_params() == expected == specs_params(model, EVERY_SITE)
    assert sum(p.numel() for p in model.parameters()) - before == expected
    names = [name for name, p in model.named_parameters() if name.startswith("shortcuts.")]
    assert len(names) == 2 * len(EVERY_SITE) and not any("lora_" in n for n in names)
    assert all(p.requires_grad for p in shortcut_set.parameters())


def test_sites_and_names(model):
    sites = shortcut_sites(model)
    assert [s.short for s in sites] == ["L0.shortcut.residual", "L0.shortcut.cross_block", "L1.shortcut.residual",
                                        "L1.shortcut.cross_block", "L1.shortcut.cross_layer"]
    assert all(s.params_per_rank == 2 * HIDDEN and s.spec(3).params(HIDDEN) == 3 * s.params_per_rank for s in sites)
    assert [s.short for s in shortcut_sites(model, kinds=("cross_layer",))] == ["L1.shortcut.cross_layer"]
    text = "L1.shortcut.cross_layer:2, L0.shortcut.residual:4"
    specs = parse_compact(text)
    assert specs == (ShortcutSpec("residual", 0, 4), ShortcutSpec("cross_layer", 1, 2))
    assert format_compact(specs) == "L0.shortcut.residual:4,L1.shortcut.cross_layer:2"
    assert parse_compact(format_compact(specs)) == specs


def test_gradient_reaches_b_then_a(model, batch):
    model.train()
    shortcut_set = attach_shortcuts(model, EVERY_SITE, seed=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    assert {id(p) for p in shortcut_set.parameters()} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    model(**batch).loss.backward()
    for spec in EVERY_SITE:
        a, b = shortcut_set.factors(spec)
        assert b.grad is not None and b.grad.abs().sum() > 0, spec.name
        assert a.grad is not None and a.grad.abs().sum() == 0, spec.name  # B = 0 blocks A's gradient
    optimizer.step()
    optimizer.zero_grad()
    model(**batch).loss.backward()
    for spec in EVERY_SITE:
        a, b = shortcut_set.factors(spec)
        assert torch.count_nonzero(b) > 0
        assert a.grad.abs().sum() > 0, spec.name


def test_seeded_init_is_independent_of_order(tiny_model_dir):
    first = attach_shortcuts(load_model(str(tiny_model_dir), 2), EVERY_SITE, seed=3)
    second = attach_shortcuts(load_model(str(tiny_model_dir), 2), list(reversed(EVERY_SITE)), seed=3)
    for spec in EVERY_SITE:
        assert torch.equal(first.factors(spec)[0], second.factors(spec)[0])


# ---------------------------------------------------------------- save and load


def test_save_load_round_trip(model, batch, tiny_model_dir, tmp_path):
    shortcut_set = attach_shortcuts(model, EVERY_SITE, seed=0)
    randomize_b(shortcut_set)
    expected = logits(model, batch)
    save_shortcuts(shortcut_set, tmp_path)
    assert has_shortcuts(tmp_path) and (tmp_path / WEIGHTS_FILE).is_file()
    meta = json.loads((tmp_path / SPECS_FILE).read_text())
    assert meta["compact"] == shortcut_set.compact and meta["hidden_size"] == HIDDEN

    fresh = load_model(str(tiny_model_dir), 2).eval()
    assert not torch.equal(logits(fresh, batch), expected)
    loaded = load_shortcuts(fresh, tmp_path)
    assert loaded.specs == shortcut_set.specs
    assert torch.equal(logits(fresh, batch), expected)


def test_a_failed_load_leaves_the_model_as_it_came_and_a_retry_on_it_works(model, batch, tiny_model_dir, tmp_path):
    shortcut_set = attach_shortcuts(model, EVERY_SITE, seed=0)
    randomize_b(shortcut_set)
    expected = logits(model, batch)
    save_shortcuts(shortcut_set, tmp_path / "good")
    save_shortcuts(shortcut_set, tmp_path / "bad")
    (tmp_path / "bad" / WEIGHTS_FILE).unlink()

    fresh = load_model(str(tiny_model_dir), 2).eval()
    before = logits(fresh, batch)
    with pytest.raises(UserError, match="safetensors"):
        load_shortcuts(fresh, tmp_path / "bad")
    assert not hasattr(fresh, "shortcuts")
    assert torch.equal(logits(fresh, batch), before)  # no hook left behind either
    load_shortcuts(fresh, tmp_path / "good")
    assert torch.equal(logits(fresh, batch), expected)


def test_peft_model_with_lora_and_shortcuts(tiny_model_dir, batch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS")
    peft_model = get_peft_model(load_model(str(tiny_model_dir), 2), config)
    lora_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shortcut_set = attach_shortcuts(peft_model, EVERY_SITE, seed=0)  # after wrapping: stays trainable
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable - lora_trainable == shortcut_set.trainable_params()

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    assert all(torch.count_nonzero(shortcut_set.factors(s)[1]) > 0 for s in EVERY_SITE)
    expected = logits(peft_model, batch)

    peft_model.save_pretrained(tmp_path)
    save_shortcuts(shortcut_set, tmp_path)
    adapter_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert adapter_keys and not any("shortcut" in key for key in adapter_keys)
    assert all(".shortcut." in key for key in load_file(tmp_path / WEIGHTS_FILE))

    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir), 2, seed=99), tmp_path).eval()
    assert not torch.equal(logits(reloaded, batch), expected)
    load_shortcuts(reloaded, tmp_path)
    assert torch.equal(logits(reloaded, batch), expected)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("make, words", [
    (lambda: ShortcutSpec("bogus", 0, 4), "unknown shortcut kind"),
    (lambda: ShortcutSpec("residual", -1, 4), "layer"),
    (lambda: ShortcutSpec("cross_layer", 0, 4), "no previous layer"),
    (lambda: ShortcutSpec("residual", 0, 0), "rank"),
    (lambda: parse_compact("L0.shortcut.residual"), "L<layer>.shortcut.<kind>:<rank>"),
    (lambda: parse_compact("L0.shortcut.residual:2,L0.shortcut.residual:4"), "twice"),
])
def test_invalid_specs_name_the_field(make, words):
    with pytest.raises(UserError, match="space.shortcuts") as error:
        make()
    assert words in str(error.value)


def test_layer_out_of_range_names_the_field(model, tmp_path):
    with pytest.raises(UserError, match=r"space\.shortcuts: L2\.shortcut\.residual .* 2 layers"):
        attach_shortcuts(model, [ShortcutSpec("residual", 2, 4)])
    with pytest.raises(UserError, match="space.shortcuts"):
        check_specs(model, [ShortcutSpec("cross_layer", 7, 1)])
    assert not hasattr(model, "shortcuts")
    with pytest.raises(UserError, match="safetensors"):
        shortcut_set = attach_shortcuts(model, [ShortcutSpec("residual", 0, 1)])
        save_shortcuts(shortcut_set, tmp_path)
        (tmp_path / WEIGHTS_FILE).unlink()
        shortcut_set.detach()
        load_shortcuts(model, tmp_path)


def test_one_allocation_has_one_compact_string_everywhere(tiny_model, tiny_modules):
    """Allocation.compact (screen.csv, report.csv), the report's compact_allocation (registry entries) and the
    shortcuts.json compact agree: LoRA modules in model order, then shortcuts by layer and kind (not alphabetically,
    which put cross_block before residual and L10 before L2)."""
    from orchestrator.allocation import Allocation, searchable_units
    from orchestrator.report import compact_allocation

    units = searchable_units(tiny_model, tiny_modules, KINDS)
    ranks = {tiny_modules[0].name: 4, "L1.shortcut.cross_block": 3, "L1.shortcut.residual": 2, "L0.shortcut.residual": 1}
    allocation = Allocation.from_ranks(ranks)
    expected = "L0.query:4,L0.shortcut.residual:1,L1.shortcut.residual:2,L1.shortcut.cross_block:3"
    assert allocation.compact(units) == compact_allocation(ranks) == expected
    assert allocation.compact(units).endswith(format_compact(allocation.shortcuts))
    assert compact_allocation({"L10.shortcut.residual": 1, "L2.shortcut.residual": 1}) == \
        "L2.shortcut.residual:1,L10.shortcut.residual:1"


def test_loading_leaves_torch_global_random_stream_alone_and_a_corrupt_file_is_one_line(model, tiny_model_dir, tmp_path):
    shortcut_set = attach_shortcuts(model, EVERY_SITE, seed=0)
    save_shortcuts(shortcut_set, tmp_path)
    fresh = load_model(str(tiny_model_dir), 2)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    load_shortcuts(fresh, tmp_path)
    assert torch.equal(torch.rand(3), expected)  # later shuffles and dropout draw as they would have

    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"shortcuts\.safetensors: not a valid safetensors file .*; save the shortcuts "
                                        "again with save_shortcuts$"):
        load_shortcuts(load_model(str(tiny_model_dir), 2), tmp_path)


@pytest.mark.parametrize("text", ["L1.shortcut.residual:²", "L0.query:²"])
def test_a_rank_that_is_a_digit_only_to_unicode_is_refused_in_one_line(tiny_model, tiny_modules, text):
    from orchestrator.allocation import Allocation, searchable_units

    with pytest.raises(UserError, match="is not `L<layer>"):
        Allocation.from_compact(text, searchable_units(tiny_model, tiny_modules, KINDS))
