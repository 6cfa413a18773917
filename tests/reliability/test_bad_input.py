"""Bad input to `lora-search run`: one line `error: <field>: <problem>; <fix>`, exit 2, no traceback, nothing written.

Every case runs the real CLI entry point (`orchestrator.cli.main`) in-process on a YAML file in tmp_path,
with `results_dir` inside tmp_path and Ray, screening, training and data downloads replaced by guards
(conftest `no_ray`): a case that gets past validation fails with RayStarted instead of doing real work.
The tiny random BERT of tests/conftest.py stands in for the model, so the cases that load one stay fast.

Known bugs are `xfail(strict=True, raises=...)` with the exact reason: the core assertions (exit code,
one line, the field, the fix) still have to pass for them; only the named bug may fail. When the bug is
fixed the case XPASSes, which fails the suite: drop its marker then.
"""

from __future__ import annotations

import copy
import errno
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml

from orchestrator.errors import UserError

from ._support import LeftBehind, assert_one_line_error, run_cli, snapshot, write_bomb

REPO = Path(__file__).resolve().parents[2]

GOOD_ROWS = [(f"{w} movie number {i}", i % 2) for i, w in enumerate(["good", "bad"] * 20)]


def _csv(rows, header=("text", "label")) -> str:
    return ",".join(header) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows)


@dataclass
class Space:
    """The case's sandbox: tmp_path with a good data file, the tiny model and a results directory."""

    root: Path
    tiny: Path
    marker: Path = field(init=False)

    def __post_init__(self):
        self.results = self.root / "results"
        self.data = self.write("data/good.csv", _csv(GOOD_ROWS))
        self.marker = self.root / "PWNED"

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def model_dir(self, rel: str, keep: tuple[str, ...]) -> Path:
        """A copy of the tiny model directory with only the files in `keep`."""
        target = self.root / rel
        target.mkdir(parents=True)
        for name in keep:
            shutil.copy(self.tiny / name, target / name)
        return target

    def subs(self) -> dict[str, str]:
        return {"results": str(self.results), "data": str(self.data), "tiny": str(self.tiny), "root": str(self.root)}


BASE = {"name": "bad", "results_dir": "$results", "model": {"name": "$tiny"}, "data": {"task": "$data"}}


