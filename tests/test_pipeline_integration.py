"""The whole pipeline on a slice of the real shipped data, on a local Ray cluster: the output contract."""

import json

import optuna
import pandas as pd
import pytest
import torch
from ray.util.state import list_actors

from orchestrator import pipeline, report
from orchestrator.config import load_config
from orchestrator.data import load_task, make_loader
from orchestrator.models import load_model, load_tokenizer
from orchestrator.train import evaluate

pytestmark = pytest.mark.slow

SLICE = ["name=slice", "train.grad_accum_steps=2", "data.train_size=192", "data.eval_size=96", "model.max_length=16",
         "screen.num_trials=4", "screen.candidates_per_trial=6", "screen.survivors=1", "screen.proxy_batches=2",
         "train.batch_size=32", "train.eval_batch_size=32", "train.baselines=[adalora]", "train.max_concurrent=1",
         "data.validation_size=32"]  # selection (ASHA, best model) on 32 examples held out of the 192
# Two models (each training costs ~30 s of Ray Train start-up here), one at a time so that the second runs in
# the first one's Tune trial process: the survivor and AdaLoRA, the baseline with its own training path (rank
# pruning, singular values). uniform_qv trains in test_fault_tolerance; uniform_all is
# plain LoRA like the survivor (a step of it: test_train_steps; reliability/ makes it fail).


def _actors(ray) -> dict[str, str]:
    """id -> class of every actor the cluster has had, from its own state API (init_ray names it): another Ray
    cluster on the machine must not confuse the test."""
    address = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]
    return {a.actor_id: a.class_name for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_ray):
    results = tmp_path_factory.mktemp("results")
    cfg = load_config("search_spaces/quickstart.yaml", SLICE + [f"results_dir={results}"])
    before = _actors(embedded_ray)  # the shared cluster's earlier tests' actors
    table = pipeline.run(cfg)
    actors = [name for actor_id, name in _actors(embedded_ray).items() if actor_id not in before]
    return cfg, table, actors


def test_report_files_and_columns(finished_run):
    cfg, table, _ = finished_run
    run_dir = cfg.run_dir
    for name in ("report.csv", "report.parquet", "report.md", "screen.csv", "study.db", "run.json", "accuracy_vs_params.png"):
        assert (run_dir / name).is_file(), name
    on_disk = pd.read_parquet(run_dir / "report.parquet")
    assert len(on_disk) == 2  # one survivor + one baseline, one seed
    # the table the CLI prints its summary from is the written one (ROI reference from train.baselines, % of base)
    pd.testing.assert_frame_equal(table.reset_index(drop=True), on_disk, check_dtype=False)
    assert set(on_disk.kind) == {"searched", "baseline"}
    assert set(on_disk[on_disk.kind == "baseline"].label) == {"adalora"}
    for column in report.CONTRACT_COLUMNS + ["proxy_grad_norm", "proxy_params"]:
        assert column in on_disk.columns, column
        assert on_disk[column].notna().all(), column
    assert (on_disk.head_params == 770).all()
    searched = on_disk[on_disk.kind == "searched"].iloc[0]
    adalora = on_disk[on_disk.label == "adalora"].iloc[0]
    assert adalora.trainable_params == 73728  # what AdaLoRA keeps: q,v at target_r = 8, the budget on MiniLM-L6
    assert abs(searched.trainable_params - 73728) <= 0.05 * 73728
    assert searched.proxy_params == searched.trainable_params == searched.trained_params
    assert adalora.trained_params > adalora.trainable_params  # it trains init_r = 12 plus singular values
    assert on_disk.val_accuracy.between(0, 1).all() and report.selection_column(on_disk) == "val_accuracy"
    assert all("val_accuracy" in epoch for history in on_disk.history_json for epoch in json.loads(history))
    task = json.loads((run_dir / "run.json").read_text())["task"]
    # validation takes whole movies (Rotten Tomatoes): the 32 asked plus the rest of the last movie drawn
    assert (task["train_examples"], task["validation_examples"], task["eval_examples"]) == (159, 33, 96)
    assert "(159 train / 33 validation / 96 eval examples)" in (run_dir / "report.md").read_text()
    # the kernel setup each model trained on (README "Reproducibility"): one CPU thread per worker in the quickstart
    assert on_disk.kernels.str.fullmatch(r"cpu .+, \w+ kernels, MKL_CBWR=\w+, 1 threads").all(), on_disk.kernels
    assert f"Trained on: {on_disk.kernels.iloc[0]}" in (run_dir / "report.md").read_text()
    # the cost model (train.keep_result) on the real trainings: 1 worker × 1 vCPU each, at the CPU price
    hours = on_disk.train_wall_s * cfg.train.num_workers * cfg.train.cpus_per_worker / 3600
    assert (on_disk.train_wall_s > 0).all() and on_disk.device_hours.tolist() == pytest.approx(hours.tolist())
    assert on_disk.cost_usd.tolist() == pytest.approx((hours * cfg.cost.price_per_device_hour["cpu"]).tolist())


