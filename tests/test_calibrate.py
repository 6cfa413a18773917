"""Calibration (`screen.rank_by: calibrated`): the config contract, the one-type allocations, the calibration
sample, the measured score, how the screen and the report use it, and (slow) the calibration runs on Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from orchestrator import calibrate, pipeline
from orchestrator.allocation import Allocation
from orchestrator.allocators import Budget, get_allocator, make_budget
from orchestrator.config import CALIBRATED, load_config
from orchestrator.data import Split, TaskData
from orchestrator.errors import UserError
from orchestrator.proxies import ModuleScores

ON = ["screen.rank_by=calibrated"]


@pytest.mark.parametrize("overrides,field", [
    (ON + ["screen.direction=minimize"], "screen.direction"),
    (["screen.proxies=[grad_norm,calibrated]"], "screen.proxies"),
    (["screen.rank_by=calibrate"], "screen.rank_by"),
    (ON + ["calibrate.train_size=4"], "calibrate.train_size"),
    (ON + ["calibrate.eval_size=0"], "calibrate.eval_size"),
    (ON + ["calibrate.epochs=0"], "calibrate.epochs"),
    (ON + ["calibrate.trainings=3"], "calibrate.trainings"),
])
def test_bad_calibration_fields_name_themselves(overrides, field):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message and ";" in message


def test_calibrated_rank_by_needs_no_proxy_entry():
    cfg = load_config(None, ON + ["calibrate.train_size=64", "calibrate.epochs=2"])
    assert cfg.screen.rank_by == CALIBRATED and CALIBRATED not in cfg.screen.proxies
    assert (cfg.calibrate.train_size, cfg.calibrate.eval_size, cfg.calibrate.epochs) == (64, 300, 2)
    default = load_config(None, ON).calibrate
    assert (default.train_size, default.epochs) == (None, None)  # the real trainings' sample and schedule


def test_type_allocation_lowest_rank_then_fewest_modules_inside_the_band(tiny_modules):
    queries = [m for m in tiny_modules if m.type == "query"]  # 2 layers × 64 params per rank
    ffn_up = [m for m in tiny_modules if m.type == "intermediate.dense"]  # 2 × 96 per rank
    assert calibrate.type_allocation(queries, [1, 2, 4], Budget(256, 0.0)).as_dict() == {m.name: 2 for m in queries}
    assert calibrate.type_allocation(queries, [1, 2, 4], Budget(128, 0.0)).as_dict() == {m.name: 1 for m in queries}
    both_r2 = calibrate.type_allocation(ffn_up, [1, 2, 4], Budget(384, 0.0))  # r1 reaches 192 at most; r4 on one is higher
    assert both_r2.as_dict() == {m.name: 2 for m in ffn_up}
    assert calibrate.type_allocation(queries, [1, 2], Budget(1000, 0.05)) is None  # 256 at most


def test_every_type_of_the_space_gets_one_allocation_inside_the_band(tiny_modules):
    cfg = load_config(None, ON + ["space.module_types=[query,value,intermediate.dense]", "space.ranks=[1,2,4]",
                                  "space.budget.qv_rank=2"])
    budget = make_budget(tiny_modules, cfg.space)
    chosen = calibrate.calibration_allocations(cfg, tiny_modules, budget)
    assert set(chosen) == {"query", "value", "intermediate.dense"}
    assert chosen.pop("intermediate.dense") is None  # 96 params per rank: 384 or 768, never inside 487..537
    modules = {m.name: m for m in tiny_modules}
    for module_type, allocation in chosen.items():
        assert {modules[name].type for name, _ in allocation.ranks} == {module_type}
        assert budget.admits(allocation.trainable_params(tiny_modules))


def test_shortcut_sites_are_not_calibrated(tiny_model, tiny_modules):
    """A shortcut alone has no LoRA module for PEFT to train: its calibration run could only fail."""
    from orchestrator.allocation import searchable_units

    cfg = load_config(None, ON + ["space.module_types=[query,value]", "space.shortcuts=[residual]", "space.ranks=[1,2,4]",
                                  "space.budget.qv_rank=2"])
    units = searchable_units(tiny_model, tiny_modules, cfg.space.shortcuts)
    assert set(calibrate.calibration_allocations(cfg, units, make_budget(units, cfg.space))) == {"query", "value"}


def test_calibration_scores_on_examples_held_out_of_the_training_split_never_on_the_eval_split():
    texts = [f"text {i}" for i in range(100)]
    evaluated = [f"eval {i}" for i in range(50)]
    task = TaskData("t", ["a", "b"], Split(texts, [i % 2 for i in range(100)]), Split(evaluated, [0] * 50))
    cfg = load_config(None, ON + ["calibrate.train_size=20", "calibrate.eval_size=30"])
    small = calibrate.calibration_task(task, cfg)
    assert (len(small.train), len(small.eval)) == (20, 30)
    assert set(small.train.texts) | set(small.eval.texts) <= set(texts)  # the report's eval split stays unseen
    assert not set(small.train.texts) & set(small.eval.texts)
    assert calibrate.calibration_task(task, cfg).train.texts == small.train.texts
    other = calibrate.calibration_task(task, load_config(None, ON + ["calibrate.train_size=20", "screen.seed=1"]))
    assert other.train.texts != small.train.texts
    whole = calibrate.calibration_task(task, load_config(None, ON))  # train_size null: all that is not held out
    assert (len(whole.train), len(whole.eval)) == (50, 50)  # eval_size 300 capped at half the training split
    assert sorted(whole.train.texts + whole.eval.texts, key=lambda t: int(t.split()[1])) == texts


def test_calibration_holds_out_whole_groups():
    """A group (Rotten Tomatoes: a movie) scores or trains the calibration runs, never both."""
    texts = [f"text {i}" for i in range(100)]
    train = Split(texts, [i % 2 for i in range(100)], groups=[f"movie {i // 7}" for i in range(100)])
    small = calibrate.calibration_task(TaskData("t", ["a", "b"], train, Split(["e"], [0])),
                                       load_config(None, ON + ["calibrate.eval_size=30"]))
    assert 30 <= len(small.eval) < 30 + 7 and len(small.train) + len(small.eval) == 100
    assert not set(small.train.groups) & set(small.eval.groups)


def test_calibration_config_keeps_the_recipe_in_its_own_run_directory(tmp_path):
    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "name=job", "train.epochs=3", "train.seeds=[4,5]",
                                  "calibrate.epochs=2", "train.max_steps=7"])
    sub = calibrate.calibration_config(cfg)
    assert sub.run_dir == (tmp_path / "job" / "job.calibration").resolve()
    assert (sub.train.epochs, sub.train.seeds, sub.train.max_steps, sub.train.early_stopping) == (2, [0], None, False)
    assert (sub.train.lr, sub.train.batch_size) == (cfg.train.lr, cfg.train.batch_size)


def test_calibration_without_epochs_keeps_the_recipes_schedule(tmp_path):
    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "train.epochs=3", "train.max_steps=7"])
    sub = calibrate.calibration_config(cfg)
    assert (sub.train.epochs, sub.train.max_steps, sub.train.seeds) == (3, 7, [cfg.screen.seed])


def _table(accuracies: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"module_type": t, "accuracy": a, "train_wall_s": 10.0, "device_hours": 0.01, "cost_usd": 0.001}
                         for t, a in accuracies.items()])


def test_unit_scores_are_points_bought_over_the_mean(tiny_modules):
    budget = Budget(256, 0.05)
    unit = calibrate.unit_scores(_table({"query": 0.70, "value": 0.50, "key": float("nan")}), tiny_modules, budget)
    by_type = {m.type: unit[m.name] for m in tiny_modules}
    assert by_type["query"] == pytest.approx(100 * 64 * 0.10 / 256) and by_type["value"] == pytest.approx(-by_type["query"])
    assert by_type["key"] == 0 and by_type["intermediate.dense"] == 0  # failed / outside the space: the mean
    scores = ModuleScores({CALIBRATED: unit})
    all_query = Allocation.from_ranks({m.name: 2 for m in tiny_modules if m.type == "query"})  # 256 params
    assert scores.score(CALIBRATED, all_query) == pytest.approx(10.0)  # +10 points over the mean
    assert calibrate.unit_scores(_table({"query": float("nan")}), tiny_modules, budget) == {m.name: 0.0 for m in tiny_modules}


def test_rank_above_the_calibrated_rank_earns_nothing(tiny_modules):
    """The same parameters on one type score alike only at the measured shape: concentrating them on fewer
    modules at a higher rank than the calibration trained counts just the measured part."""
    budget = Budget(256, 0.05)
    table = _table({"query": 0.70, "value": 0.50}).assign(allocation=["L0.query:1,L1.query:1", "L0.value:1,L1.value:1"])
    queries = [m.name for m in tiny_modules if m.type == "query"]
    scores = ModuleScores({CALIBRATED: calibrate.unit_scores(table, tiny_modules, budget)},
                          rank_caps={CALIBRATED: calibrate.measured_ranks(table, tiny_modules)})
    assert scores.rank_caps[CALIBRATED] == {m.name: 1 for m in tiny_modules if m.type in ("query", "value")}
    spread = Allocation.from_ranks({queries[0]: 1, queries[1]: 1})
    concentrated = Allocation.from_ranks({queries[0]: 2})  # the same 128 params
    assert scores.score(CALIBRATED, spread) == pytest.approx(5.0)  # 100 × 128 × 0.10 / 256
    assert scores.score(CALIBRATED, concentrated) == pytest.approx(2.5)
    assert ModuleScores(scores.unit).score(CALIBRATED, concentrated) == pytest.approx(5.0)  # uncapped: a tie


def test_screen_allocators_pick_the_calibrated_best_type(tiny_modules):
    budget = Budget(256, 0.05)
    searched = [m for m in tiny_modules if m.type in ("query", "value")]
    unit = calibrate.unit_scores(_table({"query": 0.55, "value": 0.75}), tiny_modules, budget)
    best = get_allocator("knapsack").propose(unit, searched, [1, 2, 4], budget, 1, np.random.default_rng(0))[0]
    names = {m.name: m.type for m in tiny_modules}
    assert {names[name] for name, _ in best.ranks} == {"value"}


def test_calibrated_scores_reads_a_finished_calibration_and_records_it(tmp_path, tiny_modules):
    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "name=resumed"])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "run.json").write_text(json.dumps({"created_at": "earlier"}))
    _table({"query": 0.6, "value": 0.8}).assign(allocation=["L0.query:2,L1.query:2", "L0.value:1"], trainable_params=256,
                                                 status="completed").to_csv(cfg.run_dir / calibrate.TABLE, index=False)
    budget = Budget(256, 0.05)  # a finished calibration: nothing is trained again
    scores = pipeline.calibrated_scores(cfg, None, tiny_modules, budget, ModuleScores({"params": {m.name: 1.0 for m in tiny_modules}}))
    assert set(scores.unit) == {"params", CALIBRATED}
    stored = json.loads((cfg.run_dir / "module_scores.json").read_text())
    assert stored["unit"][CALIBRATED] == pytest.approx(scores.unit[CALIBRATED])
    caps = {m.name: {"query": 2, "value": 1}[m.type] for m in tiny_modules if m.type in ("query", "value")}
    assert scores.rank_caps == {CALIBRATED: caps} and stored["rank_caps"] == {CALIBRATED: caps}
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert run["created_at"] == "earlier" and run["calibration"]["trainings"] == 2
    assert list(run["calibration"]["accuracy_by_type"]) == ["value", "query"]
    assert run["calibration"]["device_hours"] == pytest.approx(0.02)


@pytest.mark.parametrize("damage", ["", "module_type,accuracy\nquery,0.6\n"])
def test_a_damaged_calibration_table_is_one_line_naming_it_on_resume(tmp_path, tiny_modules, damage):
    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "name=damaged"])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / calibrate.TABLE).write_text(damage)  # empty (a full disk), or columns lost by hand
    with pytest.raises(UserError, match=r"^report: '.*calibration\.csv' (cannot be read \(.+\)|has no 'allocation'); delete "
                                        r"it and run `lora-search run \.\.\. --resume`"):
        calibrate.run_calibration(cfg, None, tiny_modules, make_budget(tiny_modules, cfg.space))


@pytest.mark.parametrize("finished", [0, 1])
def test_a_calibration_with_fewer_than_two_finished_runs_stops_the_run(tmp_path, tiny_modules, monkeypatch, finished):
    """With one measured type its gain over the mean is 0, and so is every candidate's score: the screen would rank
    blindly."""
    import orchestrator.train as train

    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "name=failing", "space.module_types=[query,value]",
                                  "space.ranks=[1,2]", "space.budget.qv_rank=1"])
    cfg.run_dir.mkdir(parents=True)

    def trained(sub, task, jobs):
        return {j.job_id: {"status": "completed", "accuracy": 0.7} if i < finished else
                {"status": "failed", "error": "RuntimeError: boom"} for i, j in enumerate(jobs)}

    monkeypatch.setattr(train, "run_training", trained)
    with pytest.raises(UserError, match=rf"calibrate: {finished} calibration run\(s\) finished, fewer than the two .*"
                                        "remove .*failing.calibration"):
        task = TaskData("t", ["a", "b"], Split(["x"] * 16, [0, 1] * 8), Split(["y"] * 8, [0, 1] * 4))
        calibrate.run_calibration(cfg, task, tiny_modules, make_budget(tiny_modules, cfg.space))
    assert not (cfg.run_dir / calibrate.TABLE).exists()  # nothing marks the stage done


@pytest.mark.parametrize("types, params, fitting", [
    ("[query]", 64, "query"),  # one type: nothing to compare
    ("[query,intermediate.dense]", 192, "intermediate.dense"),  # 2 queries × 64 per rank: 64, 128, 256, never 192
])
def test_a_space_with_fewer_than_two_calibratable_types_is_refused_before_ray(tiny_modules, types, params, fitting):
    cfg = load_config(None, ON + [f"space.module_types={types}", "space.ranks=[1,2]", f"space.budget.params={params}",
                                  "space.budget.qv_rank=null", "space.budget.tolerance=0"])
    with pytest.raises(UserError, match=rf"^screen\.rank_by: calibrated .* and 1 of space\.module_types do "
                                        rf"\({fitting}\); add module types"):
        calibrate.check_calibratable(cfg, tiny_modules, make_budget(tiny_modules, cfg.space))


@pytest.mark.slow
def test_calibration_trains_one_run_per_type_on_ray_with_the_recipe_and_resumes(tmp_path, tiny_model_dir, sentences,
                                                                                embedded_ray):
    texts, labels = sentences
    task = TaskData("tiny", ["neg", "pos"], Split(texts[:48], labels[:48]), Split(texts[48:], labels[48:]))
    cfg = load_config(None, ON + [f"results_dir={tmp_path}", "name=cal", f"model.name={tiny_model_dir}",
                                  "model.max_length=16", "space.module_types=[query,value]", "space.ranks=[1,2]",
                                  "space.budget.qv_rank=1", "calibrate.eval_size=16",
                                  "train.batch_size=16", "train.use_gpu=false"])
    from orchestrator.allocation import searchable_units
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(str(tiny_model_dir), 2)
    modules = searchable_units(base, adaptable_modules(base), [])
    budget = make_budget(modules, cfg.space)
    cfg.run_dir.mkdir(parents=True)
    table = calibrate.run_calibration(cfg, task, modules, budget)
    assert sorted(table.module_type) == ["query", "value"] and (table.status == "completed").all()
    assert table.accuracy.between(0, 1).all() and (table.device_hours > 0).all()
    trials = sorted(p.name for p in (cfg.run_dir / "cal.calibration" / "trials").glob("*.json"))
    assert len(trials) == 2 and all(name.startswith("cal-") for name in trials)
    assert not (cfg.run_dir / "trials").exists()  # the main run's results stay apart
    for name in ("calibration.csv", "calibration.md", "calibration.png"):
        assert (cfg.run_dir / name).is_file()
    text = (cfg.run_dir / "calibration.md").read_text()
    assert "on 32 training examples for 1 epoch(s), scored on 16 other examples of the training split" in text
    assert "ranks candidates by `calibrated`" in text
    again = calibrate.run_calibration(cfg, task, modules, budget)  # resumed: read back, nothing trained (no Ray)
    pd.testing.assert_frame_equal(again, pd.read_csv(cfg.run_dir / calibrate.TABLE))
