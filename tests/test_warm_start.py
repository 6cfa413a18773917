"""Warm start: the best allocations of an earlier run are trained again on a new task."""

import json

import pandas as pd
import pytest

from orchestrator.allocation import searchable_units
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, load_model
from orchestrator.pipeline import warm_start_allocations


@pytest.fixture(scope="module")
def modules():
    base = load_model("minilm-l6", 2)
    return searchable_units(base, adaptable_modules(base), ("residual",))


def _earlier_run(tmp_path, rows):
    pd.DataFrame(rows).to_parquet(tmp_path / "report.parquet")
    return str(tmp_path)


def test_best_searched_allocations_by_mean_accuracy(tmp_path, modules):
    run = _earlier_run(tmp_path, [
        {"kind": "searched", "candidate_id": "a1", "allocation": "L0.query:8", "accuracy": 0.70},
        {"kind": "searched", "candidate_id": "a1", "allocation": "L0.query:8", "accuracy": 0.80},  # mean 0.75
        {"kind": "searched", "candidate_id": "a2", "allocation": "L1.value:4,L2.shortcut.residual:2", "accuracy": 0.85},
        {"kind": "searched", "candidate_id": "a3", "allocation": "L5.key:2", "accuracy": 0.60},
        # a dynamic model's allocation is where it started, not what it trained: never averaged in
        {"kind": "searched", "candidate_id": "dyn-a3", "allocation": "L5.key:2", "accuracy": 0.99},
        {"kind": "baseline", "candidate_id": "uniform_qv", "allocation": "L3.query:1", "accuracy": 0.99},  # never
    ])
    chosen = warm_start_allocations(run, modules, count=2)
    assert [a.compact(modules) for a in chosen] == ["L1.value:4,L2.shortcut.residual:2", "L0.query:8"]


def test_a_run_with_a_validation_split_gives_its_best_on_validation(tmp_path, modules):
    run = _earlier_run(tmp_path, [
        {"kind": "searched", "candidate_id": "a1", "allocation": "L0.query:8", "accuracy": 0.90, "val_accuracy": 0.60,
         "val_f1": 0.6},
        {"kind": "searched", "candidate_id": "a2", "allocation": "L5.key:2", "accuracy": 0.80, "val_accuracy": 0.70,
         "val_f1": 0.7},
    ])
    assert [a.compact(modules) for a in warm_start_allocations(run, modules, count=1)] == ["L5.key:2"]


def test_no_warm_start_without_a_run(modules):
    assert warm_start_allocations(None, modules, count=2) == []


def test_refuses_runs_without_searched_models_or_outside_the_space(tmp_path, modules):
    with pytest.raises(UserError, match="no trained searched model"):
        warm_start_allocations(_earlier_run(tmp_path, [{"kind": "baseline", "candidate_id": "uniform_qv",
                                                        "allocation": "L0.query:8", "accuracy": 0.9}]), modules, count=1)
    with pytest.raises(UserError, match="space.shortcuts"):
        warm_start_allocations(_earlier_run(tmp_path, [{"kind": "searched", "candidate_id": "a1",
                                                        "allocation": "L1.shortcut.cross_layer:2", "accuracy": 0.9}]),
                               modules, count=1)
    with pytest.raises(UserError, match=r"^screen\.warm_start_from: '.*' holds an allocation this model cannot carry "
                                        r"\(allocation: 'L9\.query:2' .*\); warm-start from a run on the same base model$"):
        warm_start_allocations(_earlier_run(tmp_path, [{"kind": "searched", "candidate_id": "a1",  # a 12-layer model's
                                                        "allocation": "L9.query:2", "accuracy": 0.9}]), modules, count=1)
    with pytest.raises(UserError, match="^screen.warm_start_from: '.*missing/report.parquet' not found; give the directory of a finished"):
        warm_start_allocations(str(tmp_path / "missing"), modules, count=1)


