"""Routed LoRA experts inside `lora-search run`: the `routing` config section, routed jobs, the routed model
that train.py builds (exact parameters, aux term), its checkpoints and kept files, and the whole pipeline."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from orchestrator import pipeline, report
from orchestrator.allocation import Allocation
from orchestrator.config import RunConfig, load_config
from orchestrator.errors import UserError
from orchestrator.models import load_model
from orchestrator.routing import CONFIG_FILE, WEIGHTS_FILE, RoutedLoRALinear, budget_expert_ranks, check_expert_counts
from orchestrator.train import TrainJob, build_adapted, keep_result

LAYER = "bert.encoder.layer.{}.attention.self.{}"
RANKS = {LAYER.format(0, "query"): 8, LAYER.format(0, "value"): 8, LAYER.format(1, "query"): 4, LAYER.format(1, "value"): 4}


@pytest.mark.parametrize("override,field", [
    ("routing.num_experts=[0, 4]", "routing.num_experts"), ("routing.num_experts=[]", "routing.num_experts"),
    ("routing.num_experts=[1000000000]", "routing.num_experts"),  # built a tuple that large before refusing anything
    ("routing.gating=[sparse]", "routing.gating"), ("routing.gating=[]", "routing.gating"),
    ("routing.top_k=3", "routing.top_k"), ("routing.mode=per_batch", "routing.mode"),
    ("routing.aux=l2", "routing.aux"), ("routing.aux_weight=-0.1", "routing.aux_weight"),
    ("routing.enabled=maybe", "routing.enabled"), ("routing.experts=4", "routing.experts"),
])
def test_bad_routing_fields_name_themselves(override, field):
    overrides = [override] + (["routing.num_experts=[2]"] if "top_k" in override else [])
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message and ";" in message  # problem; fix


def test_top_k_of_every_expert_is_refused_in_a_new_run_as_the_dense_model_again(tiny_model_dir, tmp_path, monkeypatch):
    """sparse_adapters.yaml's former "Search E" line (num_experts [2, 4], top_k 2) trained the dense E=2 model twice.
    A run started so still resumes: routing.* cannot change on a resume, so refusing it would strand the run."""
    from orchestrator.routing import check_sparse_variants

    monkeypatch.setattr(pipeline, "init_ray", lambda address: pytest.fail("Ray started"))
    cfg = load_config("search_spaces/sparse_adapters.yaml", [
        f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", "routing.num_experts=[2, 4]"])
    with pytest.raises(UserError, match=r"^routing.top_k: 2 activates every one of 2 experts, which is the dense model "
                                        r"again under a sparse label; use num_experts above top_k, or leave topk out "
                                        r"of routing.gating$"):
        pipeline.run(cfg)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="^--resume: .* holds no run to resume"):  # past the check, to the run's own
        pipeline.run(cfg, resume=True)
    check_sparse_variants(2, [2], ["dense"])
    check_sparse_variants(2, [3, 4], ["topk", "dense"])


def test_routing_section_defaults_and_normalisation():
    cfg = load_config(None, ["routing.enabled=true", "routing.num_experts=[4, 2, 4]", "routing.gating=[dense, dense]"])
    assert cfg.routing.num_experts == [2, 4] and cfg.routing.gating == ["dense"]
    assert load_config(None).routing.enabled is False
    assert load_config("search_spaces/sparse_adapters.yaml").routing.enabled


def test_routed_jobs_per_survivor_expert_count_and_gating():
    cfg = load_config(None, ["routing.enabled=true", "routing.num_experts=[2, 4]"])
    searched = Allocation.from_ranks(RANKS)
    allocations = {"c1": ("searched", "screen#1", searched), "dyn-c1": ("searched", "screen#1+dynamic", searched),
                   "b1": ("baseline", "uniform_qv", Allocation.from_ranks({LAYER.format(0, "query"): 8}))}
    variants = pipeline._routed_variants(allocations, cfg)
    assert variants == {"sparse2-c1": ("screen#1 sparse top-1 E=2", searched, "topk", 2),
                        "dense2-c1": ("screen#1 dense E=2", searched, "dense", 2),
                        "sparse4-c1": ("screen#1 sparse top-1 E=4", searched, "topk", 4),
                        "dense4-c1": ("screen#1 dense E=4", searched, "dense", 4)}  # baselines and dynamic stay plain
    job = TrainJob("sparse4-c1", "routed", "screen#1 sparse top-1 E=4", searched.as_dict(), 0, "routed", "topk", 4)
    assert job.job_id == "sparse4-c1-s0" and TrainJob(**json.loads(json.dumps(job.__dict__))) == job
    assert pipeline._routed_variants(allocations, load_config(None)) == {}


def test_a_survivor_with_shortcut_sites_is_said_to_stay_plain(capsys):
    cfg = load_config(None, ["routing.enabled=true", "space.shortcuts=[residual]"])
    with_shortcut = Allocation.from_ranks({LAYER.format(0, "query"): 8, "L1.shortcut.residual": 4})
    allocations = {"c1": ("searched", "screen#1", with_shortcut),
                   "c2": ("searched", "screen#2", Allocation.from_ranks(RANKS))}
    assert sorted(pipeline._routed_variants(allocations, cfg)) == ["dense4-c2", "sparse4-c2"]
    assert capsys.readouterr().out == ("routing: no routed variant of screen#1 (shortcut sites: routing replaces "
                                       "Linear modules only)\n")


def _cfg(tiny_model_dir, tmp_path, *extra) -> RunConfig:
    return load_config(None, [f"model.name={tiny_model_dir}", f"results_dir={tmp_path}", "name=unit",
                              "routing.enabled=true", "routing.num_experts=[2]", *extra])


def _routed(tiny_model_dir, cfg, gating="topk", seed=0):
    torch.manual_seed(seed)
    job = TrainJob("sparse2-c1", "routed", "screen#1 sparse top-1 E=2", dict(RANKS), seed, "routed", gating, 2)
    return job, build_adapted(cfg, job, load_model(str(tiny_model_dir), 2, seed=seed), steps_per_epoch=4)


def test_build_adapted_routed_has_the_exact_budgeted_parameters(tiny_model_dir, tmp_path, tiny_split):
    cfg = _cfg(tiny_model_dir, tmp_path)
    _, adapted = _routed(tiny_model_dir, cfg)
    model = adapted.peft_model
    # Plain LoRA: (8+8+4+4)·(32+32) = 1,536. Routers: 4 sites × 2·(32+1) = 264, leaving 1,272 for
    # experts ≈ 0.828 × each rank: floors 6, 6, 3, 3 (1,416 in all), then one rank more to the site
    # furthest below its share (query 0): 7, 6, 3, 3 → 19·64 + 264 = 1,480 ≤ 1,536.
    ranks = {name: model.get_submodule(name).expert_ranks for name in RANKS}
    assert ranks == dict(zip(RANKS, [(4, 3), (3, 3), (2, 1), (2, 1)]))
    kept = adapted.kept()
    assert kept["trainable_params"] == 1480 and kept["lora_params"] == 1536 and kept["router_params"] == 264
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or ".router." in n or "classifier" in n}
    assert all(isinstance(model.get_submodule(n), RoutedLoRALinear) for n in RANKS)

    batch = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]), "labels": torch.tensor([0, 1]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    model.train()
    task_loss = model(**batch).loss
    total = adapted.with_aux(task_loss)
    aux = float((total - task_loss).detach())
    assert aux == pytest.approx(cfg.routing.aux_weight * float(adapted.routing.aux_loss(1.0).detach()), rel=1e-5)
    assert aux >= cfg.routing.aux_weight * 0.999  # the balance term is ≥ 1 per module
    total.backward()
    assert model.get_submodule(LAYER.format(0, "query")).router.weight.grad.abs().sum() > 0


def test_dense_models_train_without_the_aux_term(tiny_model_dir, tmp_path):
    _, adapted = _routed(tiny_model_dir, _cfg(tiny_model_dir, tmp_path), gating="dense")
    assert adapted.routing.config.aux == "none" and adapted.routing.config.top_k == 2
    loss = torch.tensor(0.7)
    model = adapted.peft_model
    model(input_ids=torch.tensor([[2, 10, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert float(adapted.with_aux(loss)) == pytest.approx(0.7)


def test_checkpoint_round_trip_and_kept_files(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    job, adapted = _routed(tiny_model_dir, cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapted.routing.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    adapted.peft_model.eval()
    with torch.no_grad():
        expected = adapted.peft_model(**batch).logits
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    adapted.save(str(checkpoint))
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])

    _, resumed = _routed(tiny_model_dir, cfg, seed=7)  # other initial experts and head: the checkpoint must win
    resumed.load(str(checkpoint))
    resumed.peft_model.eval()
    with torch.no_grad():
        assert torch.equal(resumed.peft_model(**batch).logits, expected)

    metrics = {"accuracy": 0.5, "train_wall_s": 2.0, "device": "cpu", "history": "[]", "epoch": 1, "epochs_planned": 1,
               "checkpoint_path": str(checkpoint), **adapted.kept()}
    keep_result(cfg, job, metrics, 1)
    kept = cfg.run_dir / "adapters" / job.candidate_id
    assert sorted(p.name for p in kept.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    row = json.loads((cfg.run_dir / "trials" / f"{job.job_id}.json").read_text())
    assert row["method"] == "routed" and row["gating"] == "topk" and row["experts"] == 2
    assert row["trainable_params"] == 1480 and row["adapter_dir"] == "adapters/sparse2-c1"


def _refusal(call, *args) -> str | None:
    try:
        call(*args)
    except UserError as err:
        return str(err)
    return None


def test_the_drivers_expert_check_refuses_what_budget_expert_ranks_refuses_at_the_cheapest_site(tiny_model_dir):
    model = load_model(str(tiny_model_dir), 2)
    query, ffn = LAYER.format(0, "query"), "bert.encoder.layer.0.intermediate.dense"
    for experts in range(1, 12):  # E rank-1 experts and a router at a query site: E·(32+32 + 32+1); 5 fit in 512
        alone = _refusal(budget_expert_ranks, model, {query: 8}, experts)
        assert _refusal(check_expert_counts, model, [ffn, query], [experts], "per_input", 8 * 64) == alone
        assert (alone is None) == (experts <= 5)


def test_an_expert_count_that_fits_no_survivor_is_refused_before_the_screen(tiny_model_dir, tmp_path, monkeypatch):
    """Every routed job would refuse it, but only after the screen and the plain trainings. Budget qv_rank 8 on the
    tiny BERT: 2,048 ± 5%; 30 rank-1 experts and a router cost 30·97 = 2,910 even at a q/k/v site."""
    monkeypatch.setattr(pipeline, "init_ray", lambda address: pytest.fail("Ray started"))
    cfg = load_config("search_spaces/sparse_adapters.yaml", [
        f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", "model.max_length=16", "data.train_size=64",
        "data.eval_size=32", "routing.num_experts=[4, 30]"])
    with pytest.raises(UserError, match=r"^routing.num_experts: 30 rank-1 experts and a router do not fit in 2,150 "
                                        r"parameters; use fewer experts or a larger space.budget$"):
        pipeline.run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_plain_lora_checkpoints_still_use_peft_files(tiny_model_dir, tmp_path):
    """Adapted.save/load serve every method: plain LoRA keeps PEFT's adapter files."""
    cfg = _cfg(tiny_model_dir, tmp_path)
    job = TrainJob("c1", "searched", "screen#1", dict(RANKS), 0)
    adapted = build_adapted(cfg, job, load_model(str(tiny_model_dir), 2, seed=0), steps_per_epoch=4)
    with torch.no_grad():
        for name, p in adapted.peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    adapted.save(str(tmp_path / "ckpt"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    again = build_adapted(cfg, job, load_model(str(tiny_model_dir), 2, seed=1), steps_per_epoch=4)
    again.load(str(tmp_path / "ckpt"))
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    adapted.peft_model.eval(), again.peft_model.eval()
    with torch.no_grad():
        assert torch.equal(again.peft_model(**batch).logits, adapted.peft_model(**batch).logits)
    assert again.routing is None and float(again.with_aux(torch.tensor(1.5))) == 1.5


# ---------------------------------------------------------------- the whole pipeline, real Ray


@pytest.mark.slow
def test_pipeline_trains_plain_and_sparse(tiny_model_dir, tmp_path, embedded_ray):
    from orchestrator.data import load_task, make_loader
    from orchestrator.models import load_tokenizer
    from orchestrator.routing import load_routed
    from orchestrator.train import evaluate

    cfg = load_config("search_spaces/sparse_adapters.yaml", [
        "name=routed", f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.train_size=64", "data.eval_size=32", "screen.num_trials=1", "screen.candidates_per_trial=6",
        "screen.proxy_batches=1", "screen.batch_size=8", "train.batch_size=16", "train.eval_batch_size=8",
        "train.baselines=[]", "routing.num_experts=[2]", "routing.top_k=1", "routing.gating=[topk]",
        "register.best=false"])  # two models, one round of two; dense gating: test_dense_gating_uses_every_expert
    pipeline.run(cfg)
    table = pd.read_csv(cfg.run_dir / "report.csv")
    assert sorted(table.adapter) == ["plain", "sparse top-k"]
    assert set(table.kind) == {"searched", "routed"} and table.allocation.nunique() == 1
    for column in report.ROUTING_COLUMNS:
        assert column in table, column
    assert table[["accuracy", "latency_ms_mean", "latency_ms_p95", "latency_cpu_ms_p95", "peak_infer_mem_mb"]].notna().all().all()
    by = table.set_index("adapter")
    assert by.loc["sparse top-k", "fraction_active"] == pytest.approx(0.5)  # top-1 of 2 experts
    assert 0 <= by.loc["sparse top-k", "router_entropy"] <= 0.6932  # ≤ log 2
    assert by.loc["sparse top-k", "trainable_params"] <= by.loc["plain", "trainable_params"]
    assert pd.isna(by.loc["plain", "fraction_active"])
    markdown = (cfg.run_dir / "report.md").read_text()
    assert "## Sparse vs dense vs plain LoRA" in markdown and "sparse top-k" in markdown

    # The kept routed adapter reloads on a fresh base model and scores what the report says.
    task = load_task(cfg.data)
    loader = make_loader(task.eval, load_tokenizer(cfg.model.name), cfg.model.max_length, 8, shuffle=False)
    model = load_model(cfg.model.name, task.num_labels, seed=123)
    load_routed(model, cfg.run_dir / by.loc["sparse top-k", "adapter_dir"])
    assert evaluate(model, loader, torch.device("cpu"))["accuracy"] == pytest.approx(
        by.loc["sparse top-k", "accuracy"], abs=1e-9)
