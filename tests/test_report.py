"""Report: golden values of build / aggregate / summary_lines on synthetic trials, atomic writes, files, load."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import report
from orchestrator.errors import UserError

Q0 = "bert.encoder.layer.0.attention.self.query"
V1 = "bert.encoder.layer.1.attention.self.value"
K0 = "bert.encoder.layer.0.attention.self.key"
MAJORITY = 0.55


KERNELS = "cpu AMD EPYC, AVX2 kernels, MKL_CBWR=auto, 1 threads"  # as train.kernels writes it


def trial(cid, kind, label, seed, acc, f1, params, wall, device_hours, cost, memory, ranks) -> dict:
    """A trial row as train.keep_result writes it (trials/<job>.json)."""
    return dict(candidate_id=cid, kind=kind, label=label, ranks=ranks, seed=seed, accuracy=acc, f1=f1,
                eval_loss=round(1 - acc, 2), latency_ms_per_batch=2.0, epoch=1, train_loss=0.5, train_wall_s=wall,
                peak_memory_mb=memory, trainable_params=params, head_params=66, device="cpu", kernels=KERNELS,
                resumed_from_epoch=0,
                history=[{"epoch": 1, "accuracy": acc}], status="completed", adapter_dir=f"adapters/{cid}",
                device_hours=device_hours, cost_usd=cost)


def make_trials() -> list[dict]:
    # two searched candidates × 2 seeds, one baseline × 1 seed; a2's seed 1 is below the majority rate
    return [
        trial("b1", "baseline", "uniform_qv", 0, 0.65, 0.60, 1024, 36.0, 0.010, 0.25, 305.0, {Q0: 8, V1: 8}),
        trial("a2", "searched", "screen#2", 1, 0.50, 0.45, 960, 18.0, 0.005, 0.125, 290.0, {K0: 15}),
        trial("a1", "searched", "screen#1", 0, 0.80, 0.75, 1024, 36.0, 0.010, 0.25, 300.0, {Q0: 8, V1: 8}),
        trial("a2", "searched", "screen#2", 0, 0.60, 0.55, 960, 18.0, 0.005, 0.125, 290.0, {K0: 15}),
        trial("a1", "searched", "screen#1", 1, 0.70, 0.65, 1024, 72.0, 0.020, 0.50, 310.0, {Q0: 8, V1: 8}),
    ]


SCORES = {"a1": {"grad_norm": 3.5, "params": 1024.0}, "a2": {"grad_norm": 1.25, "params": 960.0},
          "b1": {"grad_norm": 2.0, "params": 1024.0}}
COMPACT = {"a1": "L0.query:8,L1.value:8", "a2": "L0.key:15", "b1": "L0.query:8,L1.value:8"}


@pytest.fixture
def table() -> pd.DataFrame:
    return report.build(make_trials(), SCORES, COMPACT, MAJORITY)


def test_build_columns_and_order(table):
    assert table.columns[: len(report.CONTRACT_COLUMNS)].tolist() == report.CONTRACT_COLUMNS
    assert "ranks" not in table and "history" not in table
    assert {"proxy_grad_norm", "proxy_params", "beats_majority"} <= set(table.columns)
    # searched first (best accuracy first), then the baseline
    assert list(zip(table.candidate_id, table.seed)) == [("a1", 0), ("a1", 1), ("a2", 0), ("a2", 1), ("b1", 0)]
    assert table.kind.tolist() == ["searched"] * 4 + ["baseline"]
    assert len(table) == 5


def test_build_golden_values(table):
    assert table.accuracy.tolist() == [0.80, 0.70, 0.60, 0.50, 0.65]
    assert table.allocation.tolist() == ["L0.query:8,L1.value:8"] * 2 + ["L0.key:15"] * 2 + ["L0.query:8,L1.value:8"]
    assert table.trainable_params.tolist() == [1024, 1024, 960, 960, 1024]
    assert table.trainable_params.dtype.kind == "i"
    assert table.proxy_grad_norm.tolist() == [3.5, 3.5, 1.25, 1.25, 2.0]
    assert table.proxy_params.tolist() == [1024.0, 1024.0, 960.0, 960.0, 1024.0]
    assert table.beats_majority.tolist() == [True, True, True, False, True]
    assert table.cost_usd.tolist() == [0.25, 0.5, 0.125, 0.125, 0.25]


def test_build_derived_columns(table):
    assert table.num_adapted_modules.tolist() == [2, 2, 1, 1, 2]
    assert table.total_rank.tolist() == [16, 16, 15, 15, 16]
    assert table.adapters_per_type.tolist() == ["query:1,value:1"] * 2 + ["key:1"] * 2 + ["query:1,value:1"]
    gain = table.gain_vs_uniform_qv.tolist()  # 100 · (accuracy − 0.65); NaN on the baseline's own row
    assert gain[:4] == pytest.approx([15.0, 5.0, -5.0, -15.0]) and math.isnan(gain[4])
    assert table.roi_baseline.tolist() == ["uniform_qv"] * 5
    assert table.roi_per_usd.tolist()[:4] == pytest.approx([60.0, 10.0, -40.0, -120.0])  # gain / cost_usd
    assert table.roi_per_mparams.tolist()[:4] == pytest.approx([15 / 1024e-6, 5 / 1024e-6, -5 / 960e-6, -15 / 960e-6])
    assert table.params_pct_of_base.isna().all()
    with_base = report.build(make_trials(), SCORES, COMPACT, MAJORITY, base_params=102_400)
    assert with_base.params_pct_of_base.tolist() == pytest.approx([1.0, 1.0, 0.9375, 0.9375, 1.0])


def test_aggregate_golden_values(table):
    agg = report.aggregate(table)
    assert agg.candidate_id.tolist() == ["a1", "b1", "a2"]  # by mean accuracy
    assert agg.kind.tolist() == ["searched", "baseline", "searched"]
    assert agg.label.tolist() == ["screen#1", "uniform_qv", "screen#2"]
    assert agg.trainable_params.tolist() == [1024, 1024, 960]
    assert agg.accuracy.tolist() == pytest.approx([0.75, 0.65, 0.55])
    std = agg.accuracy_std.tolist()
    assert std[0] == pytest.approx(0.1 / math.sqrt(2)) and math.isnan(std[1]) and std[2] == pytest.approx(0.1 / math.sqrt(2))
    assert agg.f1.tolist() == pytest.approx([0.70, 0.60, 0.50])
    assert agg.seeds.tolist() == [2, 1, 2]
    assert agg.cost_usd.tolist() == pytest.approx([0.75, 0.25, 0.25])  # totals over seeds
    assert agg.device_hours.tolist() == pytest.approx([0.03, 0.01, 0.01])
    assert agg.cost_usd_mean.tolist() == pytest.approx([0.375, 0.25, 0.125])
    assert agg.peak_memory_mb.tolist() == pytest.approx([305.0, 305.0, 290.0])
    assert agg.proxy_grad_norm.tolist() == [3.5, 2.0, 1.25]
    gain = agg.gain_vs_uniform_qv.tolist()
    assert gain[0] == pytest.approx(10.0) and math.isnan(gain[1]) and gain[2] == pytest.approx(-10.0)
    assert agg.roi_per_usd[0] == pytest.approx(10.0 / 0.375)
    assert agg.p_vs_uniform_qv.isna().all()  # the baseline has one seed: no t-test
    # Pareto fronts: maximise accuracy, minimise the cost axis
    assert agg.pareto_trainable_params.tolist() == [True, False, True]
    assert agg.pareto_cost_usd.tolist() == [True, True, True]
    assert agg.pareto_peak_memory_mb.tolist() == [True, False, True]


def test_aggregate_welch_p_with_two_baseline_seeds():
    from scipy.stats import ttest_ind

    trials = make_trials() + [trial("b1", "baseline", "uniform_qv", 1, 0.61, 0.60, 1024, 36.0, 0.01, 0.25, 305.0,
                                    {Q0: 8, V1: 8})]
    agg = report.aggregate(report.build(trials, SCORES, COMPACT, MAJORITY)).set_index("candidate_id")
    expected = ttest_ind([0.80, 0.70], [0.65, 0.61], equal_var=False).pvalue
    assert agg.loc["a1", "p_vs_uniform_qv"] == pytest.approx(expected)
    assert math.isnan(agg.loc["b1", "p_vs_uniform_qv"])
    assert agg.loc["b1", "accuracy"] == pytest.approx(0.63)


def test_welch_p_of_samples_without_spread_is_honest_about_it():
    assert report.welch_p([0.78, 0.78], [0.78, 0.78]) == 1.0  # the same constant: no difference at all (scipy: NaN)
    assert math.isnan(report.welch_p([0.80, 0.80], [0.78, 0.78]))  # scipy's infinite t claimed p = 0 from 2 seeds
    assert 0 < report.welch_p([0.80, 0.80], [0.78, 0.76]) < 1  # one side with spread: an ordinary test


@pytest.mark.parametrize("accuracies, said", [
    ({"a1": [0.70, 0.70], "b1": [0.65, 0.65]}, "(Welch p undefined: no spread over seeds)"),
    ({"a1": [0.70, 0.70], "b1": [0.70, 0.70]}, "(Welch p = 1)"),
    ({"a1": [0.70, 0.70], "b1": [0.65]}, "(Welch p needs ≥ 2 seeds of both)"),
])
def test_the_roi_line_says_why_there_is_no_p_value(accuracies, said):
    model = {t["candidate_id"]: t for t in make_trials()}
    trials = [dict(model[cid], seed=seed, accuracy=accuracy) for cid, seeds in accuracies.items()
              for seed, accuracy in enumerate(seeds)]
    line = report.roi_lines(report.build(trials, SCORES, COMPACT, MAJORITY))[0]
    assert line.endswith(said), line  # "needs ≥ 2 seeds" was said of 2 seeds each without spread


def test_the_models_table_footnote_says_when_p_is_blank(table):
    footnote = next(text for kind, text in report._sections(table, MAJORITY, None, []) if kind == "p"
                    and text.startswith("Gains are in accuracy points"))
    assert ("p = Welch t-test over seeds (blank with < 2 seeds of either, and where neither model's accuracy varies "
            "over its seeds but the two differ: no spread, no test; 1 where both are the same constant)") in footnote


def test_summary_lines_golden(table):
    assert report.summary_lines(table, MAJORITY) == [
        "Majority-class accuracy (the floor): 0.5500",
        "Best searched: a1 accuracy 0.7500 with 1,024 LoRA params (L0.query:8,L1.value:8)",
        "Gain over uniform_qv (0.6500, 1,024 params): +10.00 points",
        "Training cost: 0.0500 device-hours, $1.2500",
        f"Trained on: {KERNELS}",
        "WARNING: 1 model(s) do not beat the majority class: a2",
    ]


def test_summary_lines_without_losers_or_baseline():
    trials = [t for t in make_trials() if t["kind"] == "searched"]
    lines = report.summary_lines(report.build(trials, SCORES, COMPACT, 0.4), 0.4)
    assert lines == ["Majority-class accuracy (the floor): 0.4000",
                     "Best searched: a1 accuracy 0.7500 with 1,024 LoRA params (L0.query:8,L1.value:8)",
                     "Training cost: 0.0400 device-hours, $1.0000",
                     f"Trained on: {KERNELS}"]


def test_summary_names_every_kernel_setup_and_none_for_trials_before_they_were_recorded():
    """A seed repeats bit for bit only on one kernel setup (README "Reproducibility"): a run resumed on another
    machine says so."""
    trials = make_trials()
    trials[0]["kernels"] = "cpu Intel Xeon, AVX512 kernels, MKL_CBWR=auto, 1 threads"
    lines = report.summary_lines(report.build(trials, SCORES, COMPACT, MAJORITY), MAJORITY)
    assert (f"Trained on 2 kernel setups (a seed's last bits may differ between them): {KERNELS}; "
            "cpu Intel Xeon, AVX512 kernels, MKL_CBWR=auto, 1 threads") in lines
    older = [{k: v for k, v in t.items() if k != "kernels"} for t in make_trials()]
    assert not [line for line in report.summary_lines(report.build(older, SCORES, COMPACT, MAJORITY), MAJORITY)
                if line.startswith("Trained on")]


def test_with_a_validation_split_the_best_model_is_chosen_on_it_not_on_the_eval_split(tmp_path):
    """a2 has the lower eval accuracy but the higher validation accuracy: it is the run's best searched model,
    in the summary, the report's tables, the terminal and the registry's default pick."""
    from rich.console import Console

    from orchestrator.registry import best_candidate

    validation = {"a1": 0.60, "a2": 0.70, "b1": 0.65}
    trials = [dict(t, val_accuracy=validation[t["candidate_id"]] + 0.01 * t["seed"],
                   history=[{"epoch": e, "accuracy": t["accuracy"], "val_accuracy": 0.5} for e in (1, 2)])
              for t in make_trials()]
    table = report.build(trials, SCORES, COMPACT, MAJORITY)
    assert report.selection_column(table) == "val_accuracy" and report.selection_column(report.build(
        make_trials(), SCORES, COMPACT, MAJORITY)) == "accuracy"
    agg = report.aggregate(table)
    assert agg.candidate_id.tolist() == ["a2", "b1", "a1"]
    assert agg.val_accuracy.tolist() == pytest.approx([0.705, 0.65, 0.605])
    assert "Best searched: a2 accuracy 0.5500 with 960 LoRA params (L0.key:15) (chosen on validation accuracy 0.7050)" \
        in report.summary_lines(table, MAJORITY)
    assert report.models_table(table)["validation %"].tolist()[0] == "70.50 ± 0.71"
    console = Console(record=True, width=160)
    report.print_summary(table, MAJORITY, console)
    assert "val %" in console.export_text()
    report.write(table, tmp_path, MAJORITY)
    assert (tmp_path / "learning_curves.png").stat().st_size > 5_000  # validation dashed beside eval
    (tmp_path / "run.json").write_text("{}")
    assert best_candidate(tmp_path)[0]["candidate_id"] == "a2"


def test_the_registrys_default_pick_is_the_reports_best_searched_model(tmp_path):
    """a1 has the best single seed (0.80) but a2 the best mean (0.70 vs 0.65): both pick a2."""
    from orchestrator.registry import best_candidate

    trials = [trial("a1", "searched", "screen#1", seed, acc, acc, 1024, 36.0, 0.01, 0.25, 300.0, {Q0: 8, V1: 8})
              for seed, acc in ((0, 0.80), (1, 0.50))]
    trials += [trial("a2", "searched", "screen#2", seed, 0.70, 0.70, 960, 18.0, 0.005, 0.125, 290.0, {K0: 15})
               for seed in (0, 1)]
    table = report.build(trials, SCORES, COMPACT, MAJORITY)
    report.write(table, tmp_path, MAJORITY)
    (tmp_path / "run.json").write_text("{}")
    assert report.aggregate(table).candidate_id[0] == "a2"
    assert best_candidate(tmp_path)[0]["candidate_id"] == "a2"


def test_a_tie_on_validation_accuracy_is_broken_by_validation_f1_never_by_the_eval_split():
    trials = [dict(t, val_accuracy=0.70, val_f1=0.60 if t["candidate_id"] == "a2" else 0.50) for t in make_trials()]
    table = report.build(trials, SCORES, COMPACT, MAJORITY)  # a1 is better on the eval split
    assert report.aggregate(table).candidate_id.tolist()[:2] == ["a2", "a1"]
    assert table.candidate_id.tolist()[:2] == ["a2", "a2"]


# ---------------------------------------------------------------- atomic writes


def disk_full(tmp: str) -> None:
    with open(tmp, "w") as handle:
        handle.write("half a rep")  # a partial temporary file...
    raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk fills up


def test_write_atomic_keeps_old_content_on_disk_full(tmp_path):
    path = tmp_path / "report.csv"
    path.write_text("old content")
    with pytest.raises(UserError) as err:
        report.write_atomic(path, disk_full)
    assert "No space left on device" in str(err.value) and "free disk space" in str(err.value)
    assert "\n" not in str(err.value)
    assert path.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]  # no temporary file left


def test_write_atomic_leaves_no_file_on_disk_full(tmp_path):
    path = tmp_path / "sub" / "report.md"
    with pytest.raises(UserError):
        report.write_atomic(path, disk_full)
    assert not path.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_write_atomic_other_errors_propagate_and_clean_up(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def broken(tmp: str) -> None:
        open(tmp, "w").write("partial")
        raise ValueError("bug in the writer")

    with pytest.raises(ValueError, match="bug in the writer"):
        report.write_atomic(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("parent", ["a-file", "a-file/sub"])
def test_write_atomic_into_a_file_is_a_user_error_naming_the_path(tmp_path, parent):
    """`compare --out FILE`, `registry quantise --out FILE`: the directory cannot be made; nothing is written."""
    (tmp_path / "a-file").write_text("mine")
    path = tmp_path / parent / "compare.csv"
    with pytest.raises(UserError) as err:
        report.write_atomic(path, lambda tmp: open(tmp, "w").write("new"))
    assert str(err.value).startswith(f"write: could not write '{path}': its directory '{path.parent}' cannot be made (")
    assert "; give an output directory that is not a file" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


def test_write_atomic_replaces(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    report.write_atomic(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_two_writers_of_one_file_each_write_a_whole_copy(tmp_path):
    """Two `lora-search report` at once (or one beside its run): with one shared temp name, one writer's rename took
    the other's file and the other failed, its content lost."""
    import threading
    from pathlib import Path

    path, started, errors = tmp_path / "report.md", threading.Barrier(2), []

    def write(text: str) -> None:
        def slowly(tmp: str) -> None:
            Path(tmp).write_text(text[:5])
            started.wait()  # both temp files exist before either is renamed
            Path(tmp).write_text(text)
        try:
            report.write_atomic(path, slowly)
        except UserError as err:
            errors.append(err)

    writers = [threading.Thread(target=write, args=(text * 100,)) for text in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == [] and path.read_text() in ("a" * 100, "b" * 100)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


# ---------------------------------------------------------------- files and load


def test_write_files_and_load_round_trip(table, tmp_path):
    written = report.write(table, tmp_path, MAJORITY)
    for name in ("report.parquet", "report.csv", "report.md", "accuracy_vs_params.png"):
        assert (tmp_path / name).is_file(), name
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 5_000 for p in pngs), [(p.name, p.stat().st_size) for p in pngs]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not list(tmp_path.glob(".*.tmp"))

    loaded = report.load(tmp_path)
    pd.testing.assert_frame_equal(loaded, written)
    assert loaded.candidate_id.tolist() == ["a1", "a1", "a2", "a2", "b1"]
    assert loaded.accuracy.tolist() == [0.80, 0.70, 0.60, 0.50, 0.65]

    csv = pd.read_csv(tmp_path / "report.csv")
    assert csv.columns[: len(report.CONTRACT_COLUMNS)].tolist() == report.CONTRACT_COLUMNS
    assert csv.accuracy.tolist() == [0.80, 0.70, 0.60, 0.50, 0.65]
    assert len(csv) == 5

    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Best searched: a1 accuracy 0.7500 with 1,024 LoRA params (L0.query:8,L1.value:8)" in md
    assert "accuracy_vs_params.png" in md


