"""The screen replays: the same seed keeps the same candidates and survivors whichever concurrent trial finishes first."""

import pytest

from orchestrator.config import load_config

TRIALS = 14  # past Optuna's 10 random start-up trials, so the sampler's history steers the suggestions


def suggestions(tmp_path, sampler: str, finish_newest_first: bool) -> list[dict]:
    """Drive the screen's search algorithm as Tune does, completing the live trials in one order or the other."""
    from orchestrator.allocators import distribution_space
    from orchestrator.screen import search_algorithm

    cfg = load_config(None, [f"results_dir={tmp_path}", f"name={sampler}-{finish_newest_first}", f"screen.sampler={sampler}"])
    cfg.run_dir.mkdir(parents=True)
    searcher = search_algorithm(cfg, [])
    searcher.set_search_properties(None, None, distribution_space(cfg.space, cfg.space.ranks))
    live, suggested = [], []
    while len(suggested) < TRIALS or live:
        while len(suggested) < TRIALS and (config := searcher.suggest(f"t{len(suggested)}")) is not None:
            live.append((f"t{len(suggested)}", config))
            suggested.append(config)
        trial_id, config = live.pop(-1 if finish_newest_first else 0)
        searcher.on_trial_complete(trial_id, {"objective": config["w_query"], "params": 1000.0})
    return suggested


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_suggestions_do_not_depend_on_which_trial_finishes_first(sampler, tmp_path):
    assert suggestions(tmp_path, sampler, False) == suggestions(tmp_path, sampler, True)


@pytest.mark.slow
def test_two_screens_with_one_seed_keep_the_same_survivors(run_tiny_screens):
    """The real Tune + OptunaSearch screen on a local Ray cluster, run twice into two run folders."""
    overrides = ["space.ranks=[1,2,4]", "screen.proxies=[grad_norm,params]", "screen.rank_by=grad_norm",
                 f"screen.num_trials={TRIALS}", "screen.candidates_per_trial=4"]
    (cfg, first, _), (_, second, _) = run_tiny_screens(["name=first", *overrides], ["name=second", *overrides])
    first, second = (table[["candidate_id", "proxy_grad_norm", "survivor"]] for table in (first, second))
    assert len(first) > cfg.screen.survivors and first.equals(second)


@pytest.mark.slow
def test_a_screen_resumed_after_tune_lost_its_record_starts_its_study_over(run_tiny_screens):
    """The driver died before Tune's first experiment checkpoint: the study holds trials Tune cannot restore. The
    screen starts over, so the study and screen.csv hold the same trials and the seed keeps its survivors."""
    import shutil

    import optuna

    from orchestrator.allocators import reachable_caps
    from orchestrator.screen import run_screen

    [(cfg, first, context)] = run_tiny_screens(["name=lost", "space.ranks=[1,2,4]", "screen.proxies=[grad_norm,params]",
                                                "screen.rank_by=grad_norm", "screen.num_trials=4"])
    shutil.rmtree(cfg.run_dir / "tune" / "screen")
    again = run_screen(cfg, context)
    study = optuna.load_study(study_name="screen", storage=f"sqlite:///{cfg.run_dir / 'study.db'}")
    assert len(study.trials) == 4  # the screen's trials once, not the lost ones too
    # on the tiny model, every module at rank 1 or 2 stays under this budget: the screen offers only max_rank 4
    assert reachable_caps(context.modules, context.ranks, context.budget) == [4]
    assert {t.distributions["max_rank"].choices for t in study.trials} == {(4,)}
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == again.screen_trial.nunique()
    assert again[["candidate_id", "survivor"]].equals(first[["candidate_id", "survivor"]])


def test_a_screen_that_drew_nothing_inside_the_band_is_one_line(tiny_modules):
    from orchestrator.allocators import Budget
    from orchestrator.errors import UserError
    from orchestrator.proxies import ModuleScores
    from orchestrator.screen import ScreenContext, screen_table

    context = ScreenContext(tiny_modules, [1], Budget(128, 0.05), ModuleScores(unit={"params": {}}), 4, "params", 1.0, 0)
    with pytest.raises(UserError, match=r"^screen: no trial drew an allocation inside the budget band 122..134 params; "
                                        "raise screen.num_trials"):
        screen_table([], context, survivors=2)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_first_rows_of_the_screen_are_its_survivors_even_with_tied_scores(tiny_modules, sign):
    """Ties are common (rank_by: params, calibrated scores): rows and the survivor column must agree, and screen#k
    labels follow the rows. A non-finite score is last and never a survivor."""
    from orchestrator.allocators import Budget
    from orchestrator.proxies import ModuleScores
    from orchestrator.screen import ScreenContext, _survivors

    context = ScreenContext(tiny_modules, [1], Budget(128, 0.05), ModuleScores(unit={"params": {}}), 4, "params", sign, 0)
    rows = [{"candidate_id": f"c{i:03d}", "proxy_params": float(i % 3)} for i in range(200)]
    rows[7]["proxy_params"] = float("nan")
    rows[8]["proxy_params"], rows[9]["proxy_params"] = float("inf"), float("-inf")  # an overflowed proxy: not a best
    table = _survivors(rows, context, survivors=5)
    assert table.survivor.tolist() == [True] * 5 + [False] * 195
    assert (sign * table.proxy_params.iloc[:-3]).is_monotonic_decreasing
    assert table.candidate_id.iloc[-3:].tolist() == ["c007", "c008", "c009"]


