"""`lora-search run` submitted through the Ray Jobs SDK to a real local head: the driver attaches to the
cluster through the RAY_ADDRESS that Ray sets for job drivers, and writes the report.

The head runs in its own session, with its own temp dir and ports. It is stopped by signalling the
`ray start --block` process this test started (and killing what is left of its session, by pid), not
by `ray stop --force`, which would kill every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.fs
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HEAD_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
SMALL = ["data.train_size=128", "data.eval_size=64", "model.max_length=16", "screen.num_trials=1",
         "screen.candidates_per_trial=4", "screen.survivors=1", "screen.proxy_batches=1", "train.batch_size=32",
         "train.baselines=[]"]  # one training: each costs ~30 s of Ray Train start-up here
HEAD_START_S = 180
JOB_TIMEOUT_S = 360


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _kill_leftovers(session_id: int, marker: str) -> list[int]:
    """Kill, by pid, processes of the head's session and job drivers whose command line names `marker`."""
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = os.getsid(proc.pid) == session_id or marker in " ".join(proc.info["cmdline"] or [])
            if mine and proc.pid != os.getpid():
                proc.kill()
                killed.append(proc.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)], timeout=10)
    return killed


@pytest.fixture
def ray_head(monkeypatch, fake_aws):
    """(dashboard URL, temp dir) of a fresh local head with 3 logical CPUs; stopped and removed afterwards.

    Its processes see fake AWS credentials (fake_aws), as a cloud node sees its instance role's.
    """
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the `ray` command is not installed")
    # Short path: Ray's Unix sockets live under it and AF_UNIX paths are limited to 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | HEAD_ENV
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=3", f"--object-store-memory={512 * 2**20}", f"--temp-dir={temp / 'ray'}",
         "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                    if response.status == 200 and "This command will now block" in (temp / "head.log").read_text():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray head did not come up:\n" + (temp / "head.log").read_text()[-3000:]
            time.sleep(1)
        for key, value in HEAD_ENV.items():  # the Jobs SDK client must not try token auth either
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        yield url, temp
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts its own processes down
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        _kill_leftovers(head.pid, str(temp))
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_run_submitted_as_a_ray_job(s3_bucket, ray_head):
    """Checkpoints and Tune state go to storage_path on S3 (a local S3 API), the report to results_dir and S3."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, temp = ray_head
    storage, fs = s3_bucket
    results = temp / "results"
    started = time.monotonic()
    client = JobSubmissionClient(url)
    job_id = client.submit_job(
        entrypoint=" ".join(["lora-search", "run", "search_spaces/quickstart.yaml", "name=jobtest", f"results_dir={results}",
                             f"'storage_path={storage}'"] + SMALL),
        runtime_env={
            "working_dir": str(REPO),
            "excludes": ["results/", ".git/", "*.egg-info/", "__pycache__/", ".pytest_cache/"],
            # Overlaps pipeline.RUNTIME_ENV on purpose: init_ray must not pass these again (Ray refuses the merge).
            "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        },
    )
    status = None
    while time.monotonic() - started < JOB_TIMEOUT_S:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(3)
    else:
        client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    elapsed = time.monotonic() - started
    print(f"job {job_id}: {status} after {elapsed:.0f} s")
    assert status == JobStatus.SUCCEEDED, f"{status} after {elapsed:.0f} s; log tail:\n{logs[-4000:]}"
    assert "Started a local Ray instance" not in logs  # attached through RAY_ADDRESS: no embedded Ray
    assert "Configuration for experiment" in logs and "Results:" in logs  # Tune's progress and the summary
    run_dir = results / "jobtest"
    for name in ("report.csv", "report.md", "screen.csv", "study.db", "run.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "train").exists() and not (run_dir / "tune").exists()  # Ray's state went to S3
    in_s3 = {info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(storage[5:].split("?")[0], recursive=True))}
    prefix = storage[5:].split("?")[0] + "/jobtest"
    trials = sorted(p.stem for p in (run_dir / "trials").glob("*.json"))
    assert trials and all(any(p.startswith(f"{prefix}/train/{job}/checkpoint_") and p.endswith("adapter_model.safetensors")
                              for p in in_s3) for job in trials)
    assert any(p.startswith(f"{prefix}/tune/screen/") for p in in_s3) and any(p.startswith(f"{prefix}/tune/train/") for p in in_s3)
    for name in ("report.md", "report.csv", "run.json", f"trials/{trials[0]}.json"):
        assert f"{prefix}/results/{name}" in in_s3, name
