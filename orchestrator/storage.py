"""Where a run's state lives: the screen's Optuna study, and Ray Tune/Train's checkpoints.

The Optuna study (`screen.storage`) is any SQLAlchemy URL, or an Optuna journal file:

- `sqlite:///<file>` (the default, `<run dir>/study.db`): one writer and many readers on one machine.
- `postgresql://…`, `mysql://…`: many concurrent writers (a multi-node cluster, several runs).
- `journal:<file>`: Optuna's JournalStorage, an append-only log with file locks; no database server,
  and it works on a shared NFS directory where SQLite's locking does not.

A relative SQLite or journal file is made absolute when the config is read, so that run.json names one file
from any directory; an in-memory SQLite database is refused (the study would end with the run).

The URL is written to run.json, so a password in it must be a reference to an environment variable,
`postgresql://user:${DB_PASSWORD}@host/db`, expanded only when the storage is opened.

Ray's storage (`storage_path`) holds Tune's experiment state and every TorchTrainer's epoch
checkpoints. Default: the run directory. On several nodes Ray needs one place every node reaches:
an NFS path, or a pyarrow URI such as `s3://bucket/prefix` or `gs://bucket/prefix` (credentials from
each node's environment or instance role, never in the URI). The driver alone writes the run
directory (it copies each finished adapter out of its checkpoint), and a finished run is copied to
`<storage_path>/<name>/results/` so the report outlives a driver pod.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from optuna.storages import RDBStorage

from orchestrator.errors import UserError

JOURNAL = "journal:"
SCREEN_STUDY = "screen"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PASSWORD_PARAMETERS = ("password", "passwd", "pwd")  # query parameters SQLAlchemy's drivers read a password from
SQLITE_BUSY_TIMEOUT_S = 60  # a reader waits out the writer's commit instead of failing with "database is locked"
RAY_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")  # what pyarrow.fs.FileSystem.from_uri opens
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")  # object stores: a path's first part is the bucket (container)
AZURE_SCHEMES = ("abfs", "abfss")  # abfs://<container>@<account>...: the user name is the container, not a credential
# storage URI query keys that carry a secret: client_secret, token, sas_token, access_key, secret_key, account_key, ...
SECRET_QUERY_KEY = re.compile(r"(?:^|_)(?:secret|token|key|password|passwd|pwd)$", re.IGNORECASE)
ONE_SLASH_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):/", re.IGNORECASE)  # s3:/bucket: a URI missing a slash


def check_url(url: str) -> None:
    """Refuse a storage URL that cannot work, at config time (one line naming screen.storage)."""
    if url.startswith(JOURNAL):
        if not url[len(JOURNAL):].strip():
            raise UserError("screen.storage: 'journal:' needs a file path; use e.g. journal:/shared/lora-search/study.log")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"screen.storage: {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///study.db, "
                        "postgresql://user@host/db or journal:study.log, or null for the run's study.db") from None
    except ValueError:  # int() of the port; the URL is not shown, it may hold a literal password
        raise UserError("screen.storage: the URL's port is not a number; give digits, e.g. postgresql://user@host:5432/db "
                        "(a ${NAME} reference cannot stand for the port)") from None
    if any(not ENV_REFERENCE.fullmatch(password) for password in _passwords(parsed)):
        raise UserError("screen.storage: the URL holds a literal password, which would be written to run.json; "
                        "reference an environment variable instead, e.g. postgresql://user:${DB_PASSWORD}@host/db")
    if parsed.get_backend_name() == "sqlite" and (parsed.database in (None, "", ":memory:")
                                                   or parsed.query.get("mode") == "memory"):
        raise UserError(f"screen.storage: {url!r} is an in-memory SQLite database, lost when the run ends (the "
                        "dashboard, warm starts and --resume cannot open it); use a file, e.g. sqlite:///study.db, "
                        "or null for the run's study.db")


def absolute_url(url: str) -> str:
    """`url` with a relative SQLite or journal file made absolute: run.json keeps the URL, and the dashboard, warm
    starts and --resume must open the run's study from any directory."""
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL):]  # a path starting with ${NAME} is known only when opened, as for SQLite below
        return url if path.startswith("${") or Path(path).expanduser().is_absolute() else JOURNAL + str(Path.cwd() / path)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    # a path starting with ${NAME} is known only when opened; the rest of the URL (references, query) is kept verbatim
    if parsed.get_backend_name() != "sqlite" or ":///" not in url or (parsed.database or "/").startswith(("/", "file:", "$")):
        return url
    head, rest = url.split(":///", 1)
    return f"{head}:///{sqlite_url(Path.cwd()).split(':///', 1)[1]}/{rest}"


