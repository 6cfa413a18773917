"""Routed LoRA experts (orchestrator/routing.py) on the tiny random BERT: gating, equivalence with PEFT
LoRA, exact parameter counts, the aux terms' direction, bit-exact save/load and the training helper."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.data import make_loader
from orchestrator.errors import UserError
from orchestrator.models import load_model, load_tokenizer
from orchestrator.routing import (CONFIG_FILE, WEIGHTS_FILE, RoutedLoRALinear, attach_routed_adapters,
                                  budget_expert_ranks, load_routed, save_routed, train_routed)

PREFIX = "bert.encoder.layer."
QV = [f"{PREFIX}{layer}.attention.self.{kind}" for layer in (0, 1) for kind in ("query", "value")]
MIXED_SHAPES = [f"{PREFIX}0.attention.self.query", f"{PREFIX}1.intermediate.dense", f"{PREFIX}1.output.dense"]
HIDDEN = 32  # tests/conftest.py TINY


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: these tiny ops only lose to thread start-up, and CI machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches(tiny_model_dir, sentences):
    from orchestrator.data import Split

    texts, labels = sentences
    loader = make_loader(Split(list(texts), list(labels)), load_tokenizer(str(tiny_model_dir)), 32, 16, shuffle=True)
    return list(loader)


def fresh(tiny_model_dir, seed: int = 0):
    model = load_model(str(tiny_model_dir), 2, seed=seed)
    model.eval()
    return model


def routed(tiny_model_dir, modules=QV, experts=4, rank=2, top_k=1, seed=0, **kwargs):
    model = fresh(tiny_model_dir)
    torch.manual_seed(seed)
    return model, attach_routed_adapters(model, modules, experts, rank, top_k, **kwargs)


def randomise_experts(state, seed=1, scale=0.5):
    """B starts at zero (LoRA init): give the experts real outputs so comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in state.modules.values():
            for b in module.lora_B:
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * scale)
            module.router.weight.copy_(torch.randn(module.router.weight.shape, generator=generator))


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# ---------------------------------------------------------------- gating


@pytest.mark.parametrize("mode", ["per_input", "per_token"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_activates_exactly_k_experts(tiny_model_dir, batches, mode, top_k):
    model, state = routed(tiny_model_dir, top_k=top_k, mode=mode)
    randomise_experts(state)
    with torch.no_grad():
        model(**inputs(batches[0]))
    rows_expected = 16 if mode == "per_input" else batches[0]["input_ids"].numel()
    for module in state.modules.values():
        gates = module.last_gates.reshape(-1, 4)
        probs = module.last_probs.reshape(-1, 4)
        assert gates.shape[0] == rows_expected
        assert ((gates > 0).sum(-1) == top_k).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0]))  # kept probabilities renormalised
        assert torch.equal((gates > 0), probs >= probs.topk(top_k, -1).values[:, -1:])
    assert state.stats()["fraction_active"] == pytest.approx(top_k / 4)


def test_raw_gate_with_k1_is_the_router_probability(tiny_model_dir, batches):
    model, state = routed(tiny_model_dir, top_k=1, renormalize=False)  # Switch Transformer gating
    randomise_experts(state)
    model(**inputs(batches[0]))
    for module in state.modules.values():
        gates, probs = module.last_gates, module.last_probs
        assert ((gates > 0).sum(-1) == 1).all()
        assert torch.equal(gates.max(-1).values, probs.max(-1).values)
    model(**batches[0]).loss.backward()  # the task loss reaches the router through the raw gate
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in state.modules.values())


def test_dense_gating_uses_every_expert(tiny_model_dir, batches):
    model, state = routed(tiny_model_dir, gating="dense", top_k=1)
    randomise_experts(state)
    with torch.no_grad():
        model(**inputs(batches[0]))
    for module in state.modules.values():
        assert module.top_k == 4
        assert (module.last_gates > 0).all()
        assert torch.equal(module.last_gates, module.last_probs)
    assert state.stats()["fraction_active"] == 1.0


