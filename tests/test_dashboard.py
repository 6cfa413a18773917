"""`lora-search dashboard`: optuna-dashboard on a run's SQLite study, bound to 127.0.0.1, readable while a
search writes the study."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest

from orchestrator.dashboard import make_server
from orchestrator.storage import run_study
from orchestrator.errors import UserError
from orchestrator.pipeline import _free_loopback_port

STUDY = "screen"
SERVER_START_S = 120  # importing optuna-dashboard pulls in scikit-learn: seconds on a cold disk


def get_json(url: str, timeout: float = 30) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def make_run_dir(root: Path, trials: int = 5, storage: str | None = None) -> Path:
    """A run directory as the pipeline leaves it: run.json (config.screen.storage) and an Optuna study."""
    run_dir = root / "run"
    run_dir.mkdir()
    url = storage or f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="minimize")
    study.optimize(lambda trial: (trial.suggest_float("x", -3, 3) - 1) ** 2, n_trials=trials)
    (run_dir / "run.json").write_text(json.dumps({"config": {"name": "run", "screen": {"storage": storage}}}))
    return run_dir


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def served(tmp_path):
    """(server, base URL, run dir): the dashboard in a thread on a free port of 127.0.0.1."""
    run_dir = make_run_dir(tmp_path)
    server = make_server(run_dir, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield server, f"http://{host}:{port}", run_dir
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ---------------------------------------------------------------- storage lookup and errors


def test_run_study_default_and_from_run_json(tmp_path):
    run_dir = make_run_dir(tmp_path)
    assert run_study(run_dir) == (f"sqlite:///{(run_dir / 'study.db').resolve()}", "screen")
    elsewhere = tmp_path / "elsewhere.db"
    (run_dir / "run.json").write_text(json.dumps({"config": {"name": "r", "screen": {"storage": f"sqlite:///{elsewhere}"}}}))
    assert run_study(run_dir) == (f"sqlite:///{elsewhere}", "screen-r")


def test_the_page_shown_is_the_runs_own_study_in_a_shared_storage(tmp_path):
    from orchestrator.dashboard import study_path
    from orchestrator.storage import open_storage

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storage = open_storage(url, create=True)
    for name in ("screen-other", "screen-mine"):
        optuna.create_study(study_name=name, storage=storage)
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"config": {"name": "mine", "screen": {"storage": url}}}))
    assert run_study(run_dir) == (url, "screen-mine")
    assert study_path(storage, run_study(run_dir)[1]) == f"/dashboard/studies/{storage.get_study_id_from_name('screen-mine')}"


WRONG_SHAPES = {"list": [], "config_string": {"config": "x"}, "screen_list": {"config": {"screen": []}},
                "storage_list": {"config": {"name": "d", "screen": {"storage": ["x"]}}}}


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_json", "no_study_yet", *WRONG_SHAPES])
def test_bad_run_dir_is_a_user_error(tmp_path, case):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "bad_json":
        (run_dir / "run.json").write_text("{not json")
    if case in WRONG_SHAPES:
        (run_dir / "run.json").write_text(json.dumps(WRONG_SHAPES[case]))
    if case == "no_study_yet":
        (run_dir / "run.json").write_text(json.dumps({"config": {"screen": {"storage": None}}}))
    with pytest.raises(UserError) as err:
        run_study(run_dir)
    assert str(err.value).startswith("RUN_DIR: ") and "\n" not in str(err.value)
    assert not (run_dir / "study.db").exists()  # nothing was created


def test_a_run_screened_without_optuna_is_told_so_not_asked_to_wait(tmp_path):
    """A random or score-driven screen writes no study.db: "start the dashboard once it runs" waited for nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"config": {"screen": {"storage": None, "allocator": "random"}}}))
    with pytest.raises(UserError, match=r"^RUN_DIR: '.*run' screened with screen.allocator=random, which runs no "
                                        r"Optuna study .*; its candidates are in screen.csv$"):
        run_study(run_dir)


def test_missing_sqlite_file_named_in_run_json_is_a_user_error(tmp_path):
    run_dir = make_run_dir(tmp_path)
    (run_dir / "run.json").write_text(json.dumps({"config": {"screen": {"storage": f"sqlite:///{tmp_path / 'gone.db'}"}}}))
    with pytest.raises(UserError, match="does not exist"):
        make_server(run_dir, "127.0.0.1", 0)
    assert not (tmp_path / "gone.db").exists()


def test_cli_bad_run_dir_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "dashboard", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: RUN_DIR: ")


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_port_out_of_range_is_a_user_error_and_the_only_line(tmp_path, capsys, port):
    import orchestrator.dashboard as dashboard

    with pytest.raises(UserError) as err:
        dashboard.serve(make_run_dir(tmp_path), host="0.0.0.0", port=port)  # not local: no warning before the error
    assert str(err.value) == f"--port: {port} is not a TCP port; give one from 1 to 65535 (0 picks a free one)"
    assert capsys.readouterr().err == ""


