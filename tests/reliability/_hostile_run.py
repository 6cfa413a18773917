"""One real run under hostile conditions, shared by test_faults.py and test_secrets.py (it costs minutes).

A small real search (packaged MiniLM, a slice of the shipped data, an embedded Ray cluster, Optuna on SQLite):
- the chaos hook LORA_SEARCH_INJECT_FAULT (orchestrator/train.py fault_plan) makes the uniform_qv baseline's
  loss NaN and caps the uniform_all baseline's worker memory (RLIMIT_AS) so its first step cannot allocate;
- fake cloud credentials sit in the environment of the driver and so of every Ray process it starts;
- `lora-search dashboard` serves the study from before the screen starts, polled over 127.0.0.1 throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest

from orchestrator.config import load_config
from orchestrator.train import FAULT_ENV

REPO = Path(__file__).resolve().parents[2]
SMALL = ["name=chaos", "data.train_size=256", "data.eval_size=64", "model.max_length=16", "screen.num_trials=6",
         "screen.candidates_per_trial=4", "screen.survivors=1", "screen.proxy_batches=1", "train.batch_size=32",
         "train.eval_batch_size=64", "train.epochs=1", "train.baselines=[uniform_qv,uniform_all]",
         "train.max_failures=0"]  # a deterministic fault fails again on every retry: spare the minutes
DASHBOARD_START_S = 120  # importing optuna-dashboard pulls in scikit-learn: seconds on a cold disk


@dataclass
class HostileRun:
    run_dir: Path
    nan_job: str
    oom_job: str
    secrets: dict[str, str]  # fake credential values, unique to this run
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    wall_s: float = 0.0
    cluster: dict = field(default_factory=dict)  # ray.cluster_resources() after the run
    available: dict = field(default_factory=dict)  # ray.available_resources() once the failed trainers are gone
    worker_pids: list = field(default_factory=list)  # every RayTrainWorker actor the run started
    polls: list = field(default_factory=list)  # (time, HTTP status, trials the dashboard showed or None)
    started: float = 0.0
    finished: float = 0.0
    screen_trials: int = 0  # trials in the Optuna study at the end
    dashboard_output: str = ""
    driver_log: Path | None = None  # everything the driver printed (fd 1 and 2)
    ray_session_dir: Path | None = None  # the embedded cluster's logs
    ray_dashboard: dict = field(default_factory=dict)  # where the embedded Ray dashboard listens, who reaches it


def fake_credentials(root: Path) -> dict[str, str]:
    """Environment variables a cloud user has set, with values that cannot occur by chance."""
    tag = uuid.uuid4().hex
    key_file = root / "gcp-key.json"
    key_file.write_text(json.dumps({"type": "service_account", "private_key_id": f"pkid{tag}",
                                    "private_key": f"-----BEGIN PRIVATE KEY-----\nFAKE{tag}\n-----END PRIVATE KEY-----\n"}))
    return {"AWS_ACCESS_KEY_ID": f"AKIA{tag[:16].upper()}", "AWS_SECRET_ACCESS_KEY": f"awsSecret{tag}",
            "AWS_SESSION_TOKEN": f"awsSession{tag}", "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
            "RAY_AUTH_TOKEN": f"rayToken{tag}", "HF_TOKEN": f"hf_{tag}", "AZURE_CLIENT_SECRET": f"azure{tag}",
            "GCP_KEY_CONTENT_MARKER": f"FAKE{tag}"}  # what the key file holds (not an env var Ray or gcloud reads)


def baseline_job_ids(cfg) -> dict[str, str]:
    """Job ids (seed 0) of the configured baselines, as the pipeline will name them."""
    from orchestrator.allocation import searchable_units
    from orchestrator.allocators import baseline_allocations, make_budget
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(cfg.model.name, 2)
    modules = searchable_units(base, adaptable_modules(base), cfg.space.shortcuts)
    allocations = baseline_allocations(modules, make_budget(modules, cfg.space), cfg.train.baselines)
    return {name: f"{allocation.candidate_id}-s0" for name, allocation in allocations.items()}


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:  # a 500 is what a lock error in a dashboard view becomes
        return err.code, {}


def _poll_dashboard(base: str, polls: list, stop: threading.Event) -> None:
    """The browser's requests: the study list, then the study's trials, four times a second."""
    while not stop.is_set():
        status, body = _get(f"{base}/api/studies")
        trials = None
        if status == 200 and body.get("study_summaries"):
            status, body = _get(f"{base}/api/studies/{body['study_summaries'][0]['study_id']}")
            trials = len(body["trials"]) if status == 200 else None
        polls.append((time.time(), status, trials))
        stop.wait(0.25)


def _start_dashboard(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """`lora-search dashboard RUN_DIR` on a free loopback port, once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dashboard", str(run_dir), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + DASHBOARD_START_S
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(f"{base}/api/studies", timeout=5).close()
            return proc, base
        except OSError:
            assert time.monotonic() < deadline, "the dashboard did not answer"
            time.sleep(0.5)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def _ray_dashboard_exposure() -> dict:
    """The embedded Ray dashboard (and state/job API): its listening addresses and who can connect."""
    import ray

    address = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]
    port = int(address.rsplit(":", 1)[1])
    node_ip = ray.util.get_node_ip_address()
    return {"state_api": address, "url": ray._private.worker.get_dashboard_url(), "node_ip": node_ip,
            "listening": {c.laddr.ip for c in psutil.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN and c.laddr.port == port},
            "from_loopback": _connects("127.0.0.1", port), "from_node_ip": _connects(node_ip, port)}


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.5)


