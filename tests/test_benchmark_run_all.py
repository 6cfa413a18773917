"""benchmarks/run_all.py and the results folders: --quick tables never replace the full ones."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common as C  # noqa: E402
import run_all  # noqa: E402


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    C.add_out_argument(parser)
    return parser.parse_args(list(argv))


def test_quick_tables_go_to_their_own_folder():
    assert C.out_dir(parsed()) == C.RESULTS
    assert C.out_dir(parsed("--quick")) == C.RESULTS / "quick"
    assert C.out_dir(parsed("--quick", "--out", "elsewhere")) == Path("elsewhere")


def test_readme_reports_both_modes_and_links_the_quick_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "QUICK_RESULTS", tmp_path / "quick")
    (tmp_path / "quick").mkdir()
    (tmp_path / "screening_cost.md").write_text("# Full table\n\nCommand: `python benchmarks/screening_cost.py` · "
                                                "2026-12-02 07:00\n\nfull numbers\n")
    (tmp_path / "quick" / "screening_cost.md").write_text("# Quick table\n\nCommand: `... --quick` · 2026-12-02 08:00\n")
    statuses = {
        "full": {"screening_cost": {"status": "ok", "wall_s": 600.0, "finished": "2026-12-02 07:00"},
                 "_run_all_only": {"status": "ok", "wall_s": 600.0, "finished": "2026-12-02 07:00", "deadline_min": None,
                                   "only": ["screening_cost"]}},
        "quick": {"screening_cost": {"status": "timed out after 8.0 min", "wall_s": 480.0,
                                     "finished": "2026-12-02 07:30"},
                  "_run_all": {"status": "ok", "wall_s": 1700.0, "finished": "2026-12-02 07:58", "deadline_min": 30.0,
                               "only": None}},
    }
    text = run_all.readme(statuses)
    row = next(line for line in text.splitlines() if line.startswith("| [`screening_cost.py`]"))
    assert "full: ok, 10.0 min, 2026-12-02 07:00" in row
    # the quick file was written after run_all's quick run: the README says so instead of claiming it
    assert "quick: timed out after 8.0 min, 8.0 min, 2026-12-02 07:30; results file from a later run on its own: " \
           "2026-12-02 08:00" in row
    assert "not run by run_all" in next(line for line in text.splitlines() if line.startswith("| [`strategies.py`]"))
    # a run that stopped early left the file of an earlier run: the README says so
    statuses["quick"]["screening_cost"]["finished"] = "2026-12-02 09:00"
    row = next(line for line in run_all.readme(statuses).splitlines() if line.startswith("| [`screening_cost.py`]"))
    assert "2026-12-02 09:00; results file from an earlier run: 2026-12-02 08:00" in row
    assert "`python benchmarks/run_all.py --only screening_cost`: finished 2026-12-02 07:00" in text
    assert "`python benchmarks/run_all.py --quick`: finished 2026-12-02 07:58, 28.3 min in all (deadline 30 min)" in text
    # a run of a few scripts is shown as such, never as a run of them all
    row = next(line for line in text.splitlines() if line.startswith("| [`run_all.py`]"))
    assert "full: never run whole" in row and "quick: 28.3 min, 2026-12-02 07:58" in row
    assert "full numbers" in text.split("## Latest --quick results")[0]  # full tables pasted, quick ones linked
    assert "| screening_cost | [quick/screening_cost.md](../results/benchmarks/quick/screening_cost.md) | " \
           "2026-12-02 08:00 |" in text


def test_an_interrupted_run_of_every_script_resumes_where_it_stopped(monkeypatch, capsys):
    names = [name for name, *_ in run_all.SCRIPTS[:3]]
    ran, interrupt_at, fail_at = [], {names[2]}, {names[1]}

    def fake_run(name, args, cap_s):
        if name in interrupt_at:
            raise KeyboardInterrupt
        ran.append(name)
        return {"script": name, "status": "failed (exit 1)" if name in fail_at else "ok", "wall_s": 60.0,
                "finished": "2026-12-06 05:00"}

    monkeypatch.setattr(run_all, "SCRIPTS", run_all.SCRIPTS[:3])
    monkeypatch.setattr(run_all, "run_script", fake_run)
    statuses, saved = {}, []

    def args(resume=False, only=None):
        return argparse.Namespace(quick=False, only=only, deadline_min=None, resume=resume)

    def save():
        saved.append(json.loads(json.dumps(statuses)))  # the status file as written at that moment

    with pytest.raises(KeyboardInterrupt):
        run_all.run_scripts(args(), statuses, save)
    assert saved[-1][run_all.IN_PROGRESS]["done"] == [names[0]]  # the failed one is not done: --resume reruns it
    assert "_run_all" not in saved[-1]
    assert f"{names[0]} done, {names[1]} failed; add `--resume`" in run_all.readme({"full": saved[-1]})

    with pytest.raises(SystemExit):  # --resume continues a run of every script, not of a few
        run_all.run_scripts(args(resume=True, only=[names[1]]), statuses, save)
    run_all.run_scripts(args(only=[names[0]]), statuses, save)  # a run of one script in between ...
    assert statuses[run_all.IN_PROGRESS]["done"] == [names[0]]  # ... leaves the unfinished run as it was
    ran.clear()
    interrupt_at.clear()
    fail_at.clear()
    record = run_all.run_scripts(args(resume=True), statuses, save)
    assert ran == names[1:]  # only what the interrupted run had not finished
    assert record is statuses["_run_all"]
    assert record["sittings"] == 2 and run_all.IN_PROGRESS not in statuses
    assert "in 2 sittings (continued with --resume)" in run_all.readme({"full": statuses})

    with pytest.raises(SystemExit) as stopped:  # nothing left to continue
        run_all.run_scripts(args(resume=True), statuses, save)
    assert stopped.value.code == 2 and "no interrupted run" in capsys.readouterr().err


def test_a_deadline_skips_what_would_not_fit_and_leaves_the_run_to_resume():
    names = [name for name, *_ in run_all.SCRIPTS[:3]]
    ran = []

    def fake_run(name, args, cap_s):
        ran.append(name)
        return {"script": name, "status": "ok", "wall_s": 60.0, "finished": "2026-12-06 06:00"}

    statuses = {names[0]: {"status": "ok", "wall_s": 60.0},  # fits in 3 minutes
                names[1]: {"status": "ok", "wall_s": 600.0}}  # does not; names[2] has no run: its cap (> 3 min) counts
    args = argparse.Namespace(quick=False, only=None, deadline_min=3.0, resume=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_all, "SCRIPTS", run_all.SCRIPTS[:3])
        patch.setattr(run_all, "run_script", fake_run)
        assert run_all.run_scripts(args, statuses, save=lambda: None) is None  # not finished: nothing recorded as a run
        assert ran == names[:1] and statuses[run_all.IN_PROGRESS]["done"] == names[:1]
        assert statuses[names[1]]["status"].startswith("skipped: deadline reached (needs ~10 min")
        assert "_run_all" not in statuses
        args.deadline_min, args.resume = 3.0, True  # the next sitting: the skip kept what names[1] needs
        assert run_all.run_scripts(args, statuses, save=lambda: None) is None and ran == names[:1]
        args.deadline_min = None
        record = run_all.run_scripts(args, statuses, save=lambda: None)
    assert ran == names and record["sittings"] == 3 and run_all.IN_PROGRESS not in statuses
    assert run_all.expected_s({"status": "failed (exit 1)", "wall_s": 5.0}, cap_s=99.0) == 99.0
    skipped_under_an_older_cap = {"status": "skipped: deadline reached", "wall_s": 0.0, "expected_s": 7200.0}
    assert run_all.expected_s(skipped_under_an_older_cap, cap_s=5400.0) == 5400.0  # it is killed at the cap


def test_a_script_the_deadline_stopped_is_left_to_resume(monkeypatch):
    name = run_all.SCRIPTS[0][0]
    monkeypatch.setattr(run_all, "SCRIPTS", run_all.SCRIPTS[:1])
    monkeypatch.setattr(run_all, "run_script", lambda name, args, cap_s: {
        "script": name, "status": f"timed out after {cap_s / 60:.1f} min", "wall_s": cap_s, "finished": "2026-12-06 08:11"})
    statuses = {name: {"status": "ok", "wall_s": 60.0}}  # fits, by its last run, but runs past the deadline this time
    args = argparse.Namespace(quick=False, only=None, deadline_min=3.0, resume=False)
    assert run_all.run_scripts(args, statuses, save=lambda: None) is None  # the run stays open ...
    assert statuses[run_all.IN_PROGRESS]["done"] == []  # ... and --resume runs it again,
    ran_s = statuses[name]["wall_s"]  # scheduled by what it ran (more than its last run), not by its time cap
    assert ran_s > 60 and run_all.expected_s(statuses[name], cap_s=3600) == ran_s
    assert statuses[run_all.IN_PROGRESS]["failed"] == []  # the deadline stopped it: not a failure
    args.deadline_min = None  # stopped by its own time cap instead: a failure, and the run stays open for --resume
    assert run_all.run_scripts(args, statuses, save=lambda: None) is None
    assert statuses[name]["status"].startswith("timed out") and statuses[run_all.IN_PROGRESS]["failed"] == [name]


def test_a_run_with_a_failed_script_stays_open_and_resume_reruns_only_that_one(monkeypatch):
    names = [name for name, *_ in run_all.SCRIPTS[:3]]
    ran, fail_at = [], {names[1]}

    def fake_run(name, args, cap_s):
        ran.append(name)
        return {"script": name, "status": "failed (exit 1)" if name in fail_at else "ok", "wall_s": 60.0,
                "finished": "2026-12-07 05:00"}

    monkeypatch.setattr(run_all, "SCRIPTS", run_all.SCRIPTS[:3])
    monkeypatch.setattr(run_all, "run_script", fake_run)
    statuses = {}
    args = argparse.Namespace(quick=False, only=None, deadline_min=None, resume=False)
    assert run_all.run_scripts(args, statuses, save=lambda: None) is None  # never recorded as a finished run
    assert ran == names and "_run_all" not in statuses
    assert statuses[run_all.IN_PROGRESS]["failed"] == [names[1]]
    assert f"{names[0]}, {names[2]} done, {names[1]} failed; add `--resume`" in run_all.readme({"full": statuses})
    ran.clear()
    fail_at.clear()
    args.resume = True
    record = run_all.run_scripts(args, statuses, save=lambda: None)
    assert ran == [names[1]] and record["status"] == "ok" and record["failed"] == []

    fail_at.add(names[0])  # a run of a few scripts records its failures
    only = argparse.Namespace(quick=False, only=[names[0]], deadline_min=None, resume=False)
    record = run_all.run_scripts(only, statuses, save=lambda: None)
    assert record["status"] == f"failed: {names[0]}" and f"failed: {names[0]}." in run_all.readme({"full": statuses})


def test_only_refuses_a_script_name_that_does_not_exist(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "screening_costs"])
    with pytest.raises(SystemExit) as stopped:
        run_all.parse_args()
    assert stopped.value.code == 2 and "invalid choice: 'screening_costs'" in capsys.readouterr().err


def test_worked_example_trains_as_many_jobs_as_search_quality_full_mode():
    from search_quality import full_trainings

    j = full_trainings()  # 36: 3 search arms × k = 3 + 3 baselines, over 3 seeds
    text = "\n".join(run_all.scaling_model())  # from the stored screening_cost.csv and orchestration_overhead.csv
    assert f"Worked example: J = {j} quickstart-sized jobs" in text and "J = 27" not in text
    assert f"Beyond {j} slots nothing improves" in text
    rows = [line for line in text.split("| slots (nodes × g) |")[1].splitlines() if line.startswith("| ")]
    one, every = rows[0].split(" | "), next(r for r in rows if r.startswith(f"| {j} |")).split(" | ")
    assert float(one[1].removesuffix(" min")) == pytest.approx(j * float(every[1].removesuffix(" min")), rel=0.02)
