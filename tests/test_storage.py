"""The screen's Optuna study storage: SQLAlchemy URLs and Optuna journal files, for writers and readers."""

import re
from pathlib import Path

import optuna
import pytest

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.storage import (check_run_storage, check_storage_path, check_study_storage, check_url, filesystem,
                                  open_storage, publish_run, run_storage, run_study, shown_url, study_name)


@pytest.mark.parametrize("url", ["sqlite:////data/study.db", "postgresql://user:${DB_PASSWORD}@db.example/lora",
                                 "postgresql://user@db.example/lora?password=${DB_PASSWORD}", "journal:/shared/runs/study.log"])
def test_valid_urls_pass(url):
    check_url(url)
    assert load_config(None, [f"screen.storage={url}"]).screen.storage == url


@pytest.mark.parametrize("url, stored", [("sqlite:///rel.db?timeout=3", "sqlite:///{cwd}/rel.db?timeout=3"),
                                         ("sqlite:///sub/${DB_NAME}.db", "sqlite:///{cwd}/sub/${DB_NAME}.db"),
                                         ("journal:rel.log", "journal:{cwd}/rel.log"),
                                         ("sqlite:////abs/study.db", "sqlite:////abs/study.db"),
                                         ("sqlite:///${DB_DIR}/study.db", "sqlite:///${DB_DIR}/study.db"),
                                         ("journal:~/study.log", "journal:~/study.log"),
                                         ("postgresql://user@db.example/lora", "postgresql://user@db.example/lora")])
def test_a_relative_study_file_is_stored_absolute(url, stored, tmp_path, monkeypatch):
    """run.json keeps the URL: the dashboard, warm starts and --resume, run from elsewhere, must open the same file."""
    monkeypatch.chdir(tmp_path)
    assert load_config(None, [f"screen.storage={url}"]).screen.storage == stored.replace("{cwd}", str(tmp_path))


def test_a_relative_sqlite_study_is_found_from_another_directory(tmp_path, monkeypatch):
    from orchestrator.pipeline import write_run_json

    (tmp_path / "a?b%20").mkdir()
    monkeypatch.chdir(tmp_path / "a?b%20")  # escaped in the URL, not a query or an escape
    cfg = load_config(None, [f"results_dir={tmp_path}/results", "screen.storage=sqlite:///rel.db"])
    cfg.run_dir.mkdir(parents=True)
    write_run_json(cfg)
    url, name = run_study(cfg.run_dir)
    optuna.create_study(study_name=name, storage=open_storage(url, create=True))
    monkeypatch.chdir(tmp_path)
    assert (tmp_path / "a?b%20" / "rel.db").is_file()
    assert optuna.load_study(study_name=name, storage=open_storage(run_study(cfg.run_dir)[0], create=False))


def test_a_percent_encoded_sqlite_url_is_read_where_it_was_written(tmp_path):
    """SQLAlchemy decodes '%20' to a space; the reader's does-it-exist check must look at that same file."""
    (tmp_path / "sp ace").mkdir()
    url = f"sqlite:///{tmp_path}/sp%20ace/enc.db"
    optuna.create_study(study_name="screen", storage=open_storage(url, create=True))
    assert (tmp_path / "sp ace" / "enc.db").is_file()
    assert optuna.load_study(study_name="screen", storage=open_storage(url, create=False))


@pytest.mark.parametrize("folder", ["what?", "p%20c", "s p#@:"])
def test_the_default_study_stays_in_the_run_directory_whatever_its_path(folder, tmp_path):
    from orchestrator.pipeline import write_run_json
    from orchestrator.screen import storage_url

    cfg = load_config(None, [f"results_dir={tmp_path / folder}"])
    cfg.run_dir.mkdir(parents=True)
    write_run_json(cfg)
    optuna.create_study(study_name="screen", storage=open_storage(storage_url(cfg), create=True))
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["run.json", "study.db"] and len(list(tmp_path.iterdir())) == 1
    url, name = run_study(cfg.run_dir)  # what the dashboard and a warm start open
    assert url == storage_url(cfg) and optuna.load_study(study_name=name, storage=open_storage(url, create=False))


@pytest.mark.parametrize("url, message", [("journal:", "needs a file path"), ("journal:  ", "needs a file path"),
                                          ("my study db", "is not a SQLAlchemy URL"),
                                          ("postgresql://user:hunter2@db/lora", "literal password.*DB_PASSWORD"),
                                          ("postgresql://user@db/lora?password=hunter2", "literal password"),
                                          ("mysql+pymysql://user@db/lora?passwd=hunter2", "literal password"),
                                          ("sqlite://", "in-memory SQLite"), ("sqlite:///:memory:", "in-memory SQLite"),
                                          ("sqlite:///file:m?mode=memory&uri=true", "in-memory SQLite")])