def sqlite_url(path: Path) -> str:
    """The SQLite URL of the file `path`, escaped: a '?' or '%' in it must not start a query or an escape."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def _passwords(parsed) -> list[str]:
    """The URL's password and every password query parameter (drivers take both: ...@host/db?password=...)."""
    found = [] if parsed.password is None else [str(parsed.password)]
    for key, value in parsed.query.items():
        if key.lower() in PASSWORD_PARAMETERS:
            found += [value] if isinstance(value, str) else list(value)
    return found


def _with_environment(text: str, escape=lambda value, position: value) -> str:
    """`text` with every ${NAME} replaced by that environment variable, passed through escape(value, position of the
    reference) (only ever in memory); an unset variable is a one-line error."""
    def value(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise UserError(f"screen.storage: environment variable {match.group(1)} is not set; export it before the run")
        return escape(os.environ[match.group(1)], match.start())

    return ENV_REFERENCE.sub(value, text)


def _expanded(url: str) -> str:
    """The URL with its ${NAME} references expanded and escaped for where each lands, as SQLAlchemy decodes them: a
    '@', '/', ':' or '%' in a password stays in the password, a '?' or '%' in a file path stays in the path."""
    start = url.find("://") + 3
    host_end = min(i for i in (url.find("/", start), url.find("?", start), len(url)) if i >= 0)
    user_end = url.rfind("@", start, host_end)
    query = url.find("?", host_end)

    def escape(value: str, position: int) -> str:
        if position < user_end or 0 <= query < position:  # user name, password, or a ?password= query value
            return quote(value, safe="")
        return quote(value, safe="/") if position >= host_end else value  # the database path; the host is verbatim

    return _with_environment(url, escape)


def run_study(run_dir: str | Path) -> tuple[str, str]:
    """The run's Optuna storage URL and screen study name; UserError (one line) when `run_dir` holds no run or study."""
    run_dir = Path(run_dir)
    config = _stored_config(run_dir)
    url = config.get("screen", {}).get("storage")
    name = study_name(config.get("name", run_dir.name), url)
    if url:
        return url, name
    db = (run_dir / "study.db").resolve()
    if not db.is_file():
        allocator = config.get("screen", {}).get("allocator", "optuna")
        if allocator != "optuna":  # a score-driven or random screen runs no Optuna study
            raise UserError(f"RUN_DIR: '{run_dir}' screened with screen.allocator={allocator}, which runs no Optuna "
                            "study (only the optuna allocator does); its candidates are in screen.csv")
        raise UserError(f"RUN_DIR: '{run_dir}' has no study.db yet; the screen stage creates it, start the dashboard once it runs")
    return sqlite_url(db), name


def study_name(run_name: str, url: str | None) -> str:
    """The run's screen study: 'screen' in its own study.db, 'screen-<run name>' in a screen.storage that several
    runs may share (Ray's Optuna searcher reuses a study of the same name: two runs would write one study)."""
    return SCREEN_STUDY if url is None else f"{SCREEN_STUDY}-{run_name}"


def _stored_config(run_dir: Path) -> dict:
    """run.json's config ({} for a bare study.db); UserError when `run_dir` holds no run."""
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: '{run_dir}' is not a directory; give a run directory, e.g. results/quickstart")
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        if not (run_dir / "study.db").is_file():
            raise UserError(f"RUN_DIR: '{run_dir}' holds neither run.json nor study.db; give a run directory, e.g. results/quickstart")
        return {}
    try:
        stored = json.loads(run_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        stored = None
    config = stored.get("config") if isinstance(stored, dict) else None
    screen = config.get("screen", {}) if isinstance(config, dict) else None
    if not (isinstance(screen, dict) and isinstance(screen.get("storage"), (str, type(None)))):
        raise UserError(f"RUN_DIR: '{run_json}' is not valid run.json; give the directory of a lora-search run")
    return config


def check_study_storage(url: str | None, run_dir: Path, resume: bool) -> None:
    """Before the run directory exists (pipeline.check_run_dir has refused an existing run without --resume):
    screen.storage opens, and a new run does not write into the study of an earlier run of the same name there, whose
    directory is therefore gone. (The run's own study.db is checked with its directory.)"""
    if url is None or resume:
        return
    study = study_name(run_dir.name, url)
    if study not in {s.study_name for s in open_storage(url, create=True).get_all_studies()}:
        return
    raise UserError(f"screen.storage: '{shown_url(url)}' already holds the study '{study}' of an earlier run named "
                    f"'{run_dir.name}', whose run directory '{run_dir}' is gone; choose another name (name=...), or "
                    f"delete that study (optuna.delete_study(study_name='{study}', storage=...)) to start it again")


def open_storage(url: str, *, create: bool):
    """An Optuna storage for `url`. create=False (readers such as the dashboard) never makes files or tables."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if url.startswith(JOURNAL):
        path = Path(_with_environment(url[len(JOURNAL):])).expanduser()
        if not create and not path.is_file():
            raise UserError(f"screen.storage: journal file '{path}' does not exist; check the run's storage URL")
        if path.is_dir():
            raise UserError(f"screen.storage: journal path '{path}' is a directory; give a file in it, e.g. "
                            f"journal:{path / 'study.log'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The open-lock (O_EXCL lock file) works on NFS; the default symlink lock does not everywhere.
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        except OSError as err:
            raise UserError(f"screen.storage: cannot open the journal '{path}' ({err.strerror or err}); "
                            "use a writable file path") from None
    resolved = _expanded(url)
    engine_kwargs = {}
    if url.startswith("sqlite"):
        path = _sqlite_file(resolved)
        if not create and path and path != ":memory:" and not path.startswith("file:") and not Path(path).is_file():
            raise UserError(f"screen.storage: SQLite file '{path}' does not exist; check the run's storage URL")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    try:
        return ReferencedRDBStorage(url, resolved, engine_kwargs=engine_kwargs, skip_compatibility_check=not create,
                                    skip_table_creation=not create)
    except Exception as err:  # bad URL, missing driver, unreachable database
        raise UserError(f"screen.storage: cannot open '{shown_url(url)}' "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


class ReferencedRDBStorage(RDBStorage):
    """An RDBStorage that is pickled with its URL as written, ${NAME} references unexpanded, and expands them again
    when unpickled: Tune pickles the screen's searcher, and with it this storage, into its experiment state in the
    run directory and in storage_path (a bucket, say), where a password must never land."""

    def __init__(self, reference: str, resolved: str, **kwargs):
        self.reference = reference
        super().__init__(resolved, **kwargs)

    def __getstate__(self) -> dict:
        return super().__getstate__() | {"url": self.reference}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state | {"url": _expanded(state["reference"])})


def _sqlite_file(url: str) -> str | None:
    """The file a SQLite URL opens, decoded as SQLAlchemy decodes it ('%20' is a space); None if it does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).database
    except (ArgumentError, ValueError):
        return None  # RDBStorage names the error


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if url.startswith(JOURNAL):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


# ---------------------------------------------------------------- Ray's storage_path


def check_storage_path(value: str, run_dir: Path) -> None:
    """Refuse, at config time, a storage_path Ray cannot use for the run in `run_dir` (one line naming storage_path)."""
    if not value.strip():  # Path("") is the current directory, not "unset"
        raise UserError(f"storage_path: {value!r} is empty; give a directory or URI, or null to keep Ray's storage in "
                        "the run directory")
    _check_not_one_slash(value)
    if "://" not in value or urlsplit(value).scheme == "file":  # the scheme lower-cased: FILE:// too
        path = urlsplit(value).path if "://" in value else value
        _check_creatable(path)
        return _check_apart_from_run(path, run_dir)
    parts = urlsplit(value)
    if parts.scheme not in RAY_STORAGE_SCHEMES:
        raise UserError(f"storage_path: '{parts.scheme}://' is not a storage Ray can use; use s3://bucket/prefix, "
                        "gs://bucket/prefix, file:///path or a local/NFS path")
    secret = _credentials_in(parts)
    if secret:
        raise UserError(f"storage_path: the URI holds credentials ({secret}), which would be written to run.json; give them "
                        "through the environment or the credential chain (AWS_ACCESS_KEY_ID, AZURE_CLIENT_SECRET, "
                        "GOOGLE_APPLICATION_CREDENTIALS) or the instance role")
    if parts.scheme != "file" and not parts.netloc:
        raise UserError(f"storage_path: '{value}' names no bucket; use e.g. {parts.scheme}://my-bucket/lora-search")


def _check_creatable(path: str) -> None:
    """A local storage_path Ray can make: its nearest existing folder is a folder this user may write in. Otherwise
    Tune fails only after the run directory, run.json and the study exist, with a framed traceback."""
    from orchestrator.config import nearest_existing

    target = Path(path).expanduser().absolute()
    existing = nearest_existing(target)
    if not existing.is_dir():
        problem = "exists and is not a directory" if existing == target else f"lies below the file '{existing}'"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"cannot be created: '{existing}' is not writable (a share not mounted?)"
    else:
        return
    raise UserError(f"storage_path: '{path}' {problem}; give a writable directory every node mounts, or null to keep "
                    "Ray's storage in the run directory")


def _check_not_one_slash(value: str) -> None:
    """`s3:/bucket/prefix` is a mistyped URI, not a local folder named 's3:' (which Ray would silently fill)."""
    one_slash = ONE_SLASH_SCHEME.match(value)
    if one_slash and "://" not in value:
        scheme = one_slash.group(1)
        raise UserError(f"storage_path: '{scheme}:/…' has one slash after '{scheme}:'; write {scheme}://… "
                        "(e.g. s3://bucket/prefix), or a local path that does not start with '<word>:/'")


def _credentials_in(parts) -> str | None:
    """What in the split storage URI is a credential ('user:password@', a ?client_secret=... query key), else None."""
    if parts.password is not None or (parts.username and parts.scheme not in AZURE_SCHEMES):
        return "user:password@"
    keys = [key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if SECRET_QUERY_KEY.search(key)]
    return f"query parameter '{keys[0]}'" if keys else None


def _check_apart_from_run(path: str, run_dir: Path) -> None:
    """<path>/<name> must neither be the run directory nor hold it nor lie in it: publish_run would copy the run into
    itself, and again into that copy on each resume."""
    ours, run = Path(path).expanduser().resolve() / run_dir.name, Path(run_dir).resolve()
    if ours == run or ours in run.parents or run in ours.parents:
        raise UserError(f"storage_path: '{path}' puts this run's Ray storage at '{ours}', which overlaps its run directory "
                        f"'{run}' (the finished run would be copied into itself); use a directory outside results_dir, "
                        "or null to keep Ray's storage in the run directory")


def run_storage(storage_path: str | None, run_dir: Path, *parts: str) -> str:
    """Where Ray keeps this run's `parts` (e.g. "tune"): under the run directory, or <storage_path>/<run name>/."""
    if storage_path is None:
        return str(Path(run_dir).resolve().joinpath(*parts))
    if "://" not in storage_path:
        return str(Path(storage_path).expanduser().resolve().joinpath(run_dir.name, *parts))
    uri = urlsplit(storage_path)  # the sub-path goes before any ?endpoint_override=… query
    return urlunsplit(uri._replace(path="/".join([uri.path.rstrip("/"), run_dir.name, *parts])))


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a storage URI."""
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), location
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except Exception as err:  # unknown bucket options, missing credentials, unreachable endpoint
        raise UserError(f"storage_path: cannot open '{location}' ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def check_run_storage(storage_path: str | None, run_dir: Path, resume: bool) -> None:
    """A new run must not inherit another run's checkpoints in a shared storage_path (Ray would restore them), and a
    run whose directory is gone cannot be resumed from Ray's state alone: say what can be done instead."""
    local = (Path(run_dir) / "run.json").is_file()
    if storage_path is None or (resume and local):
        return
    location = run_storage(storage_path, run_dir)
    if not _holds(storage_path, location):
        _check_no_stale_sub_runs(storage_path, Path(run_dir))
        return
    if not local:  # --resume needs the run directory (results, trials); a finished session published a copy of it
        copy = (f"copy '{run_storage(storage_path, run_dir, 'results')}' to '{run_dir}' and pass --resume to continue "
                "it, " if _holds(storage_path, run_storage(storage_path, run_dir, "results", "run.json")) else "")
        raise UserError(f"storage_path: '{location}' holds a run named '{run_dir.name}' whose run directory '{run_dir}' "
                        f"is gone; {copy}delete '{location}' to start it again, or choose another name (name=...)")
    raise UserError(f"storage_path: '{location}' already holds a run named '{run_dir.name}'; "
                    "choose another name (name=...) or pass --resume to continue it")


def _check_no_stale_sub_runs(storage_path: str, run_dir: Path) -> None:
    """Ray's state of a calibration or lr sweep sits beside the run's (<name>.calibration, <name>.lr-sweep): left
    from an earlier run of this name, its checkpoints would be restored as this run's trainings."""
    from orchestrator.config import CALIBRATION_SUFFIX, LR_SWEEP_SUFFIX

    for suffix in (CALIBRATION_SUFFIX, LR_SWEEP_SUFFIX):
        location = run_storage(storage_path, run_dir.with_name(run_dir.name + suffix))
        if _holds(storage_path, location):
            raise UserError(f"storage_path: '{location}' holds Ray's state of an earlier run named '{run_dir.name}' "
                            f"(its {suffix[1:]}); delete it to start the run again, or choose another name (name=...)")


def _holds(storage_path: str, location: str) -> bool:
    """Whether `location` (in storage_path) exists; a missing bucket or unreadable storage is a one-line error."""
    import pyarrow.fs

    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0] if urlsplit(storage_path).scheme in BUCKET_SCHEMES else None  # not hdfs://, file://
    try:
        if bucket is not None and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise UserError(f"storage_path: bucket '{bucket}' does not exist (or these credentials cannot see it); "
                            "create it or fix the name")
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except OSError as err:
        raise UserError(f"storage_path: cannot read '{location}' ({str(err).splitlines()[0][:200]}); "
                        "check the credentials and the bucket") from None


def publish_run(storage_path: str | None, run_dir: Path) -> str | None:
    """Copy the finished run directory to <storage_path>/<name>/results/; where it went (None: nothing to do)."""
    import pyarrow.fs

    if storage_path is None:
        return None
    location = run_storage(storage_path, run_dir, "results")
    fs, path = filesystem(location)
    try:
        pyarrow.fs.copy_files(str(Path(run_dir).resolve()), path, destination_filesystem=fs)
    except OSError as err:
        raise UserError(f"storage_path: the report is in {run_dir} but copying it to '{location}' failed "
                        f"({str(err).splitlines()[0][:200]}); fix the access and run again with --resume") from None
    return location