def _earlier_study(run_dir, space, values, direction="maximize"):
    """An earlier run's screen study, one trial per value, with the parameters OptunaSearch stores."""
    import json

    import optuna

    from orchestrator.allocators import distribution_space

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"config": {"screen": {"storage": None}}}))
    study = optuna.create_study(study_name="screen", storage=f"sqlite:///{run_dir / 'study.db'}", direction=direction)
    keys = list(distribution_space(space, space.ranks))
    for value in values:
        trial = study.ask()
        for key in keys:  # the same names and distributions as the Tune space the screen gives OptunaSearch
            trial.suggest_categorical(key, space.ranks) if key == "max_rank" else trial.suggest_float(
                key, -1.0 if key == "depth_bias" else 0.0, 1.0)
        study.tell(trial, value)
    return [t.params for t in optuna.load_study(study_name="screen", storage=f"sqlite:///{run_dir / 'study.db'}").trials]


def test_warm_start_points_are_the_best_earlier_distributions(tmp_path):
    from orchestrator.config import SpaceConfig
    from orchestrator.pipeline import warm_start_points

    space = SpaceConfig(ranks=[2, 4, 8])
    params = _earlier_study(tmp_path / "earlier", space, [0.1, 0.9, 0.5])
    assert warm_start_points(str(tmp_path / "earlier"), space, space.ranks, count=2) == [params[1], params[2]]
    assert warm_start_points(None, space, space.ranks, count=2) == []
    # another space (other module types, or ranks the earlier max_rank is not among): nothing to enqueue
    other_types = SpaceConfig(module_types=["query", "value"], ranks=[2, 4, 8])
    assert warm_start_points(str(tmp_path / "earlier"), other_types, other_types.ranks, 2) == []
    assert warm_start_points(str(tmp_path / "earlier"), SpaceConfig(ranks=[3, 5]), [3, 5], 2) == []
    # a cap under which this budget cannot be filled is not among the screen's choices: not enqueued either
    reachable = [r for r in space.ranks if r != params[1]["max_rank"]]
    assert params[1] not in warm_start_points(str(tmp_path / "earlier"), space, reachable, count=3)


def test_minimised_study_gives_its_lowest_values_first(tmp_path):
    from orchestrator.config import SpaceConfig
    from orchestrator.pipeline import warm_start_points

    space = SpaceConfig(ranks=[2, 4, 8])
    params = _earlier_study(tmp_path / "earlier", space, [0.1, 0.9], direction="minimize")
    assert warm_start_points(str(tmp_path / "earlier"), space, space.ranks, count=1) == [params[0]]


def test_enqueued_points_are_the_first_trials_and_marked(tmp_path, modules, monkeypatch):
    from ray.tune import Result

    from orchestrator import screen
    from orchestrator.allocators import distribution_space, make_budget, space_modules
    from orchestrator.config import load_config
    from orchestrator.proxies import ModuleScores

    cfg = load_config(None, [f"results_dir={tmp_path}"])
    cfg.run_dir.mkdir(parents=True)
    point = {"w_query": 0.9, "w_key": 0.1, "w_value": 0.8, "w_attention.output.dense": 0.2,
             "w_intermediate.dense": 0.3, "w_output.dense": 0.4, "depth_bias": -0.5,
             "max_rank": 8}  # draws candidates inside the budget band (max_rank 1 draws none: nothing to mark)
    point = {k: point[k] for k in distribution_space(cfg.space, cfg.space.ranks)}
    searcher = screen._searcher(cfg, [point])
    searcher.set_search_properties(None, None, distribution_space(cfg.space, cfg.space.ranks))
    configs = {"first": searcher.suggest("first"), "second": searcher.suggest("second")}
    assert configs["first"] == point and configs["second"] != point
    # screen.csv's warm_start column: the enqueued trial's candidates are marked, the sampler's own are not.
    # Each trial's candidates come from the real screen_trial, in a Tune Result as the screen's tuner returns it.
    searchable = space_modules(modules, cfg.space)
    context = screen.ScreenContext.from_config(cfg, searchable, make_budget(modules, cfg.space),
                                               ModuleScores({cfg.screen.rank_by: {m.name: 1.0 for m in searchable}}))
    reported = []
    monkeypatch.setattr(screen.tune, "report", reported.append)
    results = []
    for trial_id, config in configs.items():
        screen.screen_trial(config, context)
        results.append(Result(metrics={**reported.pop(), "config": config, "trial_id": trial_id}, checkpoint=None,
                              error=None, path=str(tmp_path)))
    table = screen.screen_table(results, context, cfg.screen.survivors, [point])
    assert table.groupby("screen_trial").warm_start.agg(set).to_dict() == {"first": {True}, "second": {False}}