def test_bad_urls_name_the_field(url, message):
    with pytest.raises(UserError, match=f"^screen.storage: .*{message}"):
        check_url(url)


@pytest.mark.parametrize("url", ["postgresql://alice@db.example:port/optuna", "postgresql://alice@db.example:${DB_PORT}/optuna",
                                 "postgresql://alice:hunter2@db.example:port/optuna"])
def test_a_port_that_is_not_a_number_is_one_line_without_the_password(url):
    with pytest.raises(UserError, match=r"^screen.storage: the URL's port is not a number; give digits") as err:
        load_config(None, [f"screen.storage={url}"])
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("password", ["p@ss/word", "100%41x", "a?b#c:d&e"])
def test_a_password_from_the_environment_stays_the_password_whatever_its_characters(password, monkeypatch):
    from sqlalchemy.engine import make_url

    from orchestrator.storage import _expanded

    monkeypatch.setenv("DB_PASSWORD", password)
    for url in ("postgresql://alice:${DB_PASSWORD}@db.example:5432/optuna",
                "postgresql://alice@db.example:5432/optuna?password=${DB_PASSWORD}"):
        check_url(url)
        parsed = make_url(_expanded(url))
        assert (parsed.host, parsed.port, parsed.database) == ("db.example", 5432, "optuna")
        assert (parsed.password or parsed.query["password"]) == password


def test_a_journal_path_expands_environment_references_when_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = load_config(None, ["screen.storage=journal:${SHARED}/study.log"]).screen.storage
    assert url == "journal:${SHARED}/study.log"  # kept as written, like sqlite:///${DB_DIR}/...
    with pytest.raises(UserError, match="^screen.storage: environment variable SHARED is not set"):
        open_storage(url, create=True)
    monkeypatch.setenv("SHARED", str(tmp_path / "shared"))
    optuna.create_study(study_name="screen", storage=open_storage(url, create=True))
    assert [p.name for p in tmp_path.iterdir()] == ["shared"] and (tmp_path / "shared" / "study.log").is_file()
    assert optuna.load_study(study_name="screen", storage=open_storage(url, create=False))


def test_bad_url_in_config_is_refused_at_load_time():
    with pytest.raises(UserError, match="^screen.storage: 'my study db' is not a SQLAlchemy URL"):
        load_config(None, ["screen.storage=my study db"])


def test_password_reference_is_kept_in_run_json_and_expanded_only_on_open(tmp_path, monkeypatch):
    from orchestrator.pipeline import write_run_json

    cfg = load_config(None, [f"results_dir={tmp_path}", "screen.storage=sqlite:///${DB_DIR}/study.db"])
    cfg.run_dir.mkdir(parents=True)
    write_run_json(cfg)
    assert "${DB_DIR}" in (cfg.run_dir / "run.json").read_text()
    with pytest.raises(UserError, match="^screen.storage: environment variable DB_DIR is not set"):
        open_storage(cfg.screen.storage, create=True)
    monkeypatch.setenv("DB_DIR", str(tmp_path))
    optuna.create_study(study_name="screen", storage=open_storage(cfg.screen.storage, create=True))
    assert (tmp_path / "study.db").is_file() and f"sqlite:///{tmp_path}" not in (cfg.run_dir / "run.json").read_text()


def test_each_run_has_its_own_study_in_a_shared_storage(tmp_path):
    from orchestrator.pipeline import write_run_json

    assert study_name("a", None) == "screen"  # the run's own study.db holds one study
    assert study_name("a", "journal:x.log") != study_name("b", "journal:x.log")
    cfg = load_config(None, [f"results_dir={tmp_path}", "name=exp1", f"screen.storage=journal:{tmp_path}/shared.log"])
    cfg.run_dir.mkdir(parents=True)
    write_run_json(cfg)
    assert run_study(cfg.run_dir)[1] == "screen-exp1"  # what the dashboard and a warm start read back


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_new_run_does_not_write_into_an_earlier_runs_study(kind, tmp_path):
    url = f"journal:{tmp_path}/shared.log" if kind == "journal" else f"sqlite:///{tmp_path}/shared.db"
    runs = tmp_path / "results"
    check_study_storage(url, runs / "exp1", resume=False)
    optuna.create_study(study_name=study_name("exp1", url), storage=open_storage(url, create=True))
    check_study_storage(url, runs / "exp2", resume=False)  # another run beside it
    check_study_storage(url, runs / "exp1", resume=True)
    held = "^screen.storage: .* already holds the study 'screen-exp1' of an earlier run named 'exp1'"
    with pytest.raises(UserError, match=held + f", whose run directory '{runs / 'exp1'}' is gone; choose another name "
                                              r"\(name=...\), or delete that study \(optuna.delete_study"):
        check_study_storage(url, runs / "exp1", resume=False)  # --resume would find no run directory to continue
    # (an existing run without --resume never gets here: pipeline.check_run_dir refuses it first)