def test_screen_table_and_study(finished_run):
    cfg, _, _ = finished_run
    screen = pd.read_csv(cfg.run_dir / "screen.csv")
    assert screen.survivor.sum() == 1
    assert len(screen) > 1 and screen.candidate_id.is_unique
    study = optuna.load_study(study_name="screen", storage=f"sqlite:///{cfg.run_dir / 'study.db'}")
    assert len(study.trials) == cfg.screen.num_trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_run_json_records_config_and_versions(finished_run):
    cfg, _, _ = finished_run
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert run["config"]["name"] == "slice"
    assert run["versions"]["peft"] == "0.21.2"
    assert run["seeds"]["train"] == [0]
    assert "finished_at" in run and run["task"]["train_examples"] == 192 - 33  # less the validation split
    assert "Run wall time:" in (cfg.run_dir / "report.md").read_text()  # written before the report, not after it


# PEFT 0.21 warns falsely on every AdaLoRA adapter: its rank_pattern keys name lora_E vectors (README, "reloads")
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
def test_saved_adapters_reload_with_plain_peft(finished_run):
    from peft import PeftModel

    cfg, table, _ = finished_run
    task = load_task(cfg.data)
    loader = make_loader(task.eval, load_tokenizer(cfg.model.name), cfg.model.max_length, 32, shuffle=False)
    for row in table.itertuples():
        path = cfg.run_dir / row.adapter_dir
        assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        model = PeftModel.from_pretrained(load_model(cfg.model.name, task.num_labels, seed=123), path)
        accuracy = evaluate(model, loader, torch.device("cpu"))["accuracy"]
        assert abs(accuracy - row.accuracy) <= 0.005, row.candidate_id


def test_quantised_storage_keeps_the_best_adapters_accuracy(finished_run):
    """registry.quantisation_report on the run's best searched adapter, evaluated on CPU as the run was."""
    from orchestrator.registry import quantisation_report

    cfg, report_table, _ = finished_run
    table = quantisation_report(cfg.run_dir, device="cpu").set_index("precision")
    best = report_table.set_index("candidate_id").loc[table.attrs["candidate_id"]]
    assert table.size_bytes["int8"] < 0.45 * table.size_bytes["fp32"] and table.size_bytes["fp16"] < 0.55 * table.size_bytes["fp32"]
    # fp32 is the run's own evaluation: the same numbers come back
    assert table.accuracy["fp32"] == pytest.approx(best.accuracy, abs=1e-9)
    assert table.eval_loss["fp32"] == pytest.approx(best.eval_loss, rel=1e-6)
    assert abs(table.accuracy_change_pts["fp16"]) <= 0.5 and abs(table.accuracy_change_pts["int8"]) <= 2.0
    # Here the slice's models predict the majority class, so accuracy cannot move: the eval loss shows what storage
    # changed (~1e-6 here; an int8 adapter decoded as zeros moves it 1.6e-3)
    loss_change = (table.eval_loss - table.eval_loss["fp32"]).abs()
    assert loss_change["fp16"] <= 1e-5 and loss_change["int8"] <= 1e-4


def test_existing_run_needs_resume(finished_run):
    from orchestrator.errors import UserError

    cfg, _, _ = finished_run
    with pytest.raises(UserError, match="--resume"):
        pipeline.prepare_run_dir(cfg, resume=False)


def test_best_searched_adapter_is_registered_once(finished_run):
    from orchestrator.registry import Registry

    cfg, table, _ = finished_run
    registered = json.loads((cfg.run_dir / "run.json").read_text())["registered"]
    assert registered == {"name": "rotten_tomatoes", "version": 1, "root": str(cfg.registry_root)}
    entry = Registry(cfg.registry_root).show("rotten_tomatoes")
    best = table[table.kind == "searched"].sort_values("val_accuracy", ascending=False).iloc[0]
    assert entry.metrics["candidate_id"] == best.candidate_id and entry.metrics["accuracy"] == pytest.approx(best.accuracy)
    assert entry.metrics["val_accuracy"] == pytest.approx(best.val_accuracy)  # what chose it
    assert pipeline.register_best(cfg) == registered  # a resumed run does not store it again
    assert [e.version for e in Registry(cfg.registry_root).list("rotten_tomatoes")] == [1]


def test_trials_share_processes_and_no_preemption_watcher_starts(finished_run):
    cfg, table, actors = finished_run
    trainings = len(table)  # one survivor + one baseline, one at a time
    assert actors.count("TrainController") == trainings
    # Tune trials are ImplicitFunc actors: in training, the finished trial's process runs the next one.
    assert actors.count("ImplicitFunc") < cfg.screen.num_trials + trainings
    assert "PreemptionWatcher" not in actors  # nothing preempts an embedded local cluster


def test_a_training_the_cluster_can_never_hold_is_refused_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                                     embedded_ray):
    from orchestrator.errors import UserError

    cfg = load_config("search_spaces/quickstart.yaml", [
        f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", "model.max_length=16", "data.train_size=64",
        "data.eval_size=32", "train.num_workers=2", "train.cpus_per_worker=2"])  # 4.25 CPUs on the cluster's 3
    with pytest.raises(UserError, match=r"^train.num_workers × train.cpus_per_worker: 2 × 2 CPUs"):
        pipeline.run(cfg)
    assert list(tmp_path.iterdir()) == []