def test_only_allocations_inside_this_search_are_trained(modules, capsys):
    from orchestrator.allocation import Allocation
    from orchestrator.allocators import Budget, space_modules
    from orchestrator.config import SpaceConfig
    from orchestrator.pipeline import inside_the_search

    space = SpaceConfig(module_types=["query", "value"], ranks=[2, 4, 8])
    searchable = space_modules(modules, space)
    fits = Allocation.from_compact("L0.query:8,L1.value:8", modules)  # 2 × 768 × 8 = 12,288 params
    budget = Budget(fits.trainable_params(modules), 0.05)
    outside = [Allocation.from_compact(text, modules) for text in
               ("L0.intermediate.dense:8",  # a module type this space leaves out
                "L0.query:16",  # 12,288 params, at a rank this space does not search
                "L0.query:8,L1.value:4")]  # 9,216 params: outside the band
    kept = inside_the_search([fits, *outside], searchable, space.ranks, modules, budget)
    assert kept == [fits]
    assert "3 of 4 earlier allocations lie outside this run's space, ranks or budget band" in capsys.readouterr().out


def test_a_resumed_run_trains_the_warm_starts_its_first_session_chose(tmp_path, modules):
    """The earlier run may be resumed with more seeds (re-ranked) or deleted after this run started: a --resume
    trains the allocations the first session recorded in run.json (it read the earlier run again, or failed)."""
    import shutil

    from orchestrator import pipeline
    from orchestrator.allocators import make_budget, space_modules
    from orchestrator.config import load_config

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    _earlier_run(earlier, [{"kind": "searched", "candidate_id": "a1", "allocation": "L0.query:8,L1.value:8",
                            "accuracy": 0.8}])
    cfg = load_config(None, [f"results_dir={tmp_path / 'results'}", "name=warm", f"screen.warm_start_from={earlier}",
                             "space.module_types=[query,value]", "space.ranks=[2,4,8]", "space.budget.params=12288", "space.budget.qv_rank=null"])
    searchable, budget = space_modules(modules, cfg.space), make_budget(modules, cfg.space)
    warm, outside, points = pipeline.warm_start(cfg, modules, searchable, budget, resume=False)
    assert [a.compact(modules) for a in warm] == ["L0.query:8,L1.value:8"] and outside == 0 and points == []
    record = pipeline.warm_start_record(cfg, warm, outside, points, modules)  # what pipeline.run writes to run.json
    assert record == {"allocations": 1, "outside_the_search": 0, "enqueued_trials": 0,
                      "trained": ["L0.query:8,L1.value:8"], "points": []}
    pipeline.prepare_run_dir(cfg, resume=False)
    pipeline.write_run_json(cfg, warm_start=record)
    shutil.rmtree(earlier)
    assert pipeline.warm_start(cfg, modules, searchable, budget, resume=True) == (warm, 0, [])
    with pytest.raises(UserError, match="screen.warm_start_from"):  # a new run still needs the earlier one
        pipeline.warm_start(cfg, modules, searchable, budget, resume=False)


def test_a_run_on_another_base_model_is_refused(tmp_path, tiny_model_dir):
    """`L3.query` names a place in every encoder that deep: only the earlier run's model.name tells them apart."""
    from orchestrator.models import resolve_model_path
    from orchestrator.pipeline import check_same_base_model

    (tmp_path / "run.json").write_text(json.dumps({"config": {"model": {"name": "minilm-l6"}}}))
    check_same_base_model(str(tmp_path), "minilm-l6")
    check_same_base_model(str(tmp_path), str(resolve_model_path("minilm-l6")))  # the packaged model's own directory
    check_same_base_model(None, str(tiny_model_dir))
    with pytest.raises(UserError, match=rf"^screen.warm_start_from: '.*' searched on the base model 'minilm-l6', this "
                                        rf"run on '{tiny_model_dir}'; warm-start from a run on the same base model$"):
        check_same_base_model(str(tmp_path), str(tiny_model_dir))