def test_a_journal_in_a_folder_that_cannot_be_made_or_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^screen.storage: cannot open the journal .*\(Not a directory\); use a writable file path$"):
        check_study_storage(f"journal:{tmp_path}/file/sub/study.log", tmp_path / "exp", resume=False)
    with pytest.raises(UserError, match=f"^screen.storage: journal path '{tmp_path}' is a directory; give a file in it"):
        check_study_storage(f"journal:{tmp_path}", tmp_path / "exp", resume=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_password_is_hidden_in_messages():
    # only the password goes: the user, host, port and database say which storage a message is about
    assert shown_url("postgresql://user:hunter2@db.example/lora") == "postgresql://user:***@db.example/lora"
    assert shown_url("postgresql+psycopg2://user:${DB_PASSWORD}@db.example:5432/lora") == \
        "postgresql+psycopg2://user:***@db.example:5432/lora"
    assert shown_url("journal:/shared/study.log") == "journal:/shared/study.log"  # no password to hide


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_reader_never_creates_and_writer_round_trips(kind, tmp_path):
    url = f"journal:{tmp_path}/study.log" if kind == "journal" else f"sqlite:///{tmp_path}/study.db"
    with pytest.raises(UserError, match="does not exist"):
        open_storage(url, create=False)
    assert list(tmp_path.iterdir()) == []
    study = optuna.create_study(study_name="screen", storage=open_storage(url, create=True))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    reread = optuna.load_study(study_name="screen", storage=open_storage(url, create=False))
    assert [t.value for t in reread.trials] == [t.value for t in study.trials]


@pytest.mark.parametrize("sampler, cls, objectives", [("tpe", "TPESampler", 1), ("random", "RandomSampler", 1),
                                                      ("cmaes", "CmaEsSampler", 1), ("nsga2", "NSGAIISampler", 2)])
def test_each_sampler_drives_the_study(sampler, cls, objectives, tmp_path):
    from orchestrator.allocators import distribution_space
    from orchestrator.screen import _searcher

    cfg = load_config(None, [f"results_dir={tmp_path}", f"screen.sampler={sampler}", "screen.direction=minimize"])
    cfg.run_dir.mkdir(parents=True)
    searcher = _searcher(cfg, [])
    searcher.set_search_properties(None, None, distribution_space(cfg.space, cfg.space.ranks))
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        assert 0 <= config["w_query"] <= 1 and config["max_rank"] in cfg.space.ranks
        searcher.on_trial_complete(f"t{i}", {"objective": config["w_query"], "params": 1000.0 + i})
    study = optuna.load_study(study_name="screen", storage=f"sqlite:///{cfg.run_dir / 'study.db'}")
    assert type(searcher._ot_study.sampler).__name__ == cls
    assert len(study.directions) == objectives and study.directions[0] == optuna.study.StudyDirection.MINIMIZE
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


@pytest.mark.slow
def test_tune_screen_writes_a_journal_study(tmp_path, run_tiny_screens):
    """The real Tune + OptunaSearch screen on a local Ray cluster, with the study in a journal file."""
    journal = tmp_path / "shared" / "study.log"
    [(cfg, screen, _)] = run_tiny_screens(["name=journal", "space.ranks=[2,4]", "screen.proxies=[params]",
                                        "screen.rank_by=params", "screen.num_trials=3", "screen.candidates_per_trial=4",
                                        f"screen.storage=journal:{journal}", "screen.sampler=nsga2"])
    study = optuna.load_study(study_name="screen-journal", storage=open_storage(f"journal:{journal}", create=False))
    # a trial whose distribution drew nothing inside the budget reports nan and is kept as FAIL, not lost
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert all(len(t.values) == 2 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert not (cfg.run_dir / "study.db").exists()
    assert screen.survivor.sum() == cfg.screen.survivors and len(screen) > 1


def test_a_nan_screen_trial_is_recorded_as_failed_not_left_running(tmp_path):
    from ray import tune

    from orchestrator.screen import RecordingOptunaSearch

    url = f"sqlite:///{tmp_path}/study.db"
    searcher = RecordingOptunaSearch(space={"x": tune.uniform(0, 1)}, metric="objective", mode="max",
                                     study_name="screen", storage=open_storage(url, create=True))
    for trial_id, value in (("a", 0.5), ("b", float("nan"))):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"objective": value})
    states = [t.state for t in optuna.load_study(study_name="screen", storage=url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def test_tunes_pickled_searcher_keeps_the_password_reference_not_the_password(tmp_path, monkeypatch):
    """Tune pickles the searcher, and its storage, into the run's and storage_path's experiment state: that copy keeps
    ${DB_PASSWORD} as written (before, the expanded password), and a resumed searcher expands it again."""
    import pickle

    from ray import tune

    from orchestrator.screen import RecordingOptunaSearch

    monkeypatch.setenv("DB_PASSWORD", "hunter2-secret")
    url = f"sqlite:///{tmp_path}/study.db?password=${{DB_PASSWORD}}"
    searcher = RecordingOptunaSearch(space={"x": tune.uniform(0, 1)}, metric="objective", mode="max",
                                     study_name="screen", storage=open_storage(url, create=True))
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"objective": 0.5})
    searcher.save(str(tmp_path / "searcher.pkl"))
    saved = (tmp_path / "searcher.pkl").read_bytes()
    assert b"hunter2" not in saved and b"${DB_PASSWORD}" in saved
    assert b"hunter2" not in pickle.dumps(searcher)
    restored = pickle.loads(pickle.dumps(open_storage(url, create=True)))
    assert "hunter2-secret" in restored.url and len(optuna.load_study(study_name="screen", storage=restored).trials) == 1


