"""benchmarks/placement_check.py: each arm is compared at its own best rate, and the verdict says what was measured."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import placement_check  # noqa: E402

ARMS = ("ffn", "qv")


def rows(accuracy: dict[tuple[str, float], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"label": label, "lr": lr, "seed": seed, "accuracy": value}
                         for (label, lr), values in accuracy.items() for seed, value in enumerate(values)])


def test_each_arm_is_read_at_its_own_best_rate():
    per_lr, summary = placement_check.summarise(rows({
        ("ffn", 1e-3): [0.60, 0.62, 0.61], ("ffn", 2e-3): [0.70, 0.71, 0.72], ("ffn", 4e-3): [0.65, 0.66, 0.64],
        ("qv", 1e-3): [0.50, 0.52, 0.51], ("qv", 2e-3): [0.60, 0.61, 0.62], ("qv", 4e-3): [0.68, 0.69, 0.70]}), ARMS)
    assert list(per_lr.lr) == [1e-3, 2e-3, 4e-3]
    assert per_lr.gain.round(6).tolist() == [10.0, 10.0, -4.0]  # points, per rate
    assert summary["best_lr"] == {"ffn": 2e-3, "qv": 4e-3}
    assert summary["gain"] == pytest.approx(71.0 - 69.0)  # at each one's best, not at a shared rate (+10)
    assert summary["at_edge"] == ["qv"]  # its best is the grid's top: its optimum may lie beyond
    assert not summary["met"]
    assert per_lr.loc[1, "ffn %"] == "71.00 ± 1.00"


def test_target_needs_the_gain_and_a_small_welch_p():
    clear = rows({("ffn", 1e-3): [0.80, 0.81, 0.80, 0.81], ("qv", 1e-3): [0.70, 0.71, 0.70, 0.71]})
    _, summary = placement_check.summarise(clear, ARMS)
    assert summary["met"] and summary["welch_p"] < 0.05 and summary["at_edge"] == []  # one rate: no edge to speak of
    assert "**met**" in placement_check.verdict(summary, ARMS)

    noisy = rows({("ffn", 1e-3): [0.95, 0.60, 0.90], ("qv", 1e-3): [0.70, 0.71, 0.72]})
    _, summary = placement_check.summarise(noisy, ARMS)
    assert summary["gain"] >= placement_check.TARGET_PTS and not summary["met"]
    assert "cannot tell it from noise" in placement_check.verdict(summary, ARMS)

    short = rows({("ffn", 1e-3): [0.705, 0.715, 0.71], ("qv", 1e-3): [0.70, 0.705, 0.71]})
    _, summary = placement_check.summarise(short, ARMS)
    assert "missed** by 1.10 points" in placement_check.verdict(summary, ARMS)


def test_defaults_are_the_documented_presets():
    full, quick = placement_check.parse_args([]), placement_check.parse_args(["--quick"])
    assert full.space.name == "reuters_r8.yaml" and full.lrs == [4e-3, 8e-3, 1.6e-2] and full.seeds == [0, 1, 2]
    assert quick.lrs == [8e-3] and quick.seeds == [0, 1]
    assert tuple(full.arms) == ("ffn_up L1-5 r1", "q+v r1")


def test_arms_train_every_epoch_unless_told_otherwise(tmp_path):
    from orchestrator.config import load_config

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "newsgroups_tight_budget.yaml"
    args = placement_check.parse_args(["--space", str(space), "--set", "train.epochs=3"])
    cfg = load_config(space, placement_check.config_overrides(tmp_path, args))
    assert cfg.train.epochs == 3 and not cfg.train.early_stopping  # ASHA would stop the arms at different epochs
    assert cfg.train.baselines == [] and cfg.results_dir == str(tmp_path)
    args = placement_check.parse_args(["--space", str(space), "--set", "train.epochs=3", "train.early_stopping=true"])
    assert load_config(space, placement_check.config_overrides(tmp_path, args)).train.early_stopping  # --set wins


def test_a_run_under_its_own_name_keeps_the_spaces_default_run(tmp_path):
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "reuters_r8.yaml"
    default = placement_check.runs_folder(tmp_path, placement_check.parse_args(["--space", str(space)]))
    other = placement_check.runs_folder(tmp_path, placement_check.parse_args(
        ["--space", str(space), "--set", "name=reuters-r52", "data.task=reuters_r52"]))
    assert default == tmp_path / "reuters-r8" and other == tmp_path / "reuters-r52"  # starting one over keeps the other


def test_arms_are_small_space_labels_or_named_compact_allocations(tiny_modules):
    from exhaustive import small_space

    args = argparse.Namespace(arms=["shortcuts=L0.query:1,L1.shortcut.cross_layer:2", "q+v r1"])
    arms = placement_check.pick_arms(args, tiny_modules)
    assert args.arms == ["shortcuts", "q+v r1"]
    assert arms["shortcuts"].as_dict() == {tiny_modules[0].name: 1, "L1.shortcut.cross_layer": 2}
    assert arms["q+v r1"] == small_space(tiny_modules, quick=False)["q+v r1"]


@pytest.mark.parametrize("given, named", [
    (["q+v r9", "q+v r1"], "'q+v r9' is not a label"),
    (["bad=L7.query:1", "q+v r1"], "--arms bad: allocation: 'L7.query:1'"),
    (["q+v r1", "q+v r1"], "two different labels"),
])
def test_a_bad_arm_is_refused_in_one_line_with_exit_2(tiny_modules, capsys, given, named):
    with pytest.raises(SystemExit) as stop:
        placement_check.pick_arms(argparse.Namespace(arms=given), tiny_modules)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and named in message and message.count("\n") == 1


def test_rows_follow_the_allocation_not_the_label_a_training_was_stored_under(tiny_modules):
    """An arm renamed between calls keeps its trainings; other allocations of the run and failed trainings stay out."""
    from exhaustive import small_space
    from orchestrator.lr_tuning import sweep_id

    space = small_space(tiny_modules, quick=False)
    arms = {"renamed": space["q+k r1"], "q+v r1": space["q+v r1"]}

    def trial(allocation, label, lr, seed, status="completed"):
        return {"candidate_id": sweep_id(allocation.candidate_id, lr), "label": label, "lr": lr, "seed": seed,
                "status": status, "accuracy": 0.5, "trainable_params": 10, "train_wall_s": 1.0}

    trials = [trial(space["q+k r1"], "old name", 8e-3, 0), trial(space["q+k r1"], "old name", 1.6e-2, 0),
              trial(space["q+v r1"], "q+v r1", 8e-3, 0), trial(space["q+v r1"], "q+v r1", 8e-3, 1, status="failed"),
              trial(space["k r2"], "k r2", 8e-3, 0)]
    rows = placement_check.arm_rows({f"t{i}": t for i, t in enumerate(trials)}, arms)
    assert [(r["label"], r["lr"], r["seed"]) for r in rows] == [
        ("renamed", 8e-3, 0), ("renamed", 1.6e-2, 0), ("q+v r1", 8e-3, 0)]


def test_the_edge_of_the_grid_is_each_arms_own():
    """An arm trained at fewer rates, still rising at its top one, is flagged though the other arm went higher."""
    _, summary = placement_check.summarise(rows({
        ("ffn", 4e-3): [0.70, 0.71], ("ffn", 8e-3): [0.75, 0.76], ("ffn", 1.6e-2): [0.80, 0.81],
        ("qv", 4e-3): [0.80, 0.81], ("qv", 8e-3): [0.86, 0.87], ("qv", 1.6e-2): [0.88, 0.89], ("qv", 3.2e-2): [0.72, 0.73]}), ARMS)
    assert summary["best_lr"] == {"ffn": 1.6e-2, "qv": 1.6e-2} and summary["at_edge"] == ["ffn"]


def test_a_rate_one_arm_did_not_train_is_blank_not_nan():
    per_lr, _ = placement_check.summarise(rows({("ffn", 4e-3): [0.70, 0.71], ("qv", 4e-3): [0.80, 0.81],
                                                ("qv", 8e-3): [0.86, 0.87]}), ARMS)
    table = placement_check.rate_table(per_lr)
    assert "nan" not in table and "| 0.008 |" in table and "0/2" in table


def arm_trials(arms: dict, failed: set[str]) -> dict[str, dict]:
    """Seeds 0 1 of each arm at 8e-3; the arms in `failed` NaN-failed every training."""
    from orchestrator.lr_tuning import sweep_id

    ok = {"status": "completed", "accuracy": 0.5, "trainable_params": 10, "train_wall_s": 1.0}
    return {f"{label}{seed}": {"candidate_id": sweep_id(arms[label].candidate_id, 8e-3), "lr": 8e-3, "seed": seed,
                               **({"status": "failed", "error": "FloatingPointError: loss is nan"} if label in failed else ok)}
            for label in arms for seed in (0, 1)}


@pytest.mark.parametrize("failed, named", [({"ffn"}, "'ffn' ("), ({"ffn", "qv"}, "'ffn' nor of 'qv'")])
def test_an_arm_without_a_finished_training_is_refused_in_one_line(tiny_modules, tmp_path, capsys, failed, named):
    """Not a KeyError after the trainings: the arm, its first error and where the others are; exit 2."""
    from exhaustive import small_space

    space = small_space(tiny_modules, quick=False)
    arms = {"ffn": space["q+k r1"], "qv": space["q+v r1"]}
    placement_check.check_every_arm_trained(arm_trials(arms, set()), arms, tmp_path)  # both trained: goes on
    with pytest.raises(SystemExit) as stop:
        placement_check.check_every_arm_trained(arm_trials(arms, failed), arms, tmp_path)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1
    assert f"no finished training of {named}" in message and "loss is nan" in message and str(tmp_path / "trials") in message