@dataclass
class Case:
    id: str
    config: dict | str | bytes | None  # dict: merged into BASE; str/bytes: the YAML file as is; None: no file
    expect: tuple[str, ...]  # substrings of the error line: the field or file, and the fix
    overrides: tuple[str, ...] = ()
    setup: Callable[[Space], None] | None = None  # creates files the case needs ($-names in the config)
    resume: bool = False
    bug: tuple[type, str] | None = None  # (exception the known bug raises, reason)


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def substituted(value, subs: dict[str, str]):
    if isinstance(value, str):
        return Template(value).safe_substitute(subs)
    if isinstance(value, list):
        return [substituted(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: substituted(v, subs) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- data and model files of the cases


def _data(rel: str, content: str | bytes):
    def setup(space: Space) -> None:
        space.write(rel, content)
    return setup


def _eval_out_of_range(space: Space) -> None:
    space.write("data/eval.csv", _csv([("fine film", 0), ("odd film", 2), ("weird film", 5)]))


def _model(rel: str, keep: tuple[str, ...], extra: dict[str, str | bytes] | None = None, bomb: bool = False):
    def setup(space: Space) -> None:
        target = space.model_dir(rel, keep)
        for name, content in (extra or {}).items():
            space.write(f"{rel}/{name}", content)
        if bomb:  # a pickled checkpoint whose loading would run code: it must never be unpickled
            write_bomb(target / "pytorch_model.bin", space.marker)
    return setup


def _config_not_of_the_weights(space: Space) -> None:
    """The tiny model's weights under a config.json with wider intermediate layers: they would load random."""
    space.model_dir("m_mismatch", ("model.safetensors",) + TOKENIZER)
    config = json.loads((space.tiny / "config.json").read_text())
    space.write("m_mismatch/config.json", json.dumps(config | {"intermediate_size": 96}))


def _no_pooler(space: Space) -> None:
    """The tiny model's weights without bert.pooler.*, as a checkpoint saved from a masked-LM model has them."""
    from safetensors.torch import load_file, save_file

    target = space.model_dir("m_mlm", ("config.json",) + TOKENIZER)
    weights = load_file(space.tiny / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".pooler." not in k}, target / "model.safetensors")


def _existing_run(space: Space) -> None:
    space.write("results/bad/run.json", json.dumps({"created_at": "earlier", "task": {"majority_rate": 0.5}}))


def _run_with_another_recipe(space: Space) -> None:
    """run.json of the case's own config (BASE) as an earlier run recorded it, but trained at lr 0.01."""
    from orchestrator.config import load_config

    earlier = load_config(None, ["name=bad", f"results_dir={space.results}", f"model.name={space.tiny}",
                                 f"data.task={space.data}", "train.lr=0.01"])
    space.write("results/bad/run.json", json.dumps({"created_at": "earlier", "config": earlier.to_dict()}, default=str))


def _results_is_file(space: Space) -> None:
    space.write("results", "not a directory\n")


TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

CASES = [
    # ---- the config file itself
    Case("config_missing", None, ("config: file", "missing.yaml", "give the path of a YAML file")),
    Case("yaml_malformed", "name: demo\ntrain:\n  seeds: [0, 1\n  epochs: 2\n", ("not valid YAML at line", "fix the syntax")),
    Case("yaml_is_list", "- name: demo\n- train: {}\n", ("must hold a mapping of sections", "see search_spaces/quickstart.yaml")),
    Case("yaml_is_scalar", "just a sentence\n", ("must hold a mapping of sections", "quickstart.yaml")),
    Case("yaml_not_utf8", "name: caf\xe9\n".encode("latin-1"), ("not UTF-8", "re-encode it as UTF-8")),
    Case("yaml_duplicate_key", "name: demo\ntrain: {epochs: 3}\ntrain: {lr: 0.001}\n",
         ("not valid YAML at line 3 (key 'train' is given twice)", "fix the syntax")),
    Case("yaml_nested_too_deeply", "name: " + "[" * 3000 + "]" * 3000 + "\n", ("nests too deeply", "fix the syntax")),
    # ---- keys
    Case("unknown_top_key", {"trian": {"epochs": 2}}, ("trian: unknown key", "did you mean 'train'?")),
    Case("unknown_nested_key", {"train": {"epoch": 2}}, ("train.epoch: unknown key", "did you mean 'train.epochs'?")),
    Case("unknown_deep_key", {"space": {"budget": {"qv_rnak": 4}}},
         ("space.budget.qv_rnak: unknown key", "did you mean 'space.budget.qv_rank'?")),
    Case("unknown_key_no_near_match", {"train": {"zzzz": 1}}, ("train.zzzz: unknown key", "valid keys: epochs")),
    Case("section_is_scalar", {"train": 5}, ("train: expected a mapping", "write it as `key: value` lines")),
    # ---- types
    Case("str_for_int", {"train": {"epochs": "two"}}, ("train.epochs: expected int, got 'two'", "give an int")),
    Case("float_for_int", {"train": {"epochs": 1.5}}, ("train.epochs: expected int, got 1.5", "give an int")),
    Case("bool_for_int", {"screen": {"num_trials": True}}, ("screen.num_trials: expected int", "give an int")),
    Case("null_for_int", {"train": {"epochs": None}}, ("train.epochs: expected int, got None", "give an int")),
    Case("list_for_str", {"model": {"name": ["a", "b"]}}, ("model.name: expected str", "give a str")),
    Case("mapping_for_list", {"space": {"ranks": {"a": 1}}}, ("space.ranks: expected a list", "write it as [a, b, ...]")),
    Case("str_in_int_list", {"space": {"ranks": [1, "x"]}}, ("space.ranks[1]: expected int, got 'x'", "give an int")),
    Case("str_for_price", {"cost": {"price_per_device_hour": {"cpu": "cheap"}}},
         ("cost.price_per_device_hour.cpu: expected float", "give a float")),
    # ---- budget
    Case("budget_negative", {"space": {"budget": {"params": -5, "qv_rank": None}}},
         ("space.budget.params: -5 is not positive", "use a positive count")),
    Case("budget_zero", {"space": {"budget": {"qv_rank": 0}}}, ("space.budget.qv_rank: 0 is not positive", "use e.g. 8")),
    Case("budget_both_set", {"space": {"budget": {"params": 9216, "qv_rank": 8}}},
         ("space.budget: set exactly one of params and qv_rank", "qv_rank: null")),
    Case("budget_tolerance_1.5", {"space": {"budget": {"tolerance": 1.5}}}, ("space.budget.tolerance", "use e.g. 0.05")),
    Case("budget_huge", {"space": {"budget": {"params": 10**12, "qv_rank": None}}},
         ("space.budget: 1000000000000 params cannot be met", "change the budget, tolerance, ranks or module_types")),
    Case("budget_tiny", {"space": {"budget": {"params": 1, "qv_rank": None}}},
         ("space.budget: 1 params cannot be met", "change the budget")),
    # every tiny-model module costs a multiple of 32 params per rank: 97 ± 0 is inside [min, max] but unreachable
    Case("budget_unreachable_band", {"space": {"budget": {"params": 97, "qv_rank": None, "tolerance": 0.0}}},
         ("space.budget: 97 params cannot be met", "in steps of 32")),
    # ---- space
    Case("ranks_exceed_dim_minilm", {"model": {"name": "minilm-l6"}, "space": {"ranks": [1000]}},
         ("space.ranks: [1000] exceed 384, the smallest dimension", "use ranks ≤ 384")),
    Case("ranks_exceed_dim_tiny", {"space": {"ranks": [4, 64]}},
         ("space.ranks: [64] exceed 32, the smallest dimension", "use ranks ≤ 32")),
    Case("ranks_zero", {"space": {"ranks": [0, 2]}}, ("space.ranks", "e.g. [1, 2, 4, 8]")),
    Case("ranks_empty", {"space": {"ranks": []}}, ("space.ranks", "e.g. [1, 2, 4, 8]")),
    Case("layers_beyond_model", {"space": {"layers": [0, 99]}},
         ("space.layers: layers [99] do not exist", "this model has layers 0..1")),
    Case("layers_negative", {"space": {"layers": [-1]}}, ("space.layers", "use indices from 0")),
    Case("module_types_empty", {"space": {"module_types": []}}, ("space.module_types", "choose from ['query'")),
    Case("module_type_unknown", {"space": {"module_types": ["query", "attn"]}},
         ("space.module_types: unknown or empty ['attn']", "choose from")),
    # ---- data
    Case("data_missing_file", {"data": {"task": "$root/data/nope.csv"}}, ("data: file", "nope.csv' not found", "give a CSV")),
    Case("data_builtin_typo", {"data": {"task": "rotten_tomatos"}},
         ("rotten_tomatos' not found", "did you mean the built-in task 'rotten_tomatoes'?")),
    Case("data_empty_file", {"data": {"task": "$root/data/empty.csv"}}, ("empty.csv' could not be parsed", "check the file"),
         setup=_data("data/empty.csv", "")),
    Case("data_header_only", {"data": {"task": "$root/data/header.csv"}}, ("header.csv' has no rows", "add labelled examples"),
         setup=_data("data/header.csv", "text,label\n")),
    Case("data_label_past_every_row", {"data": {"task": "$root/data/huge.csv"}},
         ("huge.csv' has integer label 1000000000 but only 40 labelled rows", "renumber them, or use names that are not plain numbers"),
         setup=_data("data/huge.csv", _csv([(t, lab * 10**9) for t, lab in GOOD_ROWS]))),
    Case("eval_path_of_a_builtin_task", {"data": {"task": "rotten_tomatoes", "eval_path": "$root/none.csv"}},
         ("data.eval_path: the built-in task rotten_tomatoes has its own eval split", "drop eval_path")),
    Case("data_one_class", {"data": {"task": "$root/data/one.csv"}}, ("data.task", "single class", "add examples of another label"),
         setup=_data("data/one.csv", _csv([(f"good film {i}", 1) for i in range(30)]))),
    Case("data_missing_text_column", {"data": {"task": "$root/data/cols.csv"}},
         ("cols.csv' lacks column(s)", "'sentence'", "give `text`,`label`"),
         setup=_data("data/cols.csv", _csv(GOOD_ROWS, header=("sentence", "label")))),
    Case("data_missing_label_column", {"data": {"task": "$root/data/nolabel.csv"}},
         ("nolabel.csv' lacks column(s) ['label']", "give `text`,`label`"),
         setup=_data("data/nolabel.csv", _csv(GOOD_ROWS, header=("text", "y")))),
    Case("data_not_utf8_csv", {"data": {"task": "$root/data/latin.csv"}}, ("latin.csv' is not UTF-8", "re-encode it as UTF-8"),
         setup=_data("data/latin.csv", _csv([("caf\xe9 cr\xe8me", i % 2) for i in range(20)]).encode("latin-1"))),
    Case("data_not_utf8_jsonl", {"data": {"task": "$root/data/latin.jsonl"}}, ("latin.jsonl'", "UTF-8"),
         setup=_data("data/latin.jsonl", b'{"text": "caf\xe9", "label": 0}\n{"text": "ok", "label": 1}\n')),
    Case("data_malformed_jsonl", {"data": {"task": "$root/data/broken.jsonl"}}, ("broken.jsonl' could not be parsed", "check"),
         setup=_data("data/broken.jsonl", '{"text": "a", "label": 0}\n{"text": \n')),
    Case("data_corrupt_parquet", {"data": {"task": "$root/data/bad.parquet"}}, ("bad.parquet' could not be parsed", "check"),
         setup=_data("data/bad.parquet", b"PAR1 this is not parquet")),
    Case("data_unknown_extension", {"data": {"task": "$root/data/notes.txt"}}, ("unknown extension '.txt'", "use .csv"),
         setup=_data("data/notes.txt", _csv(GOOD_ROWS))),
    Case("data_negative_label", {"data": {"task": "$root/data/neg.csv"}}, ("negative label -1", "0..K-1"),
         setup=_data("data/neg.csv", _csv([(f"film {i}", i % 2 - 1) for i in range(30)]))),
    Case("eval_labels_out_of_range", {"data": {"eval_path": "$root/data/eval.csv"}},
         ("eval.csv' has labels ['2', '5'] outside ['0', '1']", "make both files use the same labels"),
         setup=_eval_out_of_range),
    Case("eval_fraction_1.5", {"data": {"eval_fraction": 1.5}}, ("data.eval_fraction: 1.5 is not in (0, 1)", "use e.g. 0.2")),
    Case("train_size_too_small", {"data": {"train_size": 4}}, ("data.train_size", "use at least 8")),
    # ---- model
    Case("model_missing_dir", {"model": {"name": "$root/nowhere"}}, ("model.name", "neither a packaged model", "give a local")),
    Case("model_config_only", {"model": {"name": "$root/m_config"}}, ("model.name", "no *.safetensors weights", "convert"),
         setup=_model("m_config", ("config.json",) + TOKENIZER)),
    Case("model_pickle_bin_only", {"model": {"name": "$root/m_pickle"}}, ("no *.safetensors weights", "pickled .bin files are refused"),
         setup=_model("m_pickle", ("config.json",) + TOKENIZER, bomb=True)),
    Case("model_no_config", {"model": {"name": "$root/m_noconf"}}, ("model.name", "no config.json", "point it at"),
         setup=_model("m_noconf", ("model.safetensors",) + TOKENIZER)),
    Case("model_no_tokenizer", {"model": {"name": "$root/m_notok"}}, ("model.name", "has no tokenizer", "save the model's tokenizer"),
         setup=_model("m_notok", ("config.json", "model.safetensors"))),
    Case("model_config_not_json", {"model": {"name": "$root/m_badjson"}}, ("model.name", "could not be loaded", "check config.json"),
         setup=_model("m_badjson", ("model.safetensors",) + TOKENIZER, {"config.json": "{not json"})),
    Case("model_corrupt_safetensors", {"model": {"name": "$root/m_corrupt"}}, ("could not be loaded", "save the model again"),
         setup=_model("m_corrupt", ("config.json",) + TOKENIZER, {"model.safetensors": b"garbage" * 64})),
    Case("model_config_not_of_the_weights", {"model": {"name": "$root/m_mismatch"}},
         ("model.name", "weight(s) missing from its *.safetensors or of another shape than its config.json says",
          "use the config.json saved with these weights"), setup=_config_not_of_the_weights),
    Case("model_without_pooler", {"model": {"name": "$root/m_mlm"}},
         ("model.name", "has no pooler weights", "save it once with a pooler"), setup=_no_pooler),
    Case("max_length_too_small", {"model": {"max_length": 4}}, ("model.max_length: 4 is out of range", "use 8..4096")),
    # ---- run names and the run directory
    Case("name_traversal", {"name": "../x"}, ("name: '../x' is not a safe run name", "no slashes")),
    Case("name_slash", {"name": "a/b"}, ("name: 'a/b' is not a safe run name", "no slashes")),
    Case("name_hidden", {"name": ".hidden"}, ("name: '.hidden'", "start with a letter or digit")),
    Case("name_absolute", {"name": "/tmp/evil"}, ("name: '/tmp/evil'", "no slashes")),
    Case("name_dotdot_inside", {"name": "a..b"}, ("name: 'a..b'", "no '..'")),
    Case("name_trailing_newline", {"name": "run\n"}, ("name: 'run\\n' is not a safe run name", "letters, digits")),
    Case("name_override_traversal", {}, ("name: '../../etc' is not a safe run name", "no slashes"), overrides=("name=../../etc",)),
    Case("run_exists_without_resume", {}, ("name: run directory", "already exists", "pass --resume"), setup=_existing_run),
    Case("resume_missing_run", {}, ("--resume:", "holds no run to resume", "drop --resume"), resume=True),
    Case("resume_with_another_recipe", {}, ("--resume: train.lr is", "but 0.01 in the run being resumed",
                                            "resume with its config, or start a new run"), setup=_run_with_another_recipe, resume=True),
    Case("results_dir_is_file", {}, ("results_dir:", "exists and is not a directory", "point results_dir at a directory"),
         setup=_results_is_file),
    Case("results_dir_below_a_file", {"results_dir": "$results/sub"}, ("results_dir:", "lies below the file",
                                                                       "point results_dir at a directory"), setup=_results_is_file),
    Case("run_exists_with_a_new_study_storage", {"screen": {"storage": "sqlite:///$root/new-study.db"}},
         ("name: run directory", "already exists", "pass --resume"), setup=_existing_run),  # and no study file made
    Case("journal_path_is_a_directory", {"screen": {"storage": "journal:$root/data"}},
         ("screen.storage: journal path", "is a directory", "give a file in it")),
    Case("max_length_beyond_the_model", {"model": {"max_length": 1024}},
         ("model.max_length: 1024 is more tokens than the model's 128 positions", "use at most 128")),
    # ---- overrides
    Case("override_without_equals", {}, ("override 'train.epochs': expected key.sub=value", "e.g. train.epochs=2"),
         overrides=("train.epochs",)),
    Case("override_empty_key", {}, ("override '=3'", "expected key.sub=value"), overrides=("=3",)),
    Case("override_into_scalar", {"train": {"epochs": 1}}, ("override 'train.epochs.x=1': 'epochs' is not a section",
                                                           "check the key path"), overrides=("train.epochs.x=1",)),
    Case("override_into_default_scalar", {}, ("train.epochs: expected int, got the section {'x': '1'}", "no sub-keys"),
         overrides=("train.epochs.x=1",)),
    Case("override_unknown_key", {}, ("train.epoch: unknown key", "did you mean 'train.epochs'?"), overrides=("train.epoch=2",)),
    Case("override_bad_type", {}, ("train.epochs: expected int, got 'two'", "give an int"), overrides=("train.epochs=two",)),
    Case("override_not_yaml", {}, ("train.seeds: '[0,1' is not a YAML value", "a list as [0, 1]"),
         overrides=("train.seeds=[0,1",)),
    Case("override_yaml_tag", {}, ("train.epochs: '!!python/tuple [1]' is not a YAML value", "quote text"),
         overrides=("train.epochs=!!python/tuple [1]",)),
    # ---- screen
    Case("calibrated_with_one_module_type", {"screen": {"rank_by": "calibrated"}, "space": {"module_types": ["query"]}},
         ("screen.rank_by: calibrated compares module types", "1 of space.module_types do (query)", "add module types")),
    Case("rank_by_not_in_proxies", {"screen": {"proxies": ["params"], "rank_by": "grad_norm"}},
         ("screen.rank_by: 'grad_norm' is not in screen.proxies", "add it to screen.proxies")),
    Case("proxy_unknown", {"screen": {"proxies": ["grad_norm", "gard_norm"]}},
         ("screen.proxies: unknown proxy ['gard_norm']", "choose from [", "'grad_norm'")),
    Case("sampler_unknown", {"screen": {"sampler": "bayes"}}, ("screen.sampler: 'bayes' is unknown", "use one of tpe")),
    Case("direction_typo", {"screen": {"direction": "maximise"}}, ("screen.direction: 'maximise'", "use maximize or minimize")),
    Case("survivors_zero", {"screen": {"survivors": 0}}, ("screen.survivors: 0 is not positive", "use 1 or more")),
    Case("calibrated_minimised", {"screen": {"rank_by": "calibrated", "direction": "minimize"}},
         ("screen.direction: 'minimize' with rank_by 'calibrated'", "use maximize")),
    Case("calibrated_as_a_proxy", {"screen": {"proxies": ["grad_norm", "calibrated"]}},
         ("screen.proxies: 'calibrated' is measured by training", "set screen.rank_by: calibrated")),
    Case("calibrate_sample_too_small", {"screen": {"rank_by": "calibrated"}, "calibrate": {"train_size": 2}},
         ("calibrate.train_size: 2 is too small", "use at least 8")),
    Case("storage_not_a_url", {"screen": {"storage": "my study db"}},
         ("screen.storage: 'my study db' is not a SQLAlchemy URL", "sqlite:///")),
    Case("storage_path_scheme", {"storage_path": "ftp://host/runs"},
         ("storage_path: 'ftp://' is not a storage Ray can use", "use s3://bucket/prefix")),
    Case("storage_path_credentials", {"storage_path": "s3://AKIA:secret@bucket/runs"},
         ("storage_path: the URI holds credentials", "AWS_ACCESS_KEY_ID")),
    Case("storage_path_no_bucket", {"storage_path": "gs:///runs"}, ("storage_path: 'gs:///runs' names no bucket", "gs://my-bucket")),
    # ---- train and cost
    Case("seeds_empty", {"train": {"seeds": []}}, ("train.seeds: is empty", "give at least one seed")),
    Case("lr_zero", {"train": {"lr": 0}}, ("train.lr: 0.0 is out of range", "use e.g. 2e-3")),
    Case("baseline_unknown", {"train": {"baselines": ["lora_all"]}}, ("train.baselines: unknown ['lora_all']", "choose from")),
    Case("use_gpu_unknown", {"train": {"use_gpu": "maybe"}}, ("train.use_gpu: 'maybe' is unknown", "use auto, true or false")),
    Case("price_negative", {"cost": {"price_per_device_hour": {"gpu": -1}}},
         ("cost.price_per_device_hour.gpu", "give USD per device-hour")),
]


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, raises=case.bug[0], reason=case.bug[1])] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