def test_load_missing_report(tmp_path):
    with pytest.raises(UserError, match="report.parquet' not found"):
        report.load(tmp_path)


def test_compare_a_corrupt_report_says_to_rebuild_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(UserError) as err:
        report.compare([tmp_path / "run"], tmp_path / "cmp")
    assert f"'{tmp_path / 'run' / 'report.parquet'}' cannot be read" in str(err.value)
    assert f"rebuild it with `lora-search report {tmp_path / 'run'}`" in str(err.value)
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------- known defects (see the test report)


def test_warning_names_each_losing_model_once():
    table = report.build(make_trials(), SCORES, COMPACT, 0.62)  # both seeds of a2 (0.60, 0.50) are below 0.62
    lines = report.summary_lines(table, 0.62)
    warning = [line for line in lines if line.startswith("WARNING")]
    assert warning == ["WARNING: 1 model(s) do not beat the majority class: a2"]


def test_failed_trial_does_not_corrupt_the_summary():
    failed = dict(candidate_id="b1", kind="baseline", label="uniform_qv", ranks={Q0: 8, V1: 8}, seed=0,
                  status="failed", error="OutOfMemoryError: ...")
    trials = [t for t in make_trials() if t["kind"] == "searched"] + [failed]
    lines = report.summary_lines(report.build(trials, SCORES, COMPACT, MAJORITY), MAJORITY)
    assert "Best searched: a1 accuracy 0.7500 with 1,024 LoRA params (L0.query:8,L1.value:8)" in lines
    assert not any("nan" in line for line in lines), lines


