"""Config: defaults, YAML loading, dotted overrides, and one-line errors that name the field and the fix."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import typing
from pathlib import Path

import pytest

from orchestrator.config import MODULE_TYPES, RunConfig, load_config
from orchestrator.errors import UserError


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_build():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.name == "run"
    assert cfg.model.name == "minilm-l6" and cfg.model.max_length == 64
    assert cfg.space.module_types == list(MODULE_TYPES)
    assert cfg.space.ranks == [1, 2, 4, 8, 16]
    assert (cfg.space.budget.params, cfg.space.budget.qv_rank, cfg.space.budget.tolerance) == (None, 8, 0.05)
    assert cfg.train.epochs == 1 and cfg.train.seeds == [0] and cfg.train.lr == 2e-3
    assert cfg.screen.rank_by == "grad_norm" and cfg.screen.direction == "maximize"
    assert cfg.cost.price_per_device_hour == {"cpu": 0.0446, "gpu": 1.006}
    assert str(cfg.run_dir) == "results/run"


def test_every_field_has_help():
    seen = []

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            seen.append(f"{cls.__name__}.{f.name}")
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(RunConfig)
    assert {"RunConfig.name", "TrainConfig.epochs", "BudgetConfig.qv_rank", "CostConfig.price_per_device_hour"} <= set(seen)


def test_load_yaml_file(tmp_path):
    path = write(tmp_path, """
        name: demo-1
        model:
          max_length: 32
        space:
          module_types: [query, value]
          layers: [0, 1]
          ranks: [8, 2, 4, 2]
          budget:
            params: 9216
            qv_rank: null
            tolerance: 0.1
        train:
          epochs: 3
          lr: 0.001
          seeds: [1, 2, 3]
        cost:
          price_per_device_hour: {cpu: 0.1, gpu: 2}
    """)
    cfg = load_config(path)
    assert cfg.name == "demo-1"
    assert cfg.model.max_length == 32
    assert cfg.space.module_types == ["query", "value"]
    assert cfg.space.layers == [0, 1]
    assert cfg.space.ranks == [2, 4, 8]  # sorted and de-duplicated
    assert (cfg.space.budget.params, cfg.space.budget.qv_rank, cfg.space.budget.tolerance) == (9216, None, 0.1)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.001 and cfg.train.seeds == [1, 2, 3]
    assert cfg.cost.price_per_device_hour == {"cpu": 0.1, "gpu": 2.0}
    assert isinstance(cfg.cost.price_per_device_hour["gpu"], float)
    # untouched sections keep their defaults
    assert cfg.screen == RunConfig().screen


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=2", "train.seeds=[0,1]", "name=other", "space.budget.tolerance=0.2",
                             "data.train_size=null"])
    assert cfg.train.epochs == 2
    assert cfg.train.seeds == [0, 1]
    assert cfg.name == "other"
    assert cfg.space.budget.tolerance == 0.2
    assert cfg.data.train_size is None


def test_override_int_coerced_to_float():
    cfg = load_config(None, ["train.warmup_ratio=0"])
    assert cfg.train.warmup_ratio == 0.0 and isinstance(cfg.train.warmup_ratio, float)
    # lr=1 becomes 1.0, which is out of range (0, 1): refused, naming the field
    with pytest.raises(UserError, match=r"^train\.lr: 1\.0 is out of range"):
        load_config(None, ["train.lr=1"])


@pytest.mark.parametrize("override", ["train.epochs", "=2", "train.epochs2"])
def test_malformed_override(override):
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_config(None, [override])


def test_override_into_non_section():
    with pytest.raises(UserError, match="'epochs' is not a section"):
        load_config(None, ["train.epochs=2", "train.epochs.x=3"])


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError) as err:
        load_config(None, ["train.epoch=2"])
    assert str(err.value) == "train.epoch: unknown key; did you mean 'train.epochs'?"


def test_unknown_nested_key_in_yaml_suggests_nearest(tmp_path):
    path = write(tmp_path, "space:\n  budget:\n    qvrank: 4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value) == "space.budget.qvrank: unknown key; did you mean 'space.budget.qv_rank'?"


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(UserError) as err:
        load_config(None, ["zzzzzz=1"])
    assert str(err.value).startswith("zzzzzz: unknown key; valid keys: name, results_dir, storage_path, model, data")


@pytest.mark.parametrize("override, message", [
    ("train.epochs=two", "train.epochs: expected int, got 'two'"),
    ("train.epochs=2.5", "train.epochs: expected int, got 2.5"),
    ("train.epochs=true", "train.epochs: expected int, got True"),
    ("train.seeds=3", "train.seeds: expected a list, got 3"),
    ("train.seeds=[0,x]", "train.seeds[1]: expected int, got 'x'"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("model=minilm", "model: expected a mapping, got str"),
    ("cost.price_per_device_hour=3", "cost.price_per_device_hour: expected a mapping, got 3"),
])
def test_wrong_type(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_string_field_accepts_scalars():
    cfg = load_config(None, ["train.use_gpu=false", "data.task=123"])
    assert cfg.train.use_gpu == "false"
    assert cfg.data.task == "123"  # no such file here: kept as typed, for the error that names it


@pytest.mark.parametrize("overrides", [
    ["space.budget.params=9216"],  # qv_rank defaults to 8: both set
    ["space.budget.qv_rank=null"],  # neither set
    ["space.budget.params=null", "space.budget.qv_rank=null"],
])
def test_budget_needs_exactly_one_of_params_and_qv_rank(overrides):
    with pytest.raises(UserError, match=r"^space\.budget: set exactly one of params and qv_rank"):
        load_config(None, overrides)


def test_budget_params_alone_and_qv_rank_alone():
    cfg = load_config(None, ["space.budget.params=9216", "space.budget.qv_rank=null"])
    assert (cfg.space.budget.params, cfg.space.budget.qv_rank) == (9216, None)
    cfg = load_config(None, ["space.budget.qv_rank=4"])
    assert (cfg.space.budget.params, cfg.space.budget.qv_rank) == (None, 4)


@pytest.mark.parametrize("overrides, field", [
    (["space.budget.qv_rank=0"], "space.budget.qv_rank"),
    (["space.budget.params=-5", "space.budget.qv_rank=null"], "space.budget.params"),
    (["space.budget.tolerance=1.0"], "space.budget.tolerance"),
    (["space.ranks=[]"], "space.ranks"),
    (["space.ranks=[0,2]"], "space.ranks"),
    (["space.module_types=[query,dense]"], "space.module_types"),
    (["space.layers=[-1]"], "space.layers"),
    (["space.layers=[]"], "space.layers"),
    (["screen.rank_by=synflow"], "screen.rank_by"),
    (["screen.direction=up"], "screen.direction"),
    (["screen.proxies=[grad_nrom]"], "screen.proxies"),  # the typo is named, not rank_by's absence from the list
    (["screen.proxies=[calibrated]"], "screen.proxies"),
    (["train.seeds=[]"], "train.seeds"),
    (["train.baselines=[lora_plus]"], "train.baselines"),
    (["model.max_length=4"], "model.max_length"),
    (["model.dropout=1.0"], "model.dropout"),
    (["data.train_size=4"], "data.train_size"),
    (["cost.price_per_device_hour={cpu: -1, gpu: 1}"], "cost.price_per_device_hour.cpu"),
    (["train.lr_grid=[2e-3,8e-3]"], "train.lr_grid"),  # no data.validation_size to pick on
    (["train.lr_grid=[2e-3]", "data.validation_size=64"], "train.lr_grid"),
    (["train.lr_grid=[2e-3,2]", "data.validation_size=64"], "train.lr_grid[1]"),
    (["train.lr_grid=[2e-3,x]", "data.validation_size=64"], "train.lr_grid[1]"),
    (["train.lr_grid=[1e-3,1.0000001e-3]", "data.validation_size=64"], "train.lr_grid"),  # one sweep id, lr0.001
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(field + ":")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs", "a..b", ".hidden", "", "x" * 101, "a b"])
def test_unsafe_run_names_refused(name):
    with pytest.raises(UserError, match=r"^name: .* is not a safe run name"):
        RunConfig(name=name)


def test_unsafe_run_name_refused_from_override():
    with pytest.raises(UserError, match="not a safe run name"):
        load_config(None, ["name=../x"])
    with pytest.raises(UserError, match="not a safe run name"):
        load_config(None, ["name=a/b"])


@pytest.mark.parametrize("name", ["run", "quickstart", "exp-1_b.2", "A" * 100])
def test_safe_run_names_accepted(name):
    assert RunConfig(name=name).name == name


def test_invalid_yaml_refused_in_one_line(tmp_path):
    path = write(tmp_path, "name: demo\ntrain:\n  seeds: [0, 1\n  epochs: 2\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config: '{path}' is not valid YAML at line ")
    assert message.endswith("; fix the syntax there")


def test_non_utf8_yaml_refused(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_refused(tmp_path):
    with pytest.raises(UserError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_quickstart_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml")
    assert cfg.name == "quickstart"
    assert cfg.space.ranks == [2, 4, 8, 16]
    assert cfg.screen.direction == "minimize"


# ---------------------------------------------------------------- regressions found by these tests


def test_float_override_in_exponent_notation():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_string_override_kept_verbatim():
    assert load_config(None, ["name=2024_01"]).name == "2024_01"


def test_partial_price_override_keeps_other_default():
    cfg = load_config(None, ["cost.price_per_device_hour.cpu=0.05"])
    assert cfg.cost.price_per_device_hour == {"cpu": 0.05, "gpu": 1.006}


@pytest.mark.parametrize("override, attribute, value", [
    ("register.name=007", "register.name", "007"),
    ("register.name=off", "register.name", "off"),
    ("register.root=0123", "register.root", str(Path("0123").absolute())),  # a path, kept absolute
    ("data.eval_path=0755", "data.eval_path", "0755"),
    ("storage_path=s3://1_000", "storage_path", "s3://1_000"),
    ("register.name=null", "register.name", None),
    ("register.root=~", "register.root", None),
    ("data.eval_path=", "data.eval_path", None),
])
def test_optional_string_override_kept_verbatim_unless_null(override, attribute, value):
    section, _, field = attribute.rpartition(".")
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section) if section else cfg, field) == value


def test_local_storage_path_warm_start_and_registry_root_are_kept_absolute(tmp_path, monkeypatch):
    """Ray resolves a relative storage_path against each trial's working directory, and a --resume (or a `train
    RUN_DIR`) from another directory read them against that one: a second registry under it. run.json keeps them
    as absolute paths, `~` expanded."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage_path=ray_store", "screen.warm_start_from=results/earlier", "register.root=reg"])
    assert cfg.storage_path == str(tmp_path / "ray_store")
    assert cfg.screen.warm_start_from == str(tmp_path / "results" / "earlier")
    assert cfg.register.root == str(tmp_path / "reg") and cfg.registry_root == tmp_path / "reg"
    assert load_config(None, ["storage_path=~/ray_store"]).storage_path == str(Path.home() / "ray_store")


def test_local_model_and_data_paths_are_kept_absolute_and_names_are_not(tmp_path, monkeypatch):
    """A Ray Train worker runs in its own working directory and reloads model.name there: a relative model
    directory passed every driver check, then failed in every training. run.json keeps data files absolute too."""
    from orchestrator.config import BUILTIN_TASK_NAMES, PACKAGED_MODELS
    from orchestrator.data import BUILTIN_TASKS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_model").mkdir()
    (tmp_path / "train.csv").write_text("text,label\n")
    cfg = load_config(None, ["model.name=my_model", "data.task=train.csv", "data.eval_path=~/eval.csv"])
    assert (cfg.model.name, cfg.data.task) == (str(tmp_path / "my_model"), str(tmp_path / "train.csv"))
    assert cfg.data.eval_path == str(Path.home() / "eval.csv")  # written as a path: absolute, there or not
    # a hub id (never supported) or a typo stays as typed, so the error names what the user wrote
    assert load_config(None, ["model.name=org/some-model"]).model.name == "org/some-model"
    assert load_config(None, ["model.name=./missing"]).model.name == str(tmp_path / "missing")
    # a name too long for a path was an OSError traceback; an empty one became the current directory
    assert load_config(None, ["model.name=" + "x" * 300]).model.name == "x" * 300
    for field in ("model.name", "data.task"):
        with pytest.raises(UserError, match=rf"^{field}: is empty; use "):
            load_config(None, [f"{field}="])
    for name in PACKAGED_MODELS:
        assert load_config(None, [f"model.name={name}"]).model.name == name
    assert tuple(BUILTIN_TASKS) == BUILTIN_TASK_NAMES
    for task in BUILTIN_TASK_NAMES:
        assert load_config(None, [f"data.task={task}"]).data.task == task


def test_a_home_relative_results_dir_and_registry_root_are_expanded():
    """`~` in YAML, or in an override under /bin/sh (a `ray job submit` entrypoint), made a directory named '~'."""
    cfg = load_config(None, ["results_dir=~/lora-runs", "register.root=~/adapters"])
    assert cfg.run_dir == Path.home() / "lora-runs" / cfg.name
    assert cfg.registry_root == Path.home() / "adapters"


def test_optional_string_in_yaml_file_follows_yaml(tmp_path):
    # a YAML file is YAML's business: unquoted 007 is the integer 7 there; quoting keeps the text
    cfg = load_config(write(tmp_path, "register:\n  name: 007\n  root: '0123'\n"))
    assert (cfg.register.name, cfg.register.root) == ("7", str(Path("0123").absolute()))


@pytest.mark.parametrize("override, field", [
    ("data.split_seed=-1", "data.split_seed"),
    ("screen.seed=-1", "screen.seed"),
    ("screen.seed=4294967296", "screen.seed"),
    ("train.seeds=[0,-1]", "train.seeds[1]"),
    ("train.seeds=[0,0]", "train.seeds"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.dynamic_min_gain=.inf", "train.dynamic_min_gain"),
    ("train.dynamic_min_gain=.nan", "train.dynamic_min_gain"),
    ("routing.aux_weight=.inf", "routing.aux_weight"),
    ("cost.price_per_device_hour.GPU=4.096", "cost.price_per_device_hour.GPU"),
    ("cost.price_per_device_hour.cpu=.inf", "cost.price_per_device_hour.cpu"),
    ("cost.price_per_device_hour.gpu=.nan", "cost.price_per_device_hour.gpu"),
    ("train.lr=.nan", "train.lr"),
    ("model.dropout=.nan", "model.dropout"),
    ("space.budget.tolerance=.inf", "space.budget.tolerance"),
    ("data.eval_fraction=.nan", "data.eval_fraction"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio"),
    ("train.dynamic_every=.nan", "train.dynamic_every"),
    ("train.dynamic_max_move=.inf", "train.dynamic_max_move"),
])
def test_bad_numbers_refused_naming_the_field(override, field):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field + ":")
    assert "\n" not in str(err.value)


def test_seed_message_names_the_range():
    with pytest.raises(UserError) as err:
        load_config(None, ["data.split_seed=-1"])
    assert str(err.value) == "data.split_seed: -1 is not a seed in [0, 2**32); use an integer from 0 to 4294967295, e.g. 0"


def test_seed_and_price_edges_accepted():
    cfg = load_config(None, ["screen.seed=4294967295", "train.seeds=[0,4294967295]", "train.weight_decay=0.01",
                             "cost.price_per_device_hour.gpu=0"])
    assert cfg.screen.seed == 2**32 - 1 and cfg.train.weight_decay == 0.01
    assert cfg.cost.price_per_device_hour == {"cpu": 0.0446, "gpu": 0.0}


def test_price_key_case_refused_with_the_fix():
    with pytest.raises(UserError) as err:
        load_config(None, ["cost.price_per_device_hour.GPU=4.096"])
    assert str(err.value) == "cost.price_per_device_hour.GPU: 'GPU' is not a device kind; use cpu or gpu (lower case)"


def test_calibrated_run_name_leaves_room_for_the_calibration_suffix():
    from orchestrator.config import CALIBRATION_SUFFIX, MAX_RUN_NAME

    longest = MAX_RUN_NAME - len(CALIBRATION_SUFFIX)
    calibrated = ["screen.rank_by=calibrated", "screen.direction=maximize"]
    assert load_config(None, [f"name={'a' * longest}", *calibrated]).name == "a" * longest
    for name in ("a" * (longest + 1), "run."):  # too long; '..' once suffixed
        with pytest.raises(UserError) as err:
            load_config(None, [f"name={name}", *calibrated])
        assert str(err.value).startswith("name: ") and str(err.value).endswith(f"use at most {longest} characters, not ending in '.'")
    assert load_config(None, [f"name={'a' * MAX_RUN_NAME}"]).name == "a" * MAX_RUN_NAME  # only calibrated runs need the room


def test_longest_calibrated_name_builds_its_calibration_config():
    from orchestrator.calibrate import calibration_config
    from orchestrator.config import CALIBRATION_SUFFIX, MAX_RUN_NAME

    name = "a" * (MAX_RUN_NAME - len(CALIBRATION_SUFFIX))
    cfg = load_config(None, [f"name={name}", "screen.rank_by=calibrated", "screen.direction=maximize"])
    assert calibration_config(cfg).name == name + CALIBRATION_SUFFIX


def test_register_name_is_checked_as_the_registry_checks_it():
    from orchestrator.registry import _check_name

    for name in ("a..b", "registry.db", "registry.db-shm"):  # the last two are the registry's own database files
        with pytest.raises(UserError, match=rf"^register.name: '{re.escape(name)}' is not a safe registry name"):
            load_config(None, [f"register.name={name}"])
        with pytest.raises(UserError):
            _check_name(name)


def test_a_run_may_not_be_named_as_the_registry_directory(tmp_path):
    with pytest.raises(UserError, match=r"^name: 'registry' is the adapter registry's directory .*register\.root"):
        load_config(None, ["name=registry", f"results_dir={tmp_path}"])
    assert load_config(None, ["name=registry", f"results_dir={tmp_path}", f"register.root={tmp_path}/adapters"])