def _train_worker_pids() -> list[int]:
    """Every RayTrainWorker actor of this run's cluster, through the state API address init_ray names."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    return [actor.pid for actor in actors if actor.pid]


def alive_train_workers(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


@contextmanager
def _driver_output_to(path: Path):
    """Send this process's fd 1 and 2 (Python, Ray's log echo, C++) to `path` while the run goes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as sink, open(sink.fileno(), "w", buffering=1, closefd=False) as text:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            # pytest's capture replaces sys.stdout/err with its own files: Python-level prints (Tune's progress,
            # the pipeline's lines) must be pointed at the sink too, not only the file descriptors
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.fixture(scope="session")
def hostile_run(tmp_path_factory) -> HostileRun:
    import ray

    from orchestrator import pipeline

    root = tmp_path_factory.mktemp("hostile")
    cfg = load_config(REPO / "search_spaces/quickstart.yaml", SMALL + [f"results_dir={root / 'results'}"])
    jobs = baseline_job_ids(cfg)
    run = HostileRun(cfg.run_dir, nan_job=jobs["uniform_qv"], oom_job=jobs["uniform_all"],
                     secrets=fake_credentials(root), driver_log=root / "driver.log")
    # The study file exists before the run, so the dashboard is up (it takes seconds) before the screen writes.
    cfg.run_dir.mkdir(parents=True)
    study_url = f"sqlite:///{cfg.run_dir / 'study.db'}"
    optuna.storages.RDBStorage(study_url)
    dashboard, base = _start_dashboard(cfg.run_dir)
    stop = threading.Event()
    poller = threading.Thread(target=_poll_dashboard, args=(base, run.polls, stop), daemon=True)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in run.secrets.items():
            patch.setenv(name, value)
        patch.setenv(FAULT_ENV, f"nan:{run.nan_job},oom:{run.oom_job}")
        try:
            with _driver_output_to(run.driver_log):
                ray.shutdown()  # the shared cluster (conftest's embedded_ray), if up: this run's has the secrets
                pipeline.set_runtime_env()
                pipeline.init_ray(None)
                run.ray_session_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path())
                run.ray_dashboard = _ray_dashboard_exposure()
                poller.start()
                run.started = time.time()
                run.table = pipeline.run(cfg)
                run.finished = time.time()
                run.cluster = ray.cluster_resources()
                # Ray frees a failed trainer's placement group asynchronously (ray#23971): give it a moment.
                wait_until(lambda: ray.available_resources().get("CPU") == run.cluster["CPU"], 30)
                run.available = ray.available_resources()
                run.worker_pids = _train_worker_pids()
                wait_until(lambda: not alive_train_workers(run.worker_pids), 30)
            run.wall_s = run.finished - run.started
            # optuna-dashboard caches a study's trials up to 10 s: keep polling until the last write shows
            run.screen_trials = len(optuna.load_study(study_name="screen", storage=study_url).trials)
            wait_until(lambda: run.polls[-1][2] == run.screen_trials, 20)
        finally:
            ray.shutdown()
            stop.set()
            poller.join(30)
            dashboard.terminate()
            run.dashboard_output = dashboard.communicate(timeout=30)[0]
    print(f"hostile run: {run.wall_s:.0f} s, {len(run.polls)} dashboard polls, {len(run.worker_pids)} train workers")
    return run
