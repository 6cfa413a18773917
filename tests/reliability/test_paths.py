"""Run directories stay inside results_dir: unsafe names are refused by the config, and
pipeline.prepare_run_dir refuses any run directory that resolves outside results_dir (symlinks included).

Decided behaviour for symlinks: results_dir itself may be a symlink (the whole tree lives elsewhere, on
purpose). A symlink *inside* results_dir named like the run is followed; if it leads outside results_dir
(or to results_dir itself) the run is refused and nothing is written at the target. To keep a run on
another disk, point results_dir there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from orchestrator.config import RunConfig, load_config
from orchestrator.errors import UserError

from ._support import assert_one_line_error, run_cli, snapshot

UNSAFE = ["../x", "..", ".", "a/../../b", "/abs/x", "a/b", "a\\b", ".hidden", "-rf", "run\n", "a..b", "~root", "",
          " x", "x" * 101, "a\x00b", "caf\xe9", "run/"]


@pytest.mark.parametrize("name", UNSAFE, ids=repr)
def test_unsafe_names_refused_by_the_config(name):
    with pytest.raises(UserError) as err:
        RunConfig(name=name)
    message = str(err.value)
    assert message.startswith("name: ") and "is not a safe run name; start with a letter or digit" in message
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs/x", ".hidden"])
def test_unsafe_names_refused_from_an_override(name):
    with pytest.raises(UserError, match="^name: .* is not a safe run name"):
        load_config(None, [f"name={name}"])


@pytest.mark.parametrize("name", ["run", "quickstart", "exp-1_b.2", "1st", "A" * 100])
def test_safe_names_accepted(name):
    assert RunConfig(name=name).name == name


def _cfg(results: Path, name: str = "run") -> RunConfig:
    return RunConfig(name=name, results_dir=str(results))


def test_prepare_run_dir_creates_the_run_inside_results(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    cfg = _cfg(tmp_path / "results")
    run_dir = prepare_run_dir(cfg, resume=False)
    root = (tmp_path / "results").resolve()
    assert run_dir == root / "run" and run_dir.is_dir()
    assert cfg.results_dir == str(root)  # absolute from here on: Tune trials run in other working directories


@pytest.mark.parametrize("name", ["../escape", "..", "", "/abs/escape", "a/../../escape"])
def test_prepare_run_dir_refuses_names_that_skipped_validation(tmp_path, name):
    """Defence in depth: a config mutated after validation still cannot leave results_dir."""
    from orchestrator.pipeline import prepare_run_dir

    cfg = _cfg(tmp_path / "results")
    cfg.name = name
    with pytest.raises(UserError, match="^name: .* leaves the results directory"):
        prepare_run_dir(cfg, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, not even results/


@pytest.mark.parametrize("resume", [False, True])
def test_symlinked_run_dir_pointing_outside_is_refused(tmp_path, resume):
    from orchestrator.pipeline import prepare_run_dir

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if resume:
        (outside / "run.json").write_text("{}")  # looks like a run to resume
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(UserError, match="^name: 'run' leaves the results directory"):
        prepare_run_dir(_cfg(tmp_path / "results"), resume=resume)
    assert snapshot(outside) == before


def test_dangling_symlink_run_dir_is_refused_and_target_not_created(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").symlink_to(tmp_path / "not-yet" / "deep", target_is_directory=True)
    with pytest.raises(UserError, match="leaves the results directory"):
        prepare_run_dir(_cfg(tmp_path / "results"), resume=False)
    assert not (tmp_path / "not-yet").exists()


def test_symlink_to_results_dir_itself_is_refused(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").symlink_to(tmp_path / "results", target_is_directory=True)
    with pytest.raises(UserError, match="leaves the results directory"):
        prepare_run_dir(_cfg(tmp_path / "results"), resume=False)


def test_symlink_to_another_run_inside_results_is_followed_but_not_overwritten(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    results = tmp_path / "results"
    (results / "real").mkdir(parents=True)
    (results / "real" / "run.json").write_text('{"created_at": "earlier", "config": {}}')
    (results / "run").symlink_to(results / "real", target_is_directory=True)
    with pytest.raises(UserError, match="already exists; pass --resume"):
        prepare_run_dir(_cfg(results), resume=False)
    assert prepare_run_dir(_cfg(results), resume=True) == (results / "real").resolve()
    assert (results / "real" / "run.json").read_text() == '{"created_at": "earlier", "config": {}}'


def test_symlinked_results_dir_is_allowed(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    disk = tmp_path / "big-disk"
    disk.mkdir()
    (tmp_path / "results").symlink_to(disk, target_is_directory=True)
    run_dir = prepare_run_dir(_cfg(tmp_path / "results"), resume=False)
    assert run_dir == disk.resolve() / "run" and run_dir.is_dir()


def test_symlink_loop_is_a_user_error(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    (tmp_path / "results").mkdir()
    os.symlink("run", tmp_path / "results" / "run")  # results/run -> results/run
    with pytest.raises(UserError, match="^name: "):
        prepare_run_dir(_cfg(tmp_path / "results"), resume=False)


def test_run_dir_that_is_a_file_is_a_user_error(tmp_path):
    from orchestrator.pipeline import prepare_run_dir

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").write_text("a file where the run directory should be")
    with pytest.raises(UserError, match="^name: "):
        prepare_run_dir(_cfg(tmp_path / "results"), resume=False)


def test_cli_refuses_a_symlink_escape_in_one_line(tmp_path, tiny_model_dir, no_ray, capsys, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").symlink_to(outside, target_is_directory=True)
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(40)), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "run", "results_dir": str(tmp_path / "results"),
                                      "model": {"name": str(tiny_model_dir)}, "data": {"task": str(data)}}),
                      encoding="utf-8")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["run", config], capsys, monkeypatch)
    assert_one_line_error(code, out, err, "name: 'run' leaves the results directory", "use a plain name")
    assert snapshot(tmp_path) == before