def test_table_is_complete():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert all(len(case.expect) >= 2 for case in CASES), "every case checks the field/file and the fix"


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_is_refused_in_one_line(case: Case, tmp_path, tiny_model_dir, no_ray, capsys, monkeypatch):
    space = Space(tmp_path, Path(tiny_model_dir))
    if case.setup:
        case.setup(space)
    config = tmp_path / "bad.yaml"
    if isinstance(case.config, dict):
        config.write_text(yaml.safe_dump(substituted(merged(BASE, case.config), space.subs())), encoding="utf-8")
    elif isinstance(case.config, str):
        config.write_text(Template(case.config).safe_substitute(space.subs()), encoding="utf-8")
    elif isinstance(case.config, bytes):
        config.write_bytes(case.config)
    else:
        config = tmp_path / "missing.yaml"
    before = snapshot(tmp_path)

    code, out, err = run_cli(["run", config, *case.overrides, *(["--resume"] if case.resume else [])], capsys, monkeypatch)

    assert_one_line_error(code, out, err, *case.expect)
    assert not space.marker.exists(), "a pickled file was unpickled"
    after = snapshot(tmp_path)
    if after != before:
        new = sorted(set(after) - set(before))
        changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
        raise LeftBehind(f"refused run left {new} new and {changed} changed paths under tmp_path")