def test_a_screen_that_keeps_fewer_survivors_than_asked_says_so(tiny_modules, tmp_path):
    """A non-finite score never survives: an all-NaN proxy left a run that trained only its baselines, silently."""
    from orchestrator.allocators import Budget
    from orchestrator.config import load_config
    from orchestrator.proxies import ModuleScores
    from orchestrator.screen import ScreenContext, _survivors, survivor_shortfall

    cfg = load_config(None, [f"results_dir={tmp_path}", "screen.rank_by=params", "screen.survivors=3"])
    context = ScreenContext(tiny_modules, [1], Budget(128, 0.05), ModuleScores(unit={"params": {}}), 4, "params", 1.0, 0)
    rows = [{"candidate_id": f"c{i}", "proxy_params": value} for i, value in enumerate([1.0, float("nan"), float("inf")])]
    assert survivor_shortfall(_survivors(rows, context, 3), cfg) == (
        "screen: 1 of 3 survivors (3 distinct candidates, 2 with a non-finite params score); only those train")
    rows[0]["proxy_params"] = float("nan")
    assert survivor_shortfall(_survivors(rows, context, 3), cfg).endswith("3 with a non-finite params score); no "
                                                                       "screened model trains")
    rows = [{"candidate_id": f"c{i}", "proxy_params": float(i)} for i in range(3)]
    assert survivor_shortfall(_survivors(rows, context, 3), cfg) is None


def test_a_random_screens_survivors_are_its_first_draws_not_the_proxys_pick(tiny_modules, tmp_path):
    """screen.allocator=random is the control random search is: it trains draws no score chose. Ranked by the
    proxy, its survivors were random proposals plus proxy selection."""
    import numpy as np

    from orchestrator.allocators import get_allocator, make_budget
    from orchestrator.proxies import ModuleScores
    from orchestrator.screen import ScreenContext, allocator_screen

    cfg = load_config(None, [f"results_dir={tmp_path}", "screen.allocator=random", "screen.num_trials=1",
                             "screen.candidates_per_trial=40", "screen.survivors=3", "space.ranks=[1,2,4]",
                             "screen.rank_by=grad_norm", "screen.proxies=[grad_norm]"])
    scores = ModuleScores({"grad_norm": {m.name: float(i) for i, m in enumerate(tiny_modules)}})
    context = ScreenContext.from_config(cfg, tiny_modules, make_budget(tiny_modules, cfg.space), scores)
    table = allocator_screen(cfg, context)
    drawn = get_allocator("random").propose(scores.unit["grad_norm"], tiny_modules, cfg.space.ranks, context.budget,
                                            40, np.random.default_rng(context.seed), context.sign)
    first = list(dict.fromkeys(a.compact(tiny_modules) for a in drawn))[:3]
    assert table[table.survivor].allocation.tolist() == first == table.allocation.iloc[:3].tolist()
    best = table.proxy_grad_norm.nlargest(3).index.tolist()
    assert best != [0, 1, 2]  # the draws' proxy order differs from their draw order: the test tells the two apart


@pytest.mark.parametrize("sign, objective", [(1.0, 5.0), (-1.0, 2.0)])
def test_a_trials_objective_is_its_best_finite_candidate(tiny_modules, monkeypatch, sign, objective):
    """max() keeps a NaN that comes first; the trial was then recorded FAIL though it drew finite candidates."""
    from orchestrator import screen
    from orchestrator.allocation import Allocation
    from orchestrator.allocators import Budget
    from orchestrator.proxies import ModuleScores

    reported = []
    monkeypatch.setattr(screen.tune, "report", reported.append)
    first, second, third = (m.name for m in tiny_modules[:3])
    monkeypatch.setattr(screen, "sample_allocations",
                        lambda *args: [Allocation.from_ranks({name: 1}) for name in (first, second, third)])
    unit = {m.name: 0.0 for m in tiny_modules} | {first: float("nan"), second: 2.0, third: 5.0}
    context = screen.ScreenContext(tiny_modules, [1], Budget(128, 0.05), ModuleScores(unit={"grad_norm": unit}), 3,
                                   "grad_norm", sign, 0)
    screen.screen_trial({"w_query": 0.5}, context)
    assert reported[0]["objective"] == objective and reported[0]["num_candidates"] == 3
