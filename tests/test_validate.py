"""validate-proxies' measurement: rank agreement and top-k hits in the screen's direction, and how many allocations
the space can give."""

import pandas as pd
import pytest

from orchestrator.errors import UserError
from orchestrator.validate import agreement, check_drawn


def _table(accuracies, scores):
    return pd.DataFrame({"candidate_id": [f"c{i}" for i in range(len(accuracies))], "budget": "budget",
                         "accuracy": accuracies, "proxy_p": scores})


def test_a_perfect_proxy_hits_every_top_model_even_with_fewer_models_than_k():
    row = agreement(_table([0.5, 0.6, 0.7], [1.0, 2.0, 3.0]), ["p"], top_k=4).iloc[0]
    assert row.spearman_rho == pytest.approx(1.0) and row.top_k == 3 and row.top_k_hit_rate == 1.0


def test_top_k_is_taken_in_the_screens_direction():
    """A proxy that ranks backwards finds every top model for a `direction: minimize` screen (which keeps its lowest
    scores): the hit rate must say so, as ρ's sign does."""
    table = _table([0.4, 0.5, 0.6, 0.7, 0.8], [5.0, 4.0, 3.0, 2.0, 1.0])
    maximise, minimise = (agreement(table, ["p"], top_k=2, sign=sign).iloc[0] for sign in (1.0, -1.0))
    assert maximise.spearman_rho == pytest.approx(-1.0) and maximise.top_k_hit_rate == 0.0
    assert minimise.top_k_hit_rate == 1.0


def test_too_few_distinct_allocations_in_the_band_are_refused_and_fewer_than_asked_are_named(capsys):
    with pytest.raises(UserError, match=r"^--n: the space holds only 2 distinct allocations inside the budget band "
                                        r"\(--n 20 asked\), too few to rank; widen space.budget.tolerance"):
        check_drawn(2, 20)
    check_drawn(5, 20)
    assert "the space holds 5 distinct allocations inside the budget band; training those, not 20" in capsys.readouterr().out
    check_drawn(20, 20)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_non_finite_score_ranks_last_and_leaves_rho_defined(sign):
    """As the screen ranks them: a NaN (a non-finite module under rank normalisation) or an overflowed score is the
    worst in the screen's direction, never the best, and one of them no longer makes ρ and τ NaN."""
    accuracy = [0.4, 0.5, 0.6, 0.7, 0.8]
    clean = agreement(_table(accuracy, [1.0, 2.0, 3.0, 4.0, 5.0]), ["p"], top_k=2, sign=sign).iloc[0]
    for bad in (float("nan"), sign * float("inf")):
        worst_first = [bad, 2.0, 3.0, 4.0, 5.0] if sign > 0 else [1.0, 2.0, 3.0, 4.0, bad]
        row = agreement(_table(accuracy, worst_first), ["p"], top_k=2, sign=sign).iloc[0]
        assert row.spearman_rho == pytest.approx(clean.spearman_rho)  # it replaced the screen's worst score
        assert row.top_k_hit_rate == clean.top_k_hit_rate


def test_the_random_floor_is_not_the_stream_that_drew_the_allocations(tiny_modules):
    import numpy as np

    from orchestrator.allocation import Allocation
    from orchestrator.proxies import ModuleScores
    from orchestrator.validate import validation_table

    chosen = {f"c{i}": ("budget", Allocation.from_ranks({m.name: 1})) for i, m in enumerate(tiny_modules[:4])}
    trials = {cid: {"candidate_id": cid, "status": "completed", "accuracy": 0.5, "train_wall_s": 1.0} for cid in chosen}
    table = validation_table(trials, chosen, ModuleScores({"params": {m.name: 1.0 for m in tiny_modules}}),
                             tiny_modules, seed=0)
    assert table.proxy_random.iloc[0] != np.random.default_rng(0).uniform()  # draw_spread's first weight


def test_validate_proxies_trains_at_the_rate_train_lr_grid_picks(tmp_path, tiny_model_dir, sentences, monkeypatch):
    """A proxy's sign can differ between an untuned and a tuned rate: with train.lr_grid every allocation trains at
    its picked rate, as `run` trains it (it trained at train.lr)."""
    import dataclasses

    from orchestrator import pipeline, screen, train
    from orchestrator.config import load_config
    from orchestrator.validate import run_validation

    texts, labels = sentences
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "task.csv", index=False)
    for key in pipeline.RUNTIME_ENV:  # set_runtime_env must not leak into later tests
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pipeline, "init_ray", lambda address: None)
    monkeypatch.setattr(screen, "probe_scores", screen._probe_in_worker)
    monkeypatch.setattr(pipeline, "tuned_learning_rates",
                        lambda cfg, task, jobs: [dataclasses.replace(job, lr=0.05) for job in jobs])
    trained = []

    def stop_after_recording(cfg, task, jobs):
        trained.extend(jobs)
        for job in jobs:
            train.keep_failure(cfg, job, RuntimeError("recorded, not trained"))
        return train.finished_jobs(cfg.run_dir)

    monkeypatch.setattr(train, "run_training", stop_after_recording)
    cfg = load_config(None, [f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", f"data.task={tmp_path / 'task.csv'}",
                             "data.validation_size=8", "train.lr_grid=[1e-3,1e-2]", "name=lr"])
    with pytest.raises(UserError, match="no allocation finished training"):
        run_validation(cfg, 3, 0, resume=False, address=None)
    assert trained and {job.lr for job in trained} == {0.05}