def test_the_other_stages_plots_leave_pyplot_alone(tmp_path):
    """calibrate's, validate's and compose's PNGs draw on Figure objects as the report's do: a notebook that runs
    them keeps its matplotlib backend (they used to switch the process to Agg) and is left no open figure."""
    import matplotlib
    import matplotlib.pyplot as plt

    from orchestrator import calibrate, compose, validate

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use("pdf")  # a backend the old code's matplotlib.use("Agg") would have replaced
    try:
        calibrate.plot(pd.DataFrame({"module_type": ["query", "value"], "accuracy": [0.6, 0.7]}), tmp_path / "c.png")
        validate.plot_grid(pd.DataFrame({"budget": ["9k"] * 3, "proxy_grad_norm": [1.0, 2.0, 3.0],
                                         "accuracy": [0.5, 0.6, 0.4]}), ["grad_norm"], tmp_path / "v.png")
        compose.plot(pd.DataFrame({"task": ["t"] * 2, "shots": [4] * 2, "method": ["zero_shot", "uniform"],
                                   "accuracy": [0.5, 0.6], "accuracy_std": [float("nan")] * 2}), tmp_path / "m.png")
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == figures
    finally:
        matplotlib.use(backend)
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("c.png", "v.png", "m.png"))


def test_replace_dir_atomically_swaps_in_the_whole_new_directory(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    report.replace_dir_atomically(target, lambda staged: (staged / "weights.bin").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staged or old directory left


@pytest.mark.parametrize("existed", [True, False])
def test_replace_dir_atomically_keeps_the_old_directory_when_the_writer_stops(tmp_path, existed):
    target = tmp_path / "adapter"
    if existed:
        target.mkdir()
        (target / "weights.bin").write_text("old")

    def half_written(staged):
        (staged / "weights.bin").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.replace_dir_atomically(target, half_written)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adapter"] if existed else [])
    assert not existed or (target / "weights.bin").read_text() == "old"


@pytest.mark.parametrize("kind", ["link", "file"])
def test_replace_dir_atomically_refuses_a_link_or_a_file_and_leaves_it(tmp_path, kind):
    """The swap would have moved the link itself aside (and left it there), not replaced what it points to."""
    target, real = tmp_path / "adapter", tmp_path / "real"
    real.mkdir()
    target.symlink_to(real) if kind == "link" else target.write_text("mine")
    with pytest.raises(NotADirectoryError):
        report.replace_dir_atomically(target, lambda staged: (staged / "weights.bin").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "real"]  # nothing staged or moved aside


@pytest.mark.parametrize("target", [".", ".."])
def test_replace_dir_atomically_refuses_the_current_directory_and_those_above_it(tmp_path, monkeypatch, target):
    """Swapped, the caller (and the user's shell) would sit in a deleted folder; "." was a ValueError that left a
    staging directory behind."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(IsADirectoryError):
        report.replace_dir_atomically(Path(target), lambda staged: (staged / "weights.bin").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any((tmp_path / "here").iterdir())