@pytest.mark.parametrize("max_length, refused", [(512, False), (513, True), (514, True)])
def test_max_length_counts_the_positions_roberta_reserves(max_length, refused):
    """RoBERTa-style models number positions from padding_idx + 1: 514 position embeddings hold 512 tokens."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from orchestrator.models import check_max_length

    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=514, pad_token_id=1))
    if refused:
        with pytest.raises(UserError, match=f"model.max_length: {max_length} is more tokens than the model's 512 "
                                            "positions; use at most 512"):
            check_max_length(model, max_length)
    else:
        check_max_length(model, max_length)
        model(input_ids=torch.full((1, max_length), 5))  # and it really fits


def test_rank_error_names_the_largest_allowed_rank():
    """MiniLM-L6's shapes (hidden 384, FFN 1536) without loading it: rank 1000 > 384 must say 384."""
    from orchestrator.allocators import space_modules
    from orchestrator.config import SpaceConfig
    from orchestrator.models import AdaptableModule

    shapes = {"query": (384, 384), "value": (384, 384), "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
    modules = [AdaptableModule(f"bert.encoder.layer.{i}.{t}", i, t, *shape) for i in range(6) for t, shape in shapes.items()]
    with pytest.raises(UserError) as err:
        space_modules(modules, SpaceConfig(ranks=[8, 1000]))
    assert str(err.value).startswith("space.ranks: [1000]")
    assert "384" in str(err.value)


# ---------------------------------------------------------------- a real process


def test_real_process_prints_one_line_and_exits_2(tmp_path, tiny_model_dir):
    """`python -m orchestrator.cli run` as a user runs it: import-time warnings would break the one line.
    (One process is enough: `run` imports the whole pipeline before it reads the config.)"""
    space = Space(tmp_path, Path(tiny_model_dir))
    path = tmp_path / "bad.yaml"
    config = {"screen": {"proxies": ["grad_norm", "nope"]}}
    expect = "error: screen.proxies: unknown proxy ['nope']; choose from ["
    path.write_text(yaml.safe_dump(substituted(merged(BASE, config), space.subs())), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(expect) and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not space.results.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, expect", [
    (("run", "x.yaml", "--bogus"), ("No such option: --bogus", "; see 'lora-search run --help'")),
    (("run",), ("Missing argument 'config'", "; see 'lora-search run --help'")),
    (("bogus",), ("No such command 'bogus'", "; see 'lora-search --help'")),
    (("validate-proxies", "x.yaml", "--n", "abc"), ("Invalid value for '--n'", "; see 'lora-search validate-proxies --help'")),
    (("registry", "promote", "a", "abc"), ("Invalid value for 'version'", "; see 'lora-search registry promote --help'")),
    # click raises these without a context: the hint names the command sys.argv gave, as for the others
    (("run", "x.yaml", "--address"), ("Option '--address' requires an argument", "; see 'lora-search run --help'")),
    (("registry", "add", "r", "--name"), ("requires an argument", "; see 'lora-search registry add --help'")),
], ids=["unknown-option", "missing-argument", "unknown-command", "bad-type", "bad-type-subgroup", "option-value-missing",
        "option-value-missing-subgroup"])