# ---------------------------------------------------------------- Ray's storage_path


def test_a_local_storage_path_ray_cannot_create_is_one_line_before_anything_is_written(tmp_path):
    """Tune failed with a framed traceback after the run directory, run.json and the study existed."""
    (tmp_path / "file").write_text("")
    for value, problem in ((tmp_path / "file" / "ray", f"lies below the file '{tmp_path / 'file'}'"),
                           (f"file://{tmp_path}/file", "exists and is not a directory"),
                           (f"FILE://{tmp_path}/file/ray", f"lies below the file '{tmp_path / 'file'}'")):
        with pytest.raises(UserError, match=f"^storage_path: '{re.escape(str(value).split('://')[-1])}' "
                                            f"{re.escape(problem)}; give a writable directory every node mounts"):
            load_config(None, [f"results_dir={tmp_path}", f"storage_path={value}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_only_an_object_store_path_is_checked_for_its_bucket(tmp_path, monkeypatch):
    """hdfs:// and an upper-case FILE:/// give pyarrow paths with no bucket part: they were refused as "bucket ''"."""
    import pyarrow.fs

    from orchestrator import storage

    check_run_storage(f"FILE://{tmp_path}/ray", tmp_path / "results" / "run", resume=False)
    # pyarrow's HDFS needs libhdfs, absent here: its from_uri gives the absolute path inside the cluster
    monkeypatch.setattr(storage, "filesystem", lambda location: (pyarrow.fs.LocalFileSystem(), f"{tmp_path}/user/run"))
    check_run_storage("hdfs://namenode:8020/user", tmp_path / "results" / "run", resume=False)


def test_a_folder_that_cannot_be_entered_is_looked_past_not_a_traceback(tmp_path, monkeypatch):
    """Path.exists() raises PermissionError below a folder this user cannot enter (mode 700, another owner)."""
    from orchestrator.config import nearest_existing

    locked = tmp_path / "locked"
    locked.mkdir()
    exists = Path.exists

    def exists_unless_locked(path):
        if locked in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path)

    monkeypatch.setattr(Path, "exists", exists_unless_locked)
    assert nearest_existing(locked / "inner" / "ray") == locked
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != locked)
    with pytest.raises(UserError, match=rf"^storage_path: '{locked}/inner/ray' cannot be created: '{locked}' is not "):
        check_storage_path(f"{locked}/inner/ray", tmp_path / "results" / "run")