def test_bad_input_is_refused_before_optuna_dashboard_is_imported(tmp_path, monkeypatch):
    import orchestrator.dashboard as dashboard

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # importing it now fails (it takes seconds)
    with pytest.raises(UserError, match="--port"):
        dashboard.make_server(make_run_dir(tmp_path), port=99999)
    with pytest.raises(UserError, match="RUN_DIR"):
        dashboard.make_server(tmp_path / "nope")


def test_cli_port_out_of_range_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "dashboard", str(make_run_dir(tmp_path)), "--port", "99999"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --port: 99999 is not a TCP port; ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stdout + done.stderr


# ---------------------------------------------------------------- serving


def test_server_in_thread_lists_the_study_on_loopback(served):
    server, base, _ = served
    assert server.server_address[0] == "127.0.0.1"
    status, body = get_json(f"{base}/api/studies")
    assert status == 200
    assert [s["study_name"] for s in body["study_summaries"]] == [STUDY]
    study_id = body["study_summaries"][0]["study_id"]
    status, detail = get_json(f"{base}/api/studies/{study_id}")
    assert status == 200 and len(detail["trials"]) == 5
    with urllib.request.urlopen(f"{base}/dashboard/studies/{study_id}", timeout=30) as page:  # the web app itself
        assert page.status == 200 and b"<html" in page.read().lower()


def test_cli_serves_the_study_bound_to_loopback_only(tmp_path):
    run_dir = make_run_dir(tmp_path)
    port = _free_loopback_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dashboard", str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status, body = get_json(f"http://127.0.0.1:{port}/api/studies", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "dashboard did not answer"
                time.sleep(0.5)
        assert status == 200 and STUDY in [s["study_name"] for s in body["study_summaries"]]
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}, listening
        assert {addr.port for addr in listening} == {port}
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/dashboard/studies/1" in output
    assert "warning" not in output.lower()


def test_binding_elsewhere_warns(tmp_path, capsys, monkeypatch):
    import orchestrator.dashboard as dashboard

    class Stop(Exception):
        pass

    def no_serve(self):
        raise Stop

    monkeypatch.setattr(dashboard._ThreadedWSGIServer, "serve_forever", no_serve)
    with pytest.raises(Stop):
        dashboard.serve(make_run_dir(tmp_path), host="0.0.0.0", port=0)
    err = capsys.readouterr().err
    assert err.startswith("warning: binding the dashboard to 0.0.0.0") and err.count("\n") == 1


# ---------------------------------------------------------------- a search writing while the dashboard reads

WRITER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # As the screen stage opens it (orchestrator/screen.py): a plain RDBStorage on the URL.
    storage = optuna.storages.RDBStorage(sys.argv[1])
    study = optuna.load_study(study_name="screen", storage=storage)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        trial = study.ask()
        x = trial.suggest_float("x", -3, 3)
        trial.set_user_attr("candidates", "[" + ",".join(["0.5"] * 200) + "]")
        study.tell(trial, (x - 1) ** 2)
    print("done", flush=True)
""")


def test_dashboard_reads_while_a_writer_adds_trials(served):
    _, base, run_dir = served
    writes = 60
    writer = subprocess.Popen([sys.executable, "-c", WRITER, run_study(run_dir)[0], str(writes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    statuses, counts = [], []
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        while writer.poll() is None:
            for path in ("/api/studies", "/api/studies/1"):
                try:
                    status, body = get_json(base + path)
                except urllib.error.HTTPError as err:  # a 500 is what a lock error in a view becomes
                    status, body = err.code, {}
                statuses.append(status)
                if "trials" in body:
                    counts.append(len(body["trials"]))
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    print(f"{len(statuses)} dashboard requests while the writer added {writes} trials")
    assert writer.returncode == 0 and "done" in out, err
    assert "locked" not in err.lower()
    assert len(statuses) >= 20, "the dashboard was hardly polled while the writer ran"
    assert set(statuses) == {200}
    # optuna-dashboard caches a study's trials for up to 10 s (_storage.get_trials): a writer faster than
    # that is seen only afterwards, so keep reading until the last write shows
    deadline = time.monotonic() + 15
    while counts[-1] != 5 + writes and time.monotonic() < deadline:
        time.sleep(0.5)
        counts.append(len(get_json(f"{base}/api/studies/1")[1]["trials"]))
    assert counts == sorted(counts) and counts[-1] > counts[0]  # it saw the study grow, never shrink
    assert counts[-1] == 5 + writes