def test_usage_errors_are_one_line(args, expect):
    """Typer's own usage errors (parsed before any command runs) follow the same one-line rule, not its boxed panel."""
    done = _cli(*args)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, *expect)
    assert done.stdout == ""


@pytest.mark.parametrize("args, code", [(("--help",), 0), (("run", "--help"), 0), ((), 2), (("registry",), 2)])
def test_help_is_kept(args, code):
    """--help exits 0; no arguments (no_args_is_help) shows the help too, with click's exit code 2."""
    done = _cli(*args)
    assert done.returncode == code, done.stderr
    assert "Usage:" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert done.stderr == ""


# ---------------------------------------------------------------- validate-proxies


def _good_config(space: Space) -> Path:
    return space.write("good.yaml", yaml.safe_dump(substituted(BASE, space.subs())))


@pytest.mark.parametrize("args, expect", [(("--n", "0"), ("--n: 0 ", "give --n 3 or more")),
                                          (("--n", "-4"), ("--n: -4 ", "give --n 3 or more")),
                                          (("--n", "2"), ("--n: 2 ", "give --n 3 or more")),
                                          (("--off-budget", "-1"), ("--off-budget: -1 is negative", "give 0")),
                                          (("data.task=$root/none.csv",), ("none.csv", "not found")),
                                          (("space.layers=[99]",), ("space.layers: layers [99] do not exist", "0..1"))])