def test_an_unwritable_storage_path_parent_is_refused(tmp_path, monkeypatch):
    """As a user without write access to /mnt (a share not mounted); root may write anywhere, so os.access says."""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=rf"^storage_path: '{tmp_path}/shared/ray' cannot be created: '{tmp_path}' is "
                                        r"not writable \(a share not mounted\?\); give a writable directory"):
        check_storage_path(f"{tmp_path}/shared/ray", tmp_path / "results" / "run")


@pytest.mark.parametrize("value", ["/tmp/shared/lora-search", "shared/runs", "s3://bucket/prefix", "gs://bucket",
                                   "file:///tmp/lora", "s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http",
                                   "abfss://container@account.dfs.core.windows.net/prefix"])  # the user is the container
def test_storage_paths_ray_can_use_pass(value):
    check_storage_path(value, Path("results/run"))
    kept = value if "://" in value else str(Path(value).absolute())  # run.json keeps a local path absolute
    assert load_config(None, [f"storage_path={value}"]).storage_path == kept


@pytest.mark.parametrize("value, message", [("ftp://host/dir", "is not a storage Ray can use"),
                                            ("s3:///prefix", "names no bucket"),
                                            ("s3://AKIA:secret@bucket/p", "holds credentials"),
                                            ("s3://bucket/p?access_key=AK&secret_key=SK", "'access_key'.*credential chain"),
                                            ("s3://bucket/p?region=x&session_token=T", "'session_token'"),
                                            ("abfs://acct.blob.core.windows.net/c/p?client_id=c&tenant_id=t&client_secret=TOPSECRET",
                                             "'client_secret'"),
                                            ("abfss://c@acct.dfs.core.windows.net/p?account_key=K", "'account_key'"),
                                            ("abfs://c:K@acct.dfs.core.windows.net/p", "user:password@"),
                                            ("gs://bucket/p?token=T", "'token'"),
                                            ("s3:/bucket/prefix", "'s3:/…' has one slash.*write s3://"),
                                            ("GS:/bucket", "one slash")])
