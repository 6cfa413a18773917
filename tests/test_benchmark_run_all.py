"""benchmarks/run_all.py and the results folders: --quick tables never replace the full ones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