def test_validate_proxies_bad_counts_refused_up_front(args, expect, tmp_path, tiny_model_dir, no_ray, capsys, monkeypatch):
    """n < 3 at the budget leaves ρ and τ nothing to rank, a data file that is not there, layers the model lacks:
    refused before Ray starts or anything is written."""
    space = Space(tmp_path, Path(tiny_model_dir))
    config = _good_config(space)
    before = snapshot(tmp_path)

    args = [Template(a).safe_substitute(space.subs()) for a in args]
    code, out, err = run_cli(["validate-proxies", config, *args], capsys, monkeypatch)

    assert_one_line_error(code, out, err, *expect)
    assert snapshot(tmp_path) == before  # the bad data file and layers too: before, the run directory was made first


def test_validate_proxies_with_every_training_failed(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Every training fails (recorded as Ray Train's driver records a failure): one line naming trials/, no outputs.
    The probe runs for real, in this process instead of a Ray worker."""
    from orchestrator import pipeline, screen, train

    for key in pipeline.RUNTIME_ENV:  # set_runtime_env must not leak into later tests
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pipeline, "init_ray", lambda address: None)
    monkeypatch.setattr(screen, "probe_scores", screen._probe_in_worker)

    early_stopping = []

    def every_training_fails(cfg, task, jobs):
        early_stopping.append(cfg.train.early_stopping)
        for job in jobs:
            train.keep_failure(cfg, job, FloatingPointError("non-finite training loss nan at step 0"))
        return train.finished_jobs(cfg.run_dir)

    monkeypatch.setattr(train, "run_training", every_training_fails)
    space = Space(tmp_path, Path(tiny_model_dir))

    code, out, err = run_cli(["validate-proxies", _good_config(space), "--n", "3", "--off-budget", "0"], capsys, monkeypatch)

    trials = space.results / "bad" / "trials"
    assert_one_line_error(code, out, err, f"validate-proxies: no allocation finished training (their errors are in '{trials}')",
                          "run again with --resume")
    assert len(list(trials.glob("*.json"))) >= 3 and not list(trials.parent.glob("proxy_validation*"))
    # every allocation trains to the end: ASHA would stop the weak ones, chosen on the accuracy being correlated
    assert early_stopping == [False]


# ---------------------------------------------------------------- the Python API: allocations


@pytest.mark.parametrize("text, expect", [
    ("L99.query:8", "'L99.query:8' is not `L<layer>.<module type>:<rank>` for this model"),
    ("L0.attn:8", "'L0.attn:8'"),
    ("L0.query", "'L0.query'"),
    ("L0.query:x", "'L0.query:x'"),
    ("L0.query:-2", "'L0.query:-2'"),
    ("L0.query:8,L1.valeu:4", "'L1.valeu:4'"),
])
def test_compact_allocation_with_a_module_that_matches_nothing(text, expect, tiny_modules):
    from orchestrator.allocation import Allocation

    with pytest.raises(UserError) as err:
        Allocation.from_compact(text, tiny_modules)
    message = str(err.value)
    assert message.startswith("allocation: ") and expect in message and "e.g. L0.query:8" in message
    assert "\n" not in message


def test_compact_allocation_without_modules_is_a_user_error():
    from orchestrator.allocation import Allocation

    with pytest.raises(UserError, match=r"^allocation: 'L0.query:8' is not .*; e\.g\. L0\.query:8"):
        Allocation.from_compact("L0.query:8", [])


@pytest.mark.parametrize("key, hits", [
    ("dense", 7),  # attention.output.dense and intermediate.dense and output.dense of 2 layers, and the pooler
    ("query", 2),
    ("attention.self.value", 2),
    ("bert.encoder.layer.9.attention.self.query", 0),
    ("bert.encoder.layer.0.attention.self", 0),  # a container, not a Linear
])
def test_rank_pattern_key_must_match_exactly_one_module(key, hits, tiny_model):
    from orchestrator.allocation import Allocation

    with pytest.raises(UserError) as err:
        Allocation.from_ranks({key: 4}).check_against(tiny_model)
    message = str(err.value)
    assert message == (f"allocation: module '{key}' matches {hits} Linear modules of the model; "
                       "use full module names from `lora-search modules`")


def test_empty_and_negative_allocations_refused(tiny_model):
    from orchestrator.allocation import Allocation

    with pytest.raises(UserError, match="^allocation: no (LoRA )?module has a rank > 0; switch on"):
        Allocation.from_ranks({"bert.encoder.layer.0.attention.self.query": 0}).check_against(tiny_model)
    with pytest.raises(UserError, match="^allocation: ranks must be integers ≥ 0.*; use 0 to switch a module off"):
        Allocation.from_ranks({"bert.encoder.layer.0.attention.self.query": -1})


@pytest.mark.parametrize("files", [
    {"adapter_model.bin": "bomb"},
    {"adapter_model.pt": "bomb", "adapter_config.json": '{"peft_type": "LORA"}'},
    {"adapter_model.safetensors": "bomb", "adapter_config.json": '{"peft_type": "LORA"}'},  # a pickle renamed
], ids=["bin_only", "pt_with_config", "pickle_renamed_to_safetensors"])
def test_non_safetensors_adapter_refused(files, tmp_path):
    """The adapter loader (registry.read_adapter_dir; its own tests belong to the registry engineer): a
    pickled adapter is refused with a UserError and never unpickled."""
    registry = pytest.importorskip("orchestrator.registry")
    marker = tmp_path / "PWNED"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, content in files.items():
        if content == "bomb":
            write_bomb(adapter / name, marker)
        else:
            (adapter / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        registry.read_adapter_dir(adapter)
    message = str(err.value)
    assert message.startswith("registry: ") and "; " in message and "safe_serialization=True" in message
    assert "\n" not in message
    assert not marker.exists()


# ---------------------------------------------------------------- disk full while writing the report

MAJORITY = 0.5


def _trial(cid, kind, label, acc, ranks) -> dict:
    return dict(candidate_id=cid, kind=kind, label=label, ranks=ranks, seed=0, accuracy=acc, f1=acc - 0.05,
                eval_loss=round(1 - acc, 2), latency_ms_per_batch=2.0, epoch=1, train_loss=0.5, train_wall_s=10.0,
                peak_memory_mb=300.0, trainable_params=sum(64 * r for r in ranks.values()), head_params=66, device="cpu",
                resumed_from_epoch=0, history=[{"epoch": 1, "accuracy": acc}], status="completed",
                adapter_dir=f"adapters/{cid}", device_hours=0.01, cost_usd=0.25)


def _finished_run(run_dir: Path) -> Path:
    q0, v1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"
    (run_dir / "trials").mkdir(parents=True)
    for trial in (_trial("b1", "baseline", "uniform_qv", 0.65, {q0: 8, v1: 8}), _trial("a1", "searched", "screen#1", 0.8, {q0: 16})):
        (run_dir / "trials" / f"{trial['candidate_id']}-seed0.json").write_text(json.dumps(trial))
    (run_dir / "run.json").write_text(json.dumps({"task": {"majority_rate": MAJORITY}, "seeds": {"train": [0]},
                                                  "config": {"train": {"baselines": ["uniform_qv"]}}}))
    return run_dir


def _disk_full_after(partial: bytes):
    def writer(target) -> None:
        with open(target, "wb") as handle:
            handle.write(partial)  # half a file reaches the disk...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then it is full
    return writer


def test_disk_full_in_write_atomic_keeps_the_earlier_file(tmp_path):
    from orchestrator import report

    path = tmp_path / "report.md"
    path.write_text("# earlier report\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        report.write_atomic(path, _disk_full_after(b"# half a rep"))
    assert str(err.value) == (f"write: could not write '{path}' (No space left on device); free disk space or fix "
                              "permissions, then run the command again (`lora-search run` with --resume)")
    assert path.read_text(encoding="utf-8") == "# earlier report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no .report.md.tmp


def test_disk_full_during_lora_search_report(tmp_path, capsys, monkeypatch):
    """`lora-search report RUN` on a full disk: one line, exit 2, the earlier report.parquet intact, no temp file."""
    run_dir = _finished_run(tmp_path / "run")
    (run_dir / "report.parquet").write_bytes(b"earlier parquet bytes")
    before = snapshot(run_dir)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda self, target, **kw: _disk_full_after(b"PAR1 half")(target))

    code, out, err = run_cli(["report", run_dir], capsys, monkeypatch)

    assert_one_line_error(code, out, err, "report.parquet' (No space left on device)", "free disk space")
    assert (run_dir / "report.parquet").read_bytes() == b"earlier parquet bytes"
    assert snapshot(run_dir) == before  # no .tmp, no report.csv/md/html written after the failure
