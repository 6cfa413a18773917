"""benchmarks/search_quality.py: every search arm is scored from its own run, and each pays for what it ran
before training (the probe; the calibration trainings of the calibrated arm; nothing for random search)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import search_quality  # noqa: E402

PRICE = 0.05


def rows(kind_label_acc: list[tuple[str, str, str, float]], seeds=(0, 1)) -> pd.DataFrame:
    return pd.DataFrame([{"kind": kind, "label": label, "candidate_id": cid, "allocation": cid, "trainable_params": 9216,
                          "seed": seed, "accuracy": acc + 0.01 * seed, "device_hours": 0.05, "cost_usd": 0.05 * PRICE,
                          "beats_majority": True}
                         for kind, label, cid, acc in kind_label_acc for seed in seeds])


def run_dir(path: Path, probe_s: float, calibration: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "module_scores.json").write_text(json.dumps({"unit": {}, "seconds": {"grad_norm": probe_s}}))
    info = {"config": {"cost": {"price_per_device_hour": {"cpu": PRICE}}}} | ({"calibration": calibration} if calibration else {})
    (path / "run.json").write_text(json.dumps(info))
    return path


def test_each_search_arm_pays_for_what_it_ran_before_training(tmp_path):
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.40), ("searched", "screen#2", "s2", 0.45),
                                   ("baseline", "uniform_qv", "qv", 0.44)]),
              "random search": rows([("searched", "screen#1", "r1", 0.47)]),
              "lora-search (calibrated)": rows([("searched", "screen#1", "c1", 0.50), ("searched", "screen#2", "c2", 0.49)])}
    calibration = {"trainings": 6, "seconds": 720.0, "device_hours": 0.2, "cost_usd": 0.2 * PRICE}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0), "random search": None,
            "lora-search (calibrated)": run_dir(tmp_path / "c", 36.0, calibration)}
    arms, models = search_quality.summarise(tables, dirs, Namespace())
    a = arms.set_index("arm")
    assert list(a.index) == ["lora-search", "random search", "lora-search (calibrated)", "uniform_qv"]
    assert a.loc["lora-search", "device_hours"] == pytest.approx(4 * 0.05 + 0.01)  # 2 models × 2 seeds + the probe
    assert a.loc["random search", "device_hours"] == pytest.approx(2 * 0.05)  # reuses the probe
    assert a.loc["lora-search (calibrated)", "device_hours"] == pytest.approx(4 * 0.05 + 0.01 + 0.2)
    assert a.loc["lora-search (calibrated)", "search_s"] == pytest.approx(36.0 + 720.0)
    assert a.loc["lora-search (calibrated)", "cost_usd"] == pytest.approx((4 * 0.05 + 0.01 + 0.2) * PRICE)
    assert a.loc["lora-search (calibrated)", "best_label"] == "screen#1"
    assert a.loc["lora-search (calibrated)", "gain_vs_uniform_qv_pts"] == pytest.approx(6.0)
    # the first calibrated model is the best of any arm: reached after the probe, the calibration and one model's 2 seeds
    assert a.loc["lora-search (calibrated)", "hours_to_within_0_5_of_best"] == pytest.approx(0.01 + 0.2 + 0.1)
    assert set(models.arm) == set(a.index)


def test_random_draws_beyond_k_judge_random_search_by_its_exact_expectation(tmp_path):
    # four random draws (means over seeds 0.405, 0.425, 0.445, 0.465); k = 2: six draw sets, bests .425 .445 .465 .445 .465 .465
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.45), ("baseline", "uniform_qv", "qv", 0.40)]),
              "random search": rows([("searched", f"screen#{i + 1}", f"r{i}", 0.40 + 0.02 * i) for i in range(4)])}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0), "random search": None}
    arms, models = search_quality.summarise(tables, dirs, Namespace(survivors=2))
    random = arms.set_index("arm").loc["random search"]
    expected = (0.425 + 2 * 0.445 + 3 * 0.465) / 6
    assert random.best_accuracy == pytest.approx(expected) and random.draw_sets == 6
    assert random.models == 2 and random.device_hours == pytest.approx(2 * 2 * 0.05)  # k models' mean cost, 2 seeds each
    assert random.gain_vs_uniform_qv_pts == pytest.approx(100 * (expected - 0.405))
    assert random.share_of_draw_sets_within_0_5_of_best == pytest.approx(3 / 6)  # the best model of any arm: 0.465
    odds = search_quality.random_odds("lora-search", arms.set_index("arm"), models)  # lora-search's best: 0.455
    assert "6 draw sets of 2" in odds and "50% of them reach" in odds  # the 3 sets holding r3 (0.465) reach 0.455
    same_k = search_quality.summarise(tables, dirs, Namespace(survivors=4))[0].set_index("arm")
    assert same_k.loc["random search", "best_accuracy"] == pytest.approx(0.465)  # k draws: the arm is its best, as before


def test_another_data_sample_runs_in_its_own_folder_with_its_split_seed(tmp_path):
    preset = tmp_path / "search_quality_runs" / "full"
    sample_1 = Namespace(split_seed=1, seeds=[0], quick=False, survivors=3, train_size=None, eval_size=None)
    assert search_quality.runs_folder(sample_1, preset) == tmp_path / "search_quality_runs" / "full-split1"
    assert "data.split_seed=1" in search_quality.common_overrides(sample_1, preset)
    default = Namespace(**{**vars(sample_1), "split_seed": None})
    assert search_quality.runs_folder(default, preset) == preset
    assert not any(o.startswith("data.split_seed") for o in search_quality.common_overrides(default, preset))


def stored_run(path: Path, survivors: int) -> None:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"config": {"screen": {"survivors": survivors}}}))


def test_report_only_judges_random_search_at_the_stored_runs_k(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["search_quality.py", "--report-only"])
    args = search_quality.parse_args()
    assert args.survivors is None  # not the CLI default 3: the stored runs' k
    stored_run(tmp_path / "lora-search", 4)
    stored_run(tmp_path / search_quality.RANDOM_NAME, 6)  # --random-draws 6
    search_quality.stored_k(args, tmp_path)
    assert (args.survivors, args.random_draws) == (4, 6)
    tables = {"lora-search": rows([("searched", f"screen#{i + 1}", f"s{i}", 0.40) for i in range(4)]
                                  + [("baseline", "uniform_qv", "qv", 0.40)]),
              "random search": rows([("searched", f"screen#{i + 1}", f"r{i}", 0.40 + 0.01 * i) for i in range(6)])}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0), "random search": None}
    arms = search_quality.summarise(tables, dirs, args)[0].set_index("arm")
    assert arms.loc["random search", "models"] == arms.loc["lora-search", "models"] == 4
    assert arms.loc["random search", "best_label"] == "expected best of 4 (every 4 of 6 draws)"
    with pytest.raises(SystemExit) as exit_:  # a --survivors that redefines the stored arm is refused
        search_quality.stored_k(Namespace(survivors=3, quick=False), tmp_path)
    assert exit_.value.code == 2


def test_arms_table_leaves_missing_values_blank_as_its_caption_says(tmp_path):
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.45), ("baseline", "uniform_qv", "qv", 0.40)], seeds=(0,))}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0)}
    arms, models = search_quality.summarise(tables, dirs, Namespace(survivors=1))
    assert arms.p_vs_uniform_qv.isna().all()  # one seed: no p-value
    args = Namespace(quick=False, split_seed=None, seeds=[0], survivors=1, random_draws=1)
    text = search_quality.markdown(arms, models, {}, defaultdict(str), args, tables, tmp_path)
    table = text.split("## Arms")[1].split("Accuracies in %")[0]
    assert "| lora-search " in table and "nan" not in table


def test_full_mode_counts_every_arms_trainings():
    # 3 search arms × k = 3 + 3 baselines, each over seeds 0 1 2 (the stored full table: 9 + 9 + 9 + 3 + 3 + 3)
    assert search_quality.full_trainings() == 36
    assert "(36 trainings" in search_quality.__doc__ and "27 trainings" not in search_quality.__doc__


def test_random_search_hours_are_the_mean_over_every_order_of_its_draws(tmp_path):
    import itertools

    import _common as C

    # the random run labels its draws by the proxy (screen#1 first); the first one is near the best, the last is not
    draws = [("searched", "screen#1", "r1", 0.505), ("searched", "screen#2", "r2", 0.509), ("searched", "screen#3", "r3", 0.329)]
    tables = {"random search": rows(draws, seeds=(0,)).assign(device_hours=[0.13, 0.12, 0.14])}
    arms, models = search_quality.summarise(tables, {"random search": None}, Namespace(survivors=3))
    hours = [C.hours_to_reach(models.accuracy.iloc[list(o)], models.device_hours.iloc[list(o)], 0.509)
             for o in itertools.permutations(range(3))]
    got = arms.set_index("arm").loc["random search", "hours_to_within_0_5_of_best"]
    assert got == pytest.approx(sum(hours) / 6) and got != pytest.approx(0.13)  # not the proxy's order


def test_probe_cost_counts_its_warm_up(tmp_path):
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.45), ("baseline", "uniform_qv", "qv", 0.40)])}
    path = run_dir(tmp_path / "a", 36.0)
    (path / "module_scores.json").write_text(json.dumps({"unit": {}, "seconds": {"grad_norm": 36.0}, "warmup_seconds": 40.0}))
    a = search_quality.summarise(tables, {"lora-search": path}, Namespace(survivors=1))[0].set_index("arm")
    assert a.loc["lora-search", "search_s"] == pytest.approx(76.0)  # as orchestrator.report.cost_breakdown counts it
    assert a.loc["lora-search", "device_hours"] == pytest.approx(2 * 0.05 + 76.0 / 3600)


def earlier_run(runs_root: Path, folder: str, overrides: list[str]) -> None:
    from orchestrator.config import load_config

    (runs_root / folder).mkdir(parents=True)
    config = load_config(search_quality.SPACE, overrides).to_dict()
    (runs_root / folder / "run.json").write_text(json.dumps({"config": config}, default=str))


def arms_call(runs_root: Path, *argv: str, monkeypatch) -> Namespace:
    monkeypatch.setattr(sys, "argv", ["search_quality.py", *argv])
    return search_quality.parse_args()


def test_arms_refuses_an_earlier_run_of_another_configuration(tmp_path, monkeypatch):
    import orchestrator.pipeline
    from orchestrator.errors import UserError

    def would_train(*_):
        raise RuntimeError("passed the check: would start Ray and train")

    monkeypatch.setattr(orchestrator.pipeline, "init_ray", would_train)
    full = Namespace(seeds=[0, 1, 2], quick=False, survivors=3, train_size=None, eval_size=None, split_seed=None)
    earlier_run(tmp_path, "lora-search", search_quality.common_overrides(full, tmp_path) + ["name=lora-search"])
    for argv, option in ((["--survivors", "2"], "--survivors 3"), (["--seeds", "0"], "--seeds 0 1 2"),
                         (["--train-size", "500"], "--train-size 2000"), (["--num-trials", "4"], "--num-trials 20")):
        args = arms_call(tmp_path, "--arms", "random", "--random-draws", "6", *argv, monkeypatch=monkeypatch)
        with pytest.raises(UserError, match=f"lora-search run .* pass {option}, or add lora-search to --arms"):
            search_quality.train_arms(args, tmp_path)
    args = arms_call(tmp_path, "--arms", "random", "--random-draws", "6", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="passed the check"):  # the same configuration: reported beside this call
        search_quality.train_arms(args, tmp_path)


def test_arms_accepts_earlier_random_draws_of_at_least_k(tmp_path, monkeypatch):
    from orchestrator.errors import UserError

    full = Namespace(seeds=[0, 1, 2], quick=False, survivors=6, train_size=None, eval_size=None, split_seed=None)
    earlier_run(tmp_path, search_quality.RANDOM_NAME, search_quality.common_overrides(full, tmp_path) + [
        f"name={search_quality.RANDOM_NAME}", "screen.allocator=random", "screen.num_trials=1"])
    args = arms_call(tmp_path, "--arms", "lora-search", "calibrated", monkeypatch=monkeypatch)  # k = 3 of its 6 draws
    search_quality.check_earlier_runs(args, tmp_path, search_quality.arm_overrides(args, tmp_path))
    args = arms_call(tmp_path, "--arms", "lora-search", "--survivors", "7", monkeypatch=monkeypatch)
    with pytest.raises(UserError, match="random run .* screen.survivors = 6, this call 7; pass --survivors 6"):
        search_quality.check_earlier_runs(args, tmp_path, search_quality.arm_overrides(args, tmp_path))


def test_ctrl_c_stops_the_benchmark_instead_of_failing_the_arm(tmp_path, monkeypatch):
    import orchestrator.pipeline
    from orchestrator.errors import Interrupted

    def interrupted(cfg, resume=False):
        raise Interrupted("stopped by Ctrl-C")

    monkeypatch.setattr(orchestrator.pipeline, "run", interrupted)
    log = {}
    with pytest.raises(Interrupted):
        search_quality.run_arm("lora-search", [f"results_dir={tmp_path}", "name=lora-search"], log)


def test_every_trained_model_table_leaves_missing_cells_blank(tmp_path):
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.45), ("baseline", "uniform_qv", "qv", 0.40)], seeds=(0,))}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0)}
    arms, models = search_quality.summarise(tables, dirs, Namespace(survivors=1))
    models = models.assign(device_hours=[float("nan"), 0.05])  # a model whose hours are unknown
    args = Namespace(quick=False, split_seed=None, seeds=[0], survivors=1, random_draws=1)
    text = search_quality.markdown(arms, models, {}, defaultdict(str), args, tables, tmp_path)
    assert "| lora-search " in text.split("## Every trained model")[1] and "nan" not in text.split("## Every trained model")[1]
