"""Where the screen's Optuna study lives: any SQLAlchemy URL, or an Optuna journal file.

- `sqlite:///<file>` (the default, `<run dir>/study.db`): one writer and many readers on one machine.
- `postgresql://…`, `mysql://…`: many concurrent writers (a multi-node cluster, several runs).
- `journal:<file>`: Optuna's JournalStorage, an append-only log with file locks; no database server,
  and it works on a shared NFS directory where SQLite's locking does not.

The URL is written to run.json, so a password in it must be a reference to an environment variable,
`postgresql://user:${DB_PASSWORD}@host/db`, expanded only when the storage is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator.errors import UserError

JOURNAL = "journal:"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SQLITE_BUSY_TIMEOUT_S = 60  # a reader waits out the writer's commit instead of failing with "database is locked"


def check_url(url: str) -> None:
    """Refuse a storage URL that cannot work, at config time (one line naming screen.storage)."""
    if url.startswith(JOURNAL):
        if not url[len(JOURNAL):].strip():
            raise UserError("screen.storage: 'journal:' needs a file path; use e.g. journal:/shared/lora-search/study.log")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        password = make_url(url).password
    except ArgumentError:
        raise UserError(f"screen.storage: {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///study.db, "
                        "postgresql://user@host/db or journal:study.log, or null for the run's study.db") from None
    if password is not None and not ENV_REFERENCE.fullmatch(str(password)):
        raise UserError("screen.storage: the URL holds a literal password, which would be written to run.json; "
                        "reference an environment variable instead, e.g. postgresql://user:${DB_PASSWORD}@host/db")


def _expanded(url: str) -> str:
    """The URL with every ${NAME} replaced by that environment variable (only ever in memory)."""
    def value(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise UserError(f"screen.storage: environment variable {match.group(1)} is not set; export it before the run")
        return os.environ[match.group(1)]

    return ENV_REFERENCE.sub(value, url)


def open_storage(url: str, *, create: bool):
    """An Optuna storage for `url`. create=False (readers such as the dashboard) never makes files or tables."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):]).expanduser()
        if not create and not path.is_file():
            raise UserError(f"screen.storage: journal file '{path}' does not exist; check the run's storage URL")
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock (O_EXCL lock file) works on NFS; the default symlink lock does not everywhere.
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    engine_kwargs = {}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if not create and path and path != ":memory:" and not path.startswith("file:") and not Path(path).is_file():
            raise UserError(f"screen.storage: SQLite file '{path}' does not exist; check the run's storage URL")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    resolved = _expanded(url)
    try:
        return optuna.storages.RDBStorage(resolved, engine_kwargs=engine_kwargs, skip_compatibility_check=not create,
                                          skip_table_creation=not create)
    except Exception as err:  # bad URL, missing driver, unreachable database
        raise UserError(f"screen.storage: cannot open '{shown_url(url)}' "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if url.startswith(JOURNAL):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"
