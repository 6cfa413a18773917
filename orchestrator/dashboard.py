"""optuna-dashboard for a run's screen study, bound to 127.0.0.1 unless told otherwise.

The study lives in `screen.storage` from the run's run.json, else `sqlite:///<run dir>/study.db`.
A search may be writing the SQLite file while the dashboard reads it. SQLite allows one writer and
many readers in its default (rollback-journal) mode; a reader that meets the writer's commit waits
for it (busy timeout) instead of failing with "database is locked". The file's journal mode is left
alone: WAL is unsafe on network file systems, where multi-node results may live.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref import simple_server
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from orchestrator.errors import UserError
from orchestrator.storage import open_storage, run_study, shown_url

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _ThreadedWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # Ctrl-C does not wait for open browser connections


class _ThreadedWSGIServer6(_ThreadedWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the browser polls every few seconds: no access log
        pass


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded WSGI server of optuna-dashboard on the run's study; call serve_forever() / shutdown()."""
    if not 0 <= port <= 65535:  # socket.bind would raise OverflowError
        raise UserError(f"--port: {port} is not a TCP port; give one from 1 to 65535 (0 picks a free one)")
    url, study = run_study(run_dir)
    storage = open_storage(url, create=False)
    from optuna_dashboard import wsgi  # after the checks: its import takes seconds (scikit-learn), an error should not

    server_class = _ThreadedWSGIServer6 if ":" in host else _ThreadedWSGIServer
    try:
        server = simple_server.make_server(host, port, wsgi(storage), server_class=server_class, handler_class=_QuietHandler)
    except OSError as err:
        raise UserError(f"--port/--host: cannot listen on {host}:{port} ({err.strerror or err}); "
                        "pick a free port with --port") from None
    server.storage, server.storage_url, server.study_name = storage, url, study
    return server


def study_path(storage, study: str) -> str:
    """The dashboard page of the run's screen study, or the study list when it is not there (yet)."""
    try:
        return f"/dashboard/studies/{storage.get_study_id_from_name(study)}"
    except Exception:  # KeyError when the study is missing; anything else: just show the list
        return "/dashboard"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until Ctrl-C."""
    server = make_server(run_dir, host, port)  # first: a refused port or run directory is the only line printed
    bound_host, bound_port = server.server_address[:2]
    if host not in LOCAL_HOSTS:
        print(f"warning: binding the dashboard to {host}: anyone who can reach port {bound_port} can read, rename and "
              "delete studies (it has no authentication); prefer 127.0.0.1 and an SSH tunnel", file=sys.stderr)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"optuna-dashboard for {run_dir} ({shown_url(server.storage_url)}) at "
          f"http://{shown}:{bound_port}{study_path(server.storage, server.study_name)}", flush=True)
    print("Ctrl-C to stop.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