def test_bad_storage_paths_name_the_field(value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^storage_path: .*{message}") as err:
        load_config(None, [f"storage_path={value}"])
    assert not any(secret in str(err.value) for secret in ("AKIA", "TOPSECRET", "=K", "=SK", "=T", ":secret"))
    assert list(tmp_path.iterdir()) == []  # s3:/bucket is not made a local folder


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_storage_path_is_refused_not_taken_as_the_current_directory(value, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"storage_path: '{value}'\n")
    with pytest.raises(UserError, match=f"^storage_path: '{value}' is empty; .* or null"):
        load_config(config)


@pytest.mark.parametrize("results_dir, storage_path", [("runs", "runs"), ("runs", "file://{tmp}/runs"),  # <name> is the run
                                                       ("runs", "runs/run"),  # <name> in the run directory
                                                       ("runs/run/deeper", "runs")])  # the run inside <name>
def test_a_storage_path_overlapping_the_run_directory_is_refused(results_dir, storage_path, tmp_path):
    """publish_run copies the run to <storage_path>/<name>/results: into itself, and again on each resume."""
    overrides = [f"results_dir={tmp_path / results_dir}", f"storage_path={storage_path.format(tmp=tmp_path)}"]
    if "://" not in storage_path:
        overrides[1] = f"storage_path={tmp_path / storage_path}"
    with pytest.raises(UserError, match=r"^storage_path: .* overlaps its run directory .*; use a directory outside results_dir"):
        load_config(None, overrides)
    assert list(tmp_path.iterdir()) == []
    load_config(None, [overrides[0], f"storage_path={tmp_path / 'shared'}"])  # beside the runs


def test_run_storage_puts_the_run_name_before_the_query(tmp_path):
    run_dir = tmp_path / "results" / "qs"
    assert run_storage(None, run_dir, "tune") == str(run_dir.resolve() / "tune")
    assert run_storage(str(tmp_path / "nfs"), run_dir, "train") == str(tmp_path / "nfs" / "qs" / "train")
    assert (run_storage("s3://b/p/?endpoint_override=h:1&scheme=http", run_dir, "tune", "screen")
            == "s3://b/p/qs/tune/screen?endpoint_override=h:1&scheme=http")
    assert run_storage("gs://b", run_dir) == "gs://b/qs"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_new_run_refuses_a_taken_storage_name_and_finished_run_is_copied_there(kind, tmp_path, request):
    run_dir = tmp_path / "results" / "qs"
    run_dir.mkdir(parents=True)
    (run_dir / "report.md").write_text("# report")
    (run_dir / "trials").mkdir()
    (run_dir / "trials" / "a-s0.json").write_text("{}")
    storage = str(tmp_path / "shared") if kind == "local" else request.getfixturevalue("s3_bucket")[0]

    check_run_storage(storage, run_dir, resume=False)  # nothing there yet
    where = publish_run(storage, run_dir)
    fs, path = filesystem(where)
    with fs.open_input_stream(f"{path}/report.md") as copied:
        assert copied.read() == b"# report"
    assert fs.get_file_info(f"{path}/trials/a-s0.json").is_file
    (run_dir / "run.json").write_text("{}")
    with pytest.raises(UserError, match="^storage_path: .* already holds a run named 'qs'; choose another name"):
        check_run_storage(storage, run_dir, resume=False)
    check_run_storage(storage, run_dir, resume=True)  # --resume continues it
    assert publish_run(None, run_dir) is None


def test_a_run_whose_directory_is_gone_is_neither_resumed_nor_restarted_but_told_how(tmp_path):
    """--resume needs the run directory; a fresh start would inherit Ray's checkpoints. Neither error may send the
    user to the other (they did): the way out is the published copy, or deleting the storage."""
    import shutil

    run_dir, storage = tmp_path / "results" / "qs", tmp_path / "shared"
    (storage / "qs" / "tune").mkdir(parents=True)  # Ray's state of a run that never finished a session
    gone = f"^storage_path: '{storage / 'qs'}' holds a run named 'qs' whose run directory '{run_dir}' is gone; "
    for resume in (False, True):
        with pytest.raises(UserError, match=gone + f"delete '{storage / 'qs'}' to start it again, or choose another name"):
            check_run_storage(str(storage), run_dir, resume=resume)
    (storage / "qs" / "results").mkdir()
    (storage / "qs" / "results" / "run.json").write_text("{}")  # a finished session published the run
    with pytest.raises(UserError, match=gone + f"copy '{storage / 'qs'}/results' to '{run_dir}' and pass --resume"):
        check_run_storage(str(storage), run_dir, resume=False)
    shutil.copytree(storage / "qs" / "results", run_dir)
    check_run_storage(str(storage), run_dir, resume=True)


def test_a_gone_run_in_s3_with_a_query_is_told_where_its_published_copy_is(tmp_path, s3_bucket):
    """The published copy's path goes before the ?endpoint_override=… query, in the check and in the message."""
    storage = s3_bucket[0]
    run_dir = tmp_path / "results" / "qs"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    publish_run(storage, run_dir)
    (run_dir / "run.json").unlink()
    run_dir.rmdir()  # the driver's disk is gone
    results = run_storage(storage, run_dir, "results")
    assert results.endswith("/runs/qs/results?" + storage.split("?", 1)[1])
    for resume in (False, True):
        with pytest.raises(UserError, match=f"is gone; copy '{re.escape(results)}' to '{run_dir}' and pass --resume"):
            check_run_storage(storage, run_dir, resume=resume)


@pytest.mark.parametrize("suffix, kind", [(".calibration", "calibration"), (".lr-sweep", "lr-sweep")])
def test_a_new_run_refuses_ray_state_left_by_an_earlier_runs_calibration_or_lr_sweep(suffix, kind, tmp_path):
    run_dir, storage = tmp_path / "results" / "qs", tmp_path / "shared"
    (storage / f"qs{suffix}" / "train").mkdir(parents=True)  # <storage>/qs itself was deleted
    with pytest.raises(UserError, match=f"^storage_path: '{storage / ('qs' + suffix)}' holds Ray's state of an earlier "
                                        f"run named 'qs' \\(its {kind}\\); delete it to start the run again"):
        check_run_storage(str(storage), run_dir, resume=False)


def test_an_unreachable_address_leaves_no_study_storage_behind(tmp_path, tiny_model_dir):
    import socket

    from orchestrator import pipeline

    with socket.socket() as sock:  # free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    cfg = load_config(None, [f"results_dir={tmp_path}/results", f"model.name={tiny_model_dir}", "model.max_length=16",
                             "data.train_size=64", "data.eval_size=32", f"screen.storage=journal:{tmp_path}/new/s.log"])
    with pytest.raises(UserError, match="^--address: cannot reach the Ray cluster"):
        pipeline.run(cfg, address=address)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_storage_is_one_line(tmp_path, fake_aws):
    closed = "s3://bucket/p?endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(UserError, match="^storage_path: cannot read .*check the credentials and the bucket"):
        check_run_storage(closed, tmp_path / "qs", resume=False)