def test_sparse_dispatch_equals_computing_every_expert(tiny_model_dir, batches):
    for mode in ("per_input", "per_token"):
        model, state = routed(tiny_model_dir, top_k=2, mode=mode)
        randomise_experts(state)
        with torch.no_grad():
            masked = model(**inputs(batches[1])).logits
            state.set_sparse_compute(True)
            sparse = model(**inputs(batches[1])).logits
        torch.testing.assert_close(sparse, masked, atol=1e-6, rtol=1e-6)


def test_padding_is_left_out_of_the_pooled_router_input(tiny_model_dir, batches):
    model, state = routed(tiny_model_dir)
    batch = inputs(batches[0])
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    with torch.no_grad():
        model(**batch)
        together = state.pooled[short].clone()
        alone = {k: v[short:short + 1, : int(lengths[short])] for k, v in batch.items()}
        model(**alone)
    torch.testing.assert_close(together, state.pooled[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- equivalence and parameter counts


@pytest.mark.parametrize("mode", ["per_input", "per_token"])
def test_one_expert_top1_equals_peft_lora(tiny_model_dir, batches, mode):
    name, rank = QV[0], 4
    peft_model = apply_lora(fresh(tiny_model_dir), Allocation.from_ranks({name: rank}))
    peft_layer = peft_model.base_model.model.get_submodule(name)
    torch.manual_seed(5)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.5)  # LoRA starts at B = 0: make it matter
    peft_model.eval()

    model, state = routed(tiny_model_dir, modules=[name], experts=1, rank=rank, top_k=1, mode=mode)
    layer = state.modules[name]
    with torch.no_grad():
        layer.lora_A[0].weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B[0].weight.copy_(peft_layer.lora_B["default"].weight)
    assert layer.scaling[0] == peft_layer.scaling["default"] == 2.0

    batch = inputs(batches[0])
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = model(**batch).logits
        x = torch.randn(3, 7, HIDDEN)
        if mode == "per_input":
            layer.route_input = torch.randn(3, HIDDEN)
        module_delta = (layer(x) - peft_layer(x)).abs().max()
    assert module_delta <= 1e-6
    assert (got - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["per_input", "per_token"])
def test_trainable_param_counts_are_exact(tiny_model_dir, mode):
    ranks = [1, 2, 4]
    model, state = routed(tiny_model_dir, modules=MIXED_SHAPES, experts=3, rank=ranks, top_k=2, mode=mode)
    shapes = {name: (state.modules[name].in_features, state.modules[name].out_features) for name in MIXED_SHAPES}
    assert shapes == {MIXED_SHAPES[0]: (32, 32), MIXED_SHAPES[1]: (32, 64), MIXED_SHAPES[2]: (64, 32)}
    experts = sum(r * (i + o) for i, o in shapes.values() for r in ranks)
    routers = sum(((HIDDEN if mode == "per_input" else i) + 1) * 3 for i, _ in shapes.values())
    assert state.expert_params() == experts == 7 * (64 + 96 + 96)
    assert state.router_params() == routers
    assert state.trainable_params() == experts + routers
    head = 2 * HIDDEN + 2
    assert state.head_params() == head
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == experts + routers + head
    assert all("lora_" in n or ".router." in n or n.startswith("classifier.") for n in trainable)


# ---------------------------------------------------------------- aux terms move routing the right way


def _train_router(tiny_model_dir, batches, mode, aux, weight, skew: float, steps: int, lr: float):
    """A few AdamW steps from a router biased `skew` towards expert 0; routing stats over all batches after."""
    model, state = routed(tiny_model_dir, aux=aux, mode=mode, seed=3)
    with torch.no_grad():
        for module in state.modules.values():
            module.router.bias.copy_(torch.tensor([skew, 0.0, 0.0, 0.0]))
    optimizer = torch.optim.AdamW(state.trainable_parameters(), lr=lr)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss + state.aux_loss(weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    state.reset_stats()
    with torch.no_grad():
        for batch in batches:
            model(**inputs(batch))
    return state.stats()


# On the tiny random model, mean-pooled embeddings of different sentences are alike, so per-input
# routing can spread less (measured: usage entropy 0.00 -> 0.45) than per-token routing (0.09 -> 1.18).
@pytest.mark.parametrize("mode, min_gain", [("per_input", 0.25), ("per_token", 0.6)])
def test_balance_term_spreads_a_skewed_routing(tiny_model_dir, batches, mode, min_gain):
    without = _train_router(tiny_model_dir, batches, mode, "balance", 0.0, skew=3.0, steps=12, lr=0.05)
    balanced = _train_router(tiny_model_dir, batches, mode, "balance", 1.0, skew=3.0, steps=12, lr=0.05)
    assert without["usage_sorted"][0] > 0.95  # the skewed start stays skewed without the term
    assert balanced["usage_entropy"] > without["usage_entropy"] + min_gain
    assert balanced["usage_sorted"][0] < without["usage_sorted"][0] - 0.15


def test_entropy_term_sharpens_the_router(tiny_model_dir, batches):
    without = _train_router(tiny_model_dir, batches, "per_token", "entropy", 0.0, skew=0.0, steps=8, lr=0.02)
    sharp = _train_router(tiny_model_dir, batches, "per_token", "entropy", 1.0, skew=0.0, steps=8, lr=0.02)
    assert sharp["router_entropy"] < without["router_entropy"] - 0.5
    assert without["router_entropy"] <= math.log(4) + 1e-6


def test_aux_loss_values(tiny_model_dir, batches):
    model, state = routed(tiny_model_dir, top_k=1)
    with torch.no_grad():
        for module in state.modules.values():  # uniform router: balance term is exactly 1 if usage is even
            module.router.weight.zero_()
            module.router.bias.zero_()
        model(**inputs(batches[0]))
    # zero router: every input ties and picks expert 0, f = (1,0,0,0), P = 1/4 each → E · 1/4 = 1
    assert float(state.aux_loss(1.0, "balance")) == pytest.approx(1.0)
    assert float(state.aux_loss(1.0, "entropy")) == pytest.approx(math.log(4))
    assert float(state.aux_loss(0.0)) == 0.0 and float(state.aux_loss(5.0, "none")) == 0.0


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_exact(tiny_model_dir, batches, tmp_path):
    model, state = routed(tiny_model_dir, experts=3, rank=[1, 2, 3], top_k=2, mode="per_token")
    randomise_experts(state)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        expected = model(**inputs(batches[2])).logits
    save_routed(model, state, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["expert_ranks"] == [[1, 2, 3]] * len(QV) and config["top_k"] == 2 and config["mode"] == "per_token"
    assert config["trainable_params"] == state.trainable_params()

    reloaded = fresh(tiny_model_dir, seed=99)  # another head init: the saved head must win
    new_state = load_routed(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded(**inputs(batches[2])).logits
    assert torch.equal(got, expected)
    assert isinstance(reloaded.get_submodule(QV[0]), RoutedLoRALinear)
    assert new_state.trainable_params() == state.trainable_params()


def test_a_save_leaves_another_writers_temp_file_alone(tiny_model_dir, tmp_path):
    """Two saves into one folder (a retried worker beside its first attempt) each write their own temp file."""
    model, state = routed(tiny_model_dir)
    theirs = [tmp_path / f".{WEIGHTS_FILE}.tmp", tmp_path / f".{CONFIG_FILE}.tmp"]  # the one name every save once used
    for other in theirs:
        other.write_bytes(b"half of another save")
    save_routed(model, state, tmp_path)
    assert [other.read_bytes() for other in theirs] == [b"half of another save"] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [WEIGHTS_FILE, CONFIG_FILE]


def test_format_1_files_still_load(tiny_model_dir, batches, tmp_path):
    """Version 1 wrote one list of expert ranks for every module."""
    model, state = routed(tiny_model_dir, experts=2, rank=[1, 3])
    randomise_experts(state)
    save_routed(model, state, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config.update(format_version=1, expert_ranks=[1, 3])
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    reloaded = fresh(tiny_model_dir, seed=5)
    load_routed(reloaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs(batches[0])).logits, model(**inputs(batches[0])).logits)


def test_per_module_expert_ranks(tiny_model_dir):
    ranks = {QV[0]: [1, 2], QV[1]: [3, 3]}
    model, state = routed(tiny_model_dir, modules=QV[:2], experts=2, rank=ranks)
    assert [m.expert_ranks for m in state.modules.values()] == [(1, 2), (3, 3)]
    assert state.expert_params() == (1 + 2 + 3 + 3) * 2 * HIDDEN
    with pytest.raises(UserError, match="routing.expert_rank"):
        routed(tiny_model_dir, modules=QV[:2], experts=2, rank={QV[0]: [1, 2]})  # QV[1] has none


@pytest.mark.parametrize("experts,mode", [(2, "per_input"), (4, "per_input"), (3, "per_token")])
def test_budget_expert_ranks_meet_the_lora_budget(tiny_model_dir, experts, mode):
    ranks = {MIXED_SHAPES[0]: 8, MIXED_SHAPES[1]: 4, MIXED_SHAPES[2]: 2, QV[1]: 1}
    model = fresh(tiny_model_dir)
    lora = sum(r * (m.in_features + m.out_features) for n, r in ranks.items() for m in [model.get_submodule(n)])
    sites = budget_expert_ranks(model, ranks, experts, mode)
    assert set(sites) <= set(ranks) and MIXED_SHAPES[0] in sites
    assert all(len(r) == experts and min(r) >= 1 and max(r) - min(r) <= 1 for r in sites.values())
    torch.manual_seed(0)
    state = attach_routed_adapters(model, list(sites), experts, sites, 1, mode=mode)
    smallest_step = min(model.get_submodule(n).base_layer.in_features + model.get_submodule(n).base_layer.out_features
                        for n in sites)
    assert lora - smallest_step < state.trainable_params() <= lora  # under the budget by less than one rank of a site
    dropped = set(ranks) - set(sites)
    assert all(ranks[d] <= min(ranks[n] for n in sites) for d in dropped)  # lowest allocated ranks go first


def test_budget_expert_ranks_leave_out_the_later_of_equal_ranks_in_model_order(tiny_model_dir):
    """Ties among the lowest ranks are dropped from the model's end (the names' order put attention.output.dense
    before attention.self.query, and layer.10 before layer.2); a site without rank gets no experts."""
    layer = "bert.encoder.layer.0."
    ranks = {layer + "intermediate.dense": 4, layer + "attention.output.dense": 1, layer + "attention.self.query": 1}
    sites = budget_expert_ranks(fresh(tiny_model_dir), ranks, 2)
    assert list(sites) == [layer + "intermediate.dense", layer + "attention.self.query"]
    sites = budget_expert_ranks(fresh(tiny_model_dir), {layer + "attention.self.query": 0, QV[1]: 8}, 2)
    assert list(sites) == [QV[1]]


def test_budget_expert_ranks_refuses_what_cannot_fit(tiny_model_dir):
    with pytest.raises(UserError, match="routing.num_experts"):
        budget_expert_ranks(fresh(tiny_model_dir), {QV[0]: 1}, 4)


def test_load_refuses_files_that_do_not_fit(tiny_model_dir, tmp_path):
    model, state = routed(tiny_model_dir)
    save_routed(model, state, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["expert_ranks"] = [[2, 2, 2, 4]] * len(QV)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match="shape"):
        load_routed(fresh(tiny_model_dir), tmp_path)
    with pytest.raises(UserError, match="lacks"):
        load_routed(fresh(tiny_model_dir), tmp_path / "nowhere")


def test_a_failed_load_leaves_the_model_as_it_came_and_a_retry_on_it_works(tiny_model_dir, batches, tmp_path):
    model, state = routed(tiny_model_dir)
    randomise_experts(state)
    save_routed(model, state, tmp_path / "good")
    expected = model(**batches[0]).logits.detach()
    save_routed(model, state, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / CONFIG_FILE).read_text())
    (tmp_path / "bad" / CONFIG_FILE).write_text(json.dumps(config | {"expert_ranks": [[2, 2, 2, 4]] * len(QV)}))

    target = fresh(tiny_model_dir)
    before = target(**batches[0]).logits.detach()
    flags = [p.requires_grad for p in target.parameters()]
    with pytest.raises(UserError, match="shape"):
        load_routed(target, tmp_path / "bad")
    assert not any(isinstance(m, RoutedLoRALinear) for m in target.modules())
    assert [p.requires_grad for p in target.parameters()] == flags
    assert torch.equal(target(**batches[0]).logits, before)  # no hook left behind either
    load_routed(target, tmp_path / "good")
    assert torch.equal(target(**batches[0]).logits.detach(), expected)


@pytest.mark.parametrize("text", ['{"format_version": 2, "module_na', '[1, 2]', "top_k"])
def test_load_refuses_a_damaged_config_in_one_line(tiny_model_dir, tmp_path, text):
    model, state = routed(tiny_model_dir)
    save_routed(model, state, tmp_path)
    if text == "top_k":  # valid JSON, one value of the wrong type
        text = json.dumps(json.loads((tmp_path / CONFIG_FILE).read_text()) | {"top_k": "1"})
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(UserError, match=f"^routing: '.*{CONFIG_FILE}' is damaged or not written by save_routed .*; "
                                        "write it again with save_routed$"):
        load_routed(fresh(tiny_model_dir), tmp_path)


def test_attach_rejects_bad_settings(tiny_model_dir):
    with pytest.raises(UserError, match="routing.modules"):
        attach_routed_adapters(fresh(tiny_model_dir), ["bert.encoder.layer.0.attention.self"], 2, 2, 1)
    with pytest.raises(UserError, match="routing.top_k"):
        attach_routed_adapters(fresh(tiny_model_dir), QV, 2, 2, 3)
    with pytest.raises(UserError, match="routing.expert_rank"):
        attach_routed_adapters(fresh(tiny_model_dir), QV, 2, [2, 2, 2], 1)
    with pytest.raises(UserError, match="routing.mode"):
        attach_routed_adapters(fresh(tiny_model_dir), QV, 2, 2, 1, mode="per_batch")


# ---------------------------------------------------------------- training helper


def test_train_routed_reports_quality_cost_and_routing(tiny_model_dir, batches):
    model, state = routed(tiny_model_dir, top_k=1)
    result = train_routed(model, state, batches[:3], batches[3:], epochs=1, lr=1e-2, aux_weight=0.01, device="cpu")
    for key in ("accuracy", "f1", "train_wall_s", "latency_ms_mean", "latency_ms_p95", "peak_infer_mem_mb",
                "fraction_active", "router_entropy", "usage_entropy"):
        assert math.isfinite(result[key]), key
    assert result["trainable_params"] == state.trainable_params()
    assert result["train_steps"] == 3 and result["eval_batches"] == 1
    assert result["fraction_active"] == pytest.approx(0.25)
    assert result["latency_ms_p95"] >= result["latency_ms_mean"] * 0.5 > 0
    assert any(bool(b.weight.detach().abs().sum() > 0) for m in state.modules.values() for b in m.lora_B)  # learned


def test_load_refuses_a_corrupt_weights_file(tiny_model_dir, tmp_path):
    model, state = routed(tiny_model_dir)
    save_routed(model, state, tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="safetensors"):
        load_routed(fresh(tiny_model_dir), tmp_path)


def test_per_input_routers_read_embeddings_narrower_than_the_hidden_size():
    """ELECTRA's embeddings output embedding_size (16 here) and project up to hidden_size (32) after them: the per_input
    router must read 16 wide, and the budget must count routers that wide."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    model = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2)).eval()
    names = ["electra.encoder.layer.0.attention.self.query", "electra.encoder.layer.0.attention.self.value"]
    sites = budget_expert_ranks(model, {n: 4 for n in names}, 2)
    state = attach_routed_adapters(model, list(sites), 2, sites, 1)
    assert {m.router.in_features for m in state.modules.values()} == {16}
    assert state.trainable_params() <= 4 * 2 * (32 + 32)  # experts + 16-wide routers within the LoRA budget
    logits = model(input_ids=torch.tensor([[2, 5, 6, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    assert logits.shape == (1, 2)
