"""benchmarks/reproducibility.py and the plain loop it trains with: `max_steps`, the trained weights, the comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common as C  # noqa: E402
import reproducibility  # noqa: E402

from orchestrator.allocation import uniform  # noqa: E402
from orchestrator.data import TaskData  # noqa: E402


def test_plain_loop_stops_at_max_steps_and_the_same_seed_gives_the_same_bits(tiny_model_dir, tiny_split, tiny_modules):
    task = TaskData("tiny", ["a", "b"], tiny_split, tiny_split)
    allocation = uniform(tiny_modules, ("query", "value"), 2)
    runs = [C.plain_train(task, allocation, model_name=str(tiny_model_dir), max_length=16, batch_size=8, lr=1e-2,
                          evaluate_every_epoch=False, max_steps=steps, seed=seed) for steps, seed in ((3, 0), (3, 0), (8, 0), (3, 1))]
    first, again, whole_epoch, other_seed = (run.trained for run in runs)
    assert runs[0].steps_per_epoch == 8 and set(first) == set(again) and any("lora_" in name for name in first)
    assert all(torch.equal(first[name], again[name]) for name in first)  # same seed, same process: bit for bit
    assert not all(torch.equal(first[name], whole_epoch[name]) for name in first)  # 3 steps are not 8
    assert not all(torch.equal(first[name], other_seed[name]) for name in first)


def test_setting_names():
    assert reproducibility.setting_name({}, 1) == "as installed"
    assert reproducibility.setting_name({}, 2) == "2 threads"
    assert reproducibility.setting_name(reproducibility.PINNED, 1) == "MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2"


def test_each_training_is_compared_with_the_first_bit_for_bit_and_by_its_largest_difference(tmp_path):
    weights = [tmp_path / f"{i}.safetensors" for i in range(3)]
    base = {"lora_A": torch.arange(4.0).reshape(2, 2), "head": torch.ones(3)}
    for path, delta in zip(weights, (0.0, 0.0, 0.25)):
        save_file({name: t + delta * (name == "head") for name, t in base.items()}, str(path))
    rows = [{"setting": "as installed", "sha256": "aa"}, {"setting": "as installed", "sha256": "aa"},
            {"setting": "MKL_CBWR=AVX2", "sha256": "bb"}]
    table = reproducibility.compare(rows, weights)
    assert table.identical.tolist() == [True, True, False]
    assert table.max_abs_diff.tolist()[:2] == [0.0, 0.0] and table.max_abs_diff[2] == 0.25
    line = reproducibility.verdict(table)
    assert "as installed: **bit-identical**" in line and "differ from the first run's: MKL_CBWR=AVX2." in line


def test_the_verdict_says_when_the_same_setting_does_not_repeat():
    pinned = reproducibility.setting_name(reproducibility.PINNED, 1)
    table = pd.DataFrame({"setting": ["as installed", "as installed", pinned, pinned], "sha256": ["a", "b", "c", "c"],
                          "identical": [True, False, False, False]})
    line = reproducibility.verdict(table)
    assert "as installed: **NOT bit-identical**" in line and "Pinned twice: **bit-identical**" in line


def test_an_unknown_label_stops_before_any_training_in_one_line(capsys):
    args = reproducibility.parse_args(["--quick", "--label", "q+v r9"])
    with pytest.raises(SystemExit) as stopped:
        reproducibility.check_label(args)
    assert stopped.value.code == 2
    assert "--label: 'q+v r9' is not a label of benchmarks/exhaustive.small_space; pick from" in capsys.readouterr().err
    reproducibility.check_label(reproducibility.parse_args(["--label", "q+v r1"]))  # a known one passes
