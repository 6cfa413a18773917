"""Adapter registry: versioned, checksummed, safetensors-only storage of trained adapters.

Layout under the root (default `results/registry`):

    registry.db                      SQLite (WAL): table `entries` (one row per name and version) and a
                                     cache of base-model hashes keyed by path, mtime and size
    <name>/v<version>/               adapter_config.json + the weights, safetensors only:
        adapter_model.safetensors        fp32 or fp16 (a plain PEFT adapter file), or
        adapter_model.int8.safetensors   int8: `<key>.qweight` (int8) + fp32 scales, one per rank channel,
                                         for every 2-D lora_A/lora_B weight: `<key>.scale` per row
                                         (lora_A, r × in), `<key>.col_scale` per column (lora_B, out × r;
                                         files written before per-column scales hold `.scale` per row);
                                         the other tensors (the classifier head) in fp16. Named apart on
                                         purpose: PEFT must not load it as if it were a plain adapter.

Every entry records its task, base model id and the SHA-256 of the base model's config.json and weights, the
allocation, metrics, parent version, precision, a current flag (at most one per name) and the SHA-256
of every stored file. `load` checks all of them before it builds a model. Versions of a name only
go up: a removed version keeps its row (marked removed, files deleted), so its number is never reused, and a
version folder no row names (a database restored from a backup) is skipped, never overwritten.

Nothing half-done is ever visible: files are written to a staging directory inside the root and
renamed into place inside the same write transaction that records them; any error rolls both back.
Pickled weights (`.bin`, `.pt`, ...) are refused and never opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import struct
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.config import REGISTRY_DB, is_adapter_name
from orchestrator.errors import UserError
from orchestrator.shortcuts import SPECS_FILE as SHORTCUT_SPECS, WEIGHTS_FILE as SHORTCUT_WEIGHTS

SHORTCUT_FILES = (SHORTCUT_SPECS, SHORTCUT_WEIGHTS)  # an allocation's shortcut connections, beside the PEFT adapter

DEFAULT_ROOT = Path("results") / "registry"
PRECISIONS = ("fp32", "fp16", "int8")
STALE_STAGING_S = 3600  # a staging copy this old was left by a killed `add` (Registry._staging)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
INT8_WEIGHTS_FILE = "adapter_model.int8.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FP16_MAX = 65504.0
_LORA_WEIGHT = re.compile(r"\.lora_[AB](\.|$)")  # PEFT LoRA `.lora_A.weight`, AdaLoRA `.lora_A` (no `.weight`)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    task TEXT NOT NULL,
    base_model TEXT NOT NULL,
    base_model_sha256 TEXT NOT NULL,
    allocation TEXT NOT NULL,
    metrics TEXT NOT NULL,
    parent_version INTEGER,
    created_at TEXT NOT NULL,
    precision TEXT NOT NULL CHECK (precision IN ('fp32', 'fp16', 'int8')),
    is_current INTEGER NOT NULL DEFAULT 0,
    files TEXT NOT NULL,
    source TEXT,
    removed_at TEXT,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_per_name ON entries (name) WHERE is_current = 1;
CREATE TABLE IF NOT EXISTS base_model_hashes (
    path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    """One stored adapter version."""

    name: str
    version: int
    task: str
    base_model: str
    base_model_sha256: str
    allocation: str
    metrics: dict
    parent_version: int | None
    created_at: str
    precision: str
    current: bool
    files: dict  # file name → SHA-256
    source: str | None
    path: Path  # root/<name>/v<version>

    @property
    def weights_file(self) -> str:
        return INT8_WEIGHTS_FILE if self.precision == "int8" else WEIGHTS_FILE

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files if (self.path / f).is_file())

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


# ---------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_files(base_model: str) -> list[Path]:
    """The base model's config.json, then its weights: model.safetensors, else every *.safetensors (sharded), sorted."""
    from orchestrator.models import resolve_model_path

    path = resolve_model_path(base_model)
    single = path / "model.safetensors"
    return [path / "config.json"] + ([single] if single.is_file() else sorted(path.glob("*.safetensors")))


def base_model_id(base_model: str) -> str:
    """What an entry records: a packaged name as is, a directory as an absolute path."""
    from orchestrator.models import PACKAGED_MODELS

    return base_model if base_model in PACKAGED_MODELS else str(Path(base_model).expanduser().resolve())


# ---------------------------------------------------------------- precision: encode / decode


def quantise_int8(weight, per_row: bool = True):
    """Symmetric int8, one fp32 scale per row (per_row) or per column: w ≈ q · scale, |w − q · scale| ≤ scale / 2
    (elementwise, with the scale of the element's row or column)."""
    import torch

    w = weight.detach().to(torch.float64)
    scale = w.abs().amax(dim=1 if per_row else 0, keepdim=True) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), scale.flatten().to(torch.float32).contiguous()


def dequantise_int8(q, scale, per_row: bool = True):
    import torch

    scale = scale.to(torch.float32)
    return (q.to(torch.float32) * (scale[:, None] if per_row else scale[None, :])).contiguous()


def encode(tensors: dict, precision: str) -> tuple[str, bytes]:
    """A PEFT adapter state dict → (file name, safetensors bytes) at the given storage precision."""
    import torch
    from safetensors.torch import save

    if precision not in PRECISIONS:
        raise UserError(f"precision: '{precision}' is unknown; use one of {', '.join(PRECISIONS)}")
    stored = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point() or precision == "fp32":
            stored[key] = tensor.contiguous()
        elif precision == "int8" and tensor.ndim == 2 and _LORA_WEIGHT.search(key):
            # one scale per channel of the shorter axis, the rank: per row, lora_B (out × r) would carry `out` fp32
            # scales, more bytes than its int8 values at low rank
            per_row = tensor.shape[0] <= tensor.shape[1]
            scale_key = f"{key}.scale" if per_row else f"{key}.col_scale"
            stored[f"{key}.qweight"], stored[scale_key] = quantise_int8(tensor, per_row)
        else:
            if tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
                raise UserError(f"precision: tensor '{key}' has values beyond the fp16 range (±65504); "
                                "store this adapter as fp32")
            stored[key] = tensor.to(torch.float16).contiguous()
    name = INT8_WEIGHTS_FILE if precision == "int8" else WEIGHTS_FILE
    return name, _sorted_metadata(save(stored, metadata={"format": "pt", "lora_search_precision": precision}))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's __metadata__ sorted. safetensors 0.8 writes it in hash-map order, which
    changes from call to call: the same tensors gave other bytes, and add_from_run's already-stored check (a SHA-256)
    missed an fp16 or int8 copy about every other time. Only the order changes: same length, same offsets."""
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].rstrip(b" ")
    parsed = json.loads(header)
    parsed["__metadata__"] = dict(sorted((parsed.get("__metadata__") or {}).items()))
    canonical = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    return data[:8] + canonical + data[8 + len(canonical):] if len(canonical) == len(header) else data


def decode(data: bytes, precision: str) -> dict:
    """Stored safetensors bytes → a plain fp32 PEFT adapter state dict (int8 dequantised)."""
    import torch
    from safetensors.torch import load

    stored = load(data)
    tensors = {}
    for key, tensor in stored.items():
        if key.endswith((".scale", ".col_scale")) and precision == "int8":
            continue
        if key.endswith(".qweight") and precision == "int8":
            base = key[: -len(".qweight")]
            per_row = f"{base}.scale" in stored  # lora_A; lora_B too in files written before per-column scales
            if not per_row and f"{base}.col_scale" not in stored:
                raise UserError(f"registry: int8 weights hold '{key}' without its '.scale' or '.col_scale'; the file is "
                                "damaged: store the adapter again from its fp32 original")
            scale = stored[f"{base}.scale"] if per_row else stored[f"{base}.col_scale"]
            tensors[base] = dequantise_int8(tensor, scale, per_row)
        else:
            tensors[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return tensors


# ---------------------------------------------------------------- reading an adapter directory safely


@dataclass(frozen=True)
class AdapterFiles:
    """What a PEFT adapter directory holds, read once (the bytes that are hashed are the bytes that are used)."""

    config: dict
    config_bytes: bytes
    weights: bytes
    precision: str | None  # fp32 / fp16 / int8 (registry files say so), fp32 when every float is fp32, else None
    tensors: dict  # decoded, fp32
    shortcuts: dict  # shortcuts.json and shortcuts.safetensors → their bytes (stored as they are), or empty


def _header_metadata(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"registry: precision '{precision}' is unknown; use one of {', '.join(PRECISIONS)}")


def stored_weights(adapter: AdapterFiles, precision: str) -> tuple[str, bytes]:
    """(file name, bytes) of the weights the registry stores: an fp32 source stored as fp32 keeps its bytes; anything
    else is encoded from the fp32 tensors."""
    if precision == "fp32" and adapter.precision == "fp32":
        return WEIGHTS_FILE, adapter.weights
    return encode(adapter.tensors, precision)


def names_run(source: str | None, run_dir: Path, tail: str) -> bool:
    """Whether an entry's source (`<run path>:<tail>`) names this run: its path as given or absolute (`registry add
    results/x` from the run's parent finds what the run registered), or a relative one (an entry stored before sources
    were absolute) that resolves to it from here or that its absolute path ends with: the directory it was given from
    is unknown."""
    if not source or not source.endswith(f":{tail}"):
        return False
    text = source[: -len(tail) - 1]
    path, resolved = Path(text), run_dir.resolve()
    if path.is_absolute() or not path.parts:
        return text in (str(resolved), str(run_dir))
    return (Path.cwd() / path).resolve() == resolved or resolved.parts[-len(path.parts):] == path.parts


def _holds(entry: Entry, weights_name: str, digest: str) -> bool:
    """Whether `entry` stores the weights whose encoding hashes to `digest`: its recorded SHA-256 is that, or (an entry
    stored before 2026-12-07, its header's metadata in safetensors' hash-map order) its file, intact, hashes to it with
    the metadata sorted as encode sorts it. The file is read only for an entry whose recorded hash differs."""
    recorded, path = entry.files.get(weights_name), entry.path / weights_name
    if recorded == digest:
        return True
    if recorded is None or not path.is_file():
        return False
    data = path.read_bytes()
    return sha256_bytes(data) == recorded and sha256_bytes(_sorted_metadata(data)) == digest


def _read_stored(source_dir: str | Path, precision: str) -> tuple[AdapterFiles, tuple[str, bytes]]:
    """The adapter directory read, and its weights as the registry stores them at `precision`."""
    adapter = read_adapter_dir(source_dir)
    return adapter, stored_weights(adapter, precision)


def read_adapter_dir(source_dir: str | Path) -> AdapterFiles:
    """Config and weights of a PEFT adapter directory, safetensors only.

    Only `adapter_config.json` and `adapter_model.safetensors` (or a registry int8 file) are read; a
    directory whose weights are a pickle (`.bin`, `.pt`, ...) is refused without opening it, and a
    pickle renamed to `.safetensors` fails the safetensors parser, which never executes anything.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    from orchestrator.routing import CONFIG_FILE as ROUTED_CONFIG, WEIGHTS_FILE as ROUTED_WEIGHTS

    source = Path(source_dir)
    if not source.is_dir():
        raise UserError(f"registry: adapter directory '{source}' not found; give a directory holding "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE} (e.g. results/<run>/adapters/<candidate_id>)")
    if (source / ROUTED_CONFIG).is_file() or (source / ROUTED_WEIGHTS).is_file():  # no save_pretrained can fix this one
        raise UserError(f"registry: '{source}' holds routed experts ({ROUTED_CONFIG}), which the registry cannot store "
                        f"(it stores PEFT adapters); load them with orchestrator.routing.load_routed(base_model, "
                        f"'{source}'), or store another candidate of the run (--candidate)")
    weights = next((source / n for n in (WEIGHTS_FILE, INT8_WEIGHTS_FILE) if (source / n).is_file()), None)
    if weights is None:
        pickles = sorted(p.name for p in source.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"registry: '{source}' holds pickled weights ({', '.join(pickles)}), not {WEIGHTS_FILE}; "
                            "pickles can run code when loaded and are refused: re-save the adapter with "
                            "save_pretrained(..., safe_serialization=True)")
        raise UserError(f"registry: '{source}' has no {WEIGHTS_FILE}; give a PEFT adapter directory saved with "
                        "save_pretrained(..., safe_serialization=True)")
    if not (source / CONFIG_FILE).is_file():
        raise UserError(f"registry: '{source}' has no {CONFIG_FILE}; save the adapter with PEFT's save_pretrained")
    config_bytes = (source / CONFIG_FILE).read_bytes()
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"registry: '{source / CONFIG_FILE}' is not valid JSON; re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"registry: '{source / CONFIG_FILE}' is not a PEFT adapter config (no peft_type); "
                        "re-save the adapter with save_pretrained")
    data = weights.read_bytes()
    try:
        raw = load(data)
        metadata = _header_metadata(data)
    except (SafetensorError, ValueError, struct.error) as err:
        raise UserError(f"registry: '{weights}' is not a valid safetensors file ({str(err).splitlines()[0][:120]}); "
                        "re-save the adapter with save_pretrained(..., safe_serialization=True)") from None
    precision = metadata.get("lora_search_precision")
    if weights.name == INT8_WEIGHTS_FILE and precision != "int8":
        raise UserError(f"registry: '{weights}' does not say it is int8; re-export the adapter from the registry")
    if precision not in PRECISIONS:
        floats = [t.dtype for t in raw.values() if t.is_floating_point()]
        precision = "fp32" if all(d == torch.float32 for d in floats) else None
    if not raw:
        raise UserError(f"registry: '{weights}' holds no tensors; save a trained adapter")
    return AdapterFiles(config, config_bytes, data, precision, decode(data, precision or "fp32"), _read_shortcuts(source))


def _read_shortcuts(source: Path) -> dict[str, bytes]:
    """The shortcut files of an adapter directory (both or none), checked: the specs parse, the weights are
    safetensors. Without them a stored shortcut model would load as a different model."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from orchestrator.shortcuts import read_specs

    present = [name for name in SHORTCUT_FILES if (source / name).is_file()]
    if not present:
        return {}
    if len(present) == 1:
        raise UserError(f"registry: '{source}' holds {present[0]} without its partner ({', '.join(SHORTCUT_FILES)}); "
                        "save the shortcuts with save_shortcuts, which writes both")
    read_specs(source)
    files = {name: (source / name).read_bytes() for name in SHORTCUT_FILES}
    try:
        load(files[SHORTCUT_WEIGHTS])
    except (SafetensorError, ValueError) as err:
        raise UserError(f"registry: '{source / SHORTCUT_WEIGHTS}' is not a valid safetensors file "
                        f"({str(err).splitlines()[0][:120]}); save the shortcuts again with save_shortcuts") from None
    return files


def allocation_from_config(config: dict, shortcuts_dir: str | Path | None = None) -> str:
    """Compact allocation (`L0.query:8,...`) from an adapter config's target_modules and rank_pattern, and the
    shortcuts saved in `shortcuts_dir`, if given."""
    from orchestrator.report import compact_allocation
    from orchestrator.shortcuts import read_specs

    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return targets
    patterns = {re.sub(r"\\(.)", r"\1", k): v for k, v in (config.get("rank_pattern") or {}).items()}
    ranks = {name: int(patterns.get(name, config.get("r", 8))) for name in targets}
    if shortcuts_dir is not None:
        ranks |= {spec.name: spec.rank for spec in read_specs(shortcuts_dir)[0]}
    return compact_allocation(ranks)


def num_labels_of(tensors: dict) -> int:
    """The label count, from the head's last layer: transformers calls it `classifier` in every sequence classifier
    (DistilBERT's pre_classifier and DeBERTa's pooler come before it)."""
    heads = [t.shape[0] for k, t in tensors.items() if ".classifier." in k and k.endswith("weight") and t.ndim == 2]
    if heads:
        return int(min(heads))  # classifier.weight, or out_proj of a two-layer head
    raise UserError("registry: the adapter has no classifier head (modules_to_save); "
                    "store adapters trained by lora-search or saved with modules_to_save=['classifier']")


# ---------------------------------------------------------------- the registry


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime())


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not is_adapter_name(name):
        raise UserError(f"registry: '{name}' is not a valid adapter name; use letters, digits, '-', '_' and '.' "
                        f"(no slashes, not starting with {REGISTRY_DB}), e.g. rotten_tomatoes")
    return name


def _safe_name(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.") or "adapter"
    return _check_name(cleaned[:100])


class Registry:
    """Versioned adapter store rooted at a directory. Every failing call raises UserError and changes nothing."""

    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)
        self.db_path = self.root / REGISTRY_DB

    # -------------------------------------------------------- plumbing

    def _open(self, create: bool) -> sqlite3.Connection | None:
        """registry.db; None when there is none and not `create`: a command that finds no registry makes none."""
        fix = "point --root at a registry directory you can write, e.g. results/registry"
        try:
            if self.root.exists() and not self.root.is_dir():
                raise UserError(f"registry --root: '{self.root}' is not a directory; {fix}")
            if not create and not self.db_path.is_file():
                return None
            self.root.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as err:
            reason = getattr(err, "strerror", None) or err
            raise UserError(f"registry --root: cannot open '{self.root}' ({reason}); {fix}") from None

    @contextlib.contextmanager
    def _connect(self, write: bool, create: bool = False):
        """A connection, None when there is no registry and not `create`; `write` takes the database's write lock
        (BEGIN IMMEDIATE) and commits at the end."""
        conn = self._open(create)
        if conn is None:
            yield None
            return
        try:
            try:
                conn.row_factory = sqlite3.Row
                self._init(conn)
                if write:
                    conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as err:
                raise self._db_error(err) from None
            if write:
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                yield conn
        except sqlite3.DatabaseError as err:  # locked, or a damaged file ("database disk image is malformed")
            raise self._db_error(err) from None
        finally:
            conn.close()

    @staticmethod
    def _init(conn) -> None:
        """WAL mode and the schema. Switching a new database to WAL fails at once (no busy wait) while
        another connection does the same, so that one step retries."""
        for attempt in range(200):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 199:
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)

    def _db_error(self, err: sqlite3.DatabaseError) -> UserError:
        if "locked" in str(err) or "busy" in str(err):
            return UserError(f"registry: {self.db_path} stayed locked by another process for 30 s; try again when it is done")
        if any(word in str(err) for word in ("disk is full", "I/O error", "readonly")):  # the file is fine, the disk not
            return UserError(f"registry: {self.db_path} cannot be written ({err}); free disk space or fix permissions, "
                             "then run the command again")
        return UserError(f"registry: {self.db_path} cannot be used ({err}); restore it from a backup or point --root "
                         "at another directory")

    def _entry(self, row: sqlite3.Row) -> Entry:
        return Entry(name=row["name"], version=row["version"], task=row["task"], base_model=row["base_model"],
                     base_model_sha256=row["base_model_sha256"], allocation=row["allocation"],
                     metrics=json.loads(row["metrics"]), parent_version=row["parent_version"],
                     created_at=row["created_at"], precision=row["precision"], current=bool(row["is_current"]),
                     files=json.loads(row["files"]), source=row["source"],
                     path=self.root / row["name"] / f"v{row['version']}")

    def _rows(self, conn, name: str) -> list[sqlite3.Row]:
        if conn is None:
            return []
        return conn.execute("SELECT * FROM entries WHERE name = ? AND removed_at IS NULL ORDER BY version",
                            (name,)).fetchall()

    def _pick(self, conn, name: str, version: int | None) -> sqlite3.Row:
        """The live row of name/version; version None → the current one (else the latest)."""
        _check_name(name)
        rows = self._rows(conn, name)
        if not rows:
            raise UserError(f"registry: no adapter named '{name}' in {self.root}; "
                            f"see `lora-search registry list --root {self.root}`")
        if version is None:
            return next((r for r in rows if r["is_current"]), rows[-1])
        for row in rows:
            if row["version"] == version:
                return row
        live = ", ".join(f"v{r['version']}" for r in rows)
        raise UserError(f"registry: '{name}' has no version {version} (it has {live}); pick one of those")

    def _base_hash(self, conn, files: list[Path]) -> str:
        """SHA-256 of the base model's weight files, cached in the database by path, mtime and size."""
        parts = []
        for path in files:
            stat = path.stat()
            key = str(path.resolve())
            row = conn.execute("SELECT sha256 FROM base_model_hashes WHERE path = ? AND mtime_ns = ? AND size = ?",
                               (key, stat.st_mtime_ns, stat.st_size)).fetchone()
            digest = row["sha256"] if row else sha256_file(path)
            if row is None:
                conn.execute("INSERT OR REPLACE INTO base_model_hashes VALUES (?, ?, ?, ?)",
                             (key, stat.st_mtime_ns, stat.st_size, digest))
            parts.append((path.name, digest))
        if len(parts) == 1:
            return parts[0][1]
        return sha256_bytes("\n".join(f"{n}:{d}" for n, d in parts).encode())

    def base_model_hashes(self, base_model: str) -> tuple[str, str]:
        """(SHA-256 of config.json and weights, as `add` records it; of the weights alone, as entries stored before
        2026-12-07 recorded it: such an entry still loads, with its base model's config.json unchecked)."""
        files = base_model_files(base_model)  # a missing model is refused before any registry is created
        with self._connect(write=True, create=True) as conn:
            return self._base_hash(conn, files), self._base_hash(conn, files[1:])

    def _staging(self) -> Path:
        """A fresh directory on the root's file system (so that os.replace into place is atomic). An add stages for
        seconds: what is older than STALE_STAGING_S was left by a killed one, a whole adapter copy each."""
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        for left in staging.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another add moved its copy into place, or removed it
                if time.time() - left.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(left, ignore_errors=True)
        path = Path(tempfile.mkdtemp(dir=staging))
        path.chmod(0o755)  # mkdtemp makes 0700; stored versions are as readable as any other result
        return path

    # -------------------------------------------------------- writing

    def add(self, name: str, source_dir: str | Path, task: str, base_model: str, allocation: str | dict | None = None,
            metrics: dict | None = None, precision: str = "fp32", *, parent_version: int | None = None,
            promote: bool = True, source: str | None = None, _read: tuple | None = None) -> Entry:
        """Store the adapter in `source_dir` as the next version of `name` (current unless promote=False).

        parent_version defaults to the version that was current when this one was added. `_read` is add_from_run's
        (AdapterFiles, stored_weights) of `source_dir` at `precision`: read and encoded (quantised) once, not twice.
        """
        _check_name(name)
        _check_precision(precision)
        adapter, (weights_name, weights) = _read or _read_stored(source_dir, precision)
        # a trial load (a fraction of a second even for the packaged model): an adapter without a classifier head,
        # trained on another base model or naming modules it lacks is refused now, not when it is loaded
        peft_model_from_tensors(base_model, adapter.config_bytes, adapter.tensors, adapter.shortcuts, f"'{source_dir}'")
        if isinstance(allocation, dict):
            from orchestrator.report import compact_allocation

            allocation = compact_allocation(allocation)
        allocation = allocation or allocation_from_config(adapter.config, source_dir if adapter.shortcuts else None)
        stored = {CONFIG_FILE: adapter.config_bytes, weights_name: weights} | adapter.shortcuts  # shortcuts fp32: small
        record = {"task": str(task), "base_model": base_model_id(base_model),
                  # hashed (once per file version) before taking the write lock
                  "base_model_sha256": self.base_model_hashes(base_model)[0], "allocation": allocation,
                  "metrics": json.dumps(metrics or {}, sort_keys=True, default=float), "precision": precision,
                  "files": json.dumps({file: sha256_bytes(data) for file, data in stored.items()}),
                  "source": source or str(Path(source_dir))}
        try:
            return self._entry(self._store(name, stored, record, parent_version, promote))
        except OSError as err:  # disk full or not writable: whatever was staged is gone again
            raise UserError(f"registry: could not write to '{self.root}' ({err.strerror or err}); free disk space or "
                            "fix permissions, then run the command again") from None

    def _store(self, name: str, files: dict[str, bytes], record: dict, parent_version: int | None,
               promote: bool) -> sqlite3.Row:
        """Stage `files`, then in one write transaction number the version, insert its row (`record` with version,
        lineage and current flag) and rename the files into place; any error takes both back."""
        staged, target = self._staging(), None
        try:
            for file, data in files.items():
                (staged / file).write_bytes(data)
            for path in staged.iterdir():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            with self._connect(write=True, create=True) as conn:
                top = conn.execute("SELECT MAX(version) FROM entries WHERE name = ?", (name,)).fetchone()[0]
                # past any folder no row names too (a registry.db restored from a backup): its files are kept
                version = max(top or 0, self._top_folder(name)) + 1
                current = conn.execute("SELECT version FROM entries WHERE name = ? AND is_current = 1",
                                       (name,)).fetchone()
                make_current = promote or current is None
                if make_current:
                    conn.execute("UPDATE entries SET is_current = 0 WHERE name = ?", (name,))
                parent = parent_version if parent_version is not None else (current[0] if current else None)
                record = record | {"name": name, "version": version, "parent_version": parent, "created_at": _now(),
                                   "is_current": int(make_current)}
                conn.execute(f"INSERT INTO entries ({', '.join(record)}) VALUES ({', '.join('?' * len(record))})",
                             tuple(record.values()))
                row = conn.execute("SELECT * FROM entries WHERE name = ? AND version = ?", (name, version)).fetchone()
                folder = self.root / name / f"v{version}"
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, folder)
                target = folder  # from here on, a failed commit must take the files out again
        except BaseException:
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return row

    def _top_folder(self, name: str) -> int:
        """The highest N of the <name>/v<N> folders under the root, 0 without any."""
        found = (re.fullmatch(r"v([0-9]+)", path.name) for path in (self.root / name).glob("v*"))
        return max((int(match.group(1)) for match in found if match), default=0)

    def add_from_run(self, run_dir: str | Path, candidate_id: str | None = None, *, name: str | None = None,
                     precision: str = "fp32", promote: bool = True) -> Entry:
        """Store a finished run's adapter: `candidate_id`, or the report's best searched model (best_candidate)."""
        run_dir = Path(run_dir)
        _check_precision(precision)  # before the weights are encoded at it
        row, run = best_candidate(run_dir, candidate_id, ("config.name", "config.data.task", "config.model.name"))
        metrics = {k: _plain(row.get(k)) for k in ("accuracy", "f1", "val_accuracy", "eval_loss", "trainable_params",
                                                     "head_params", "seed", "lr", "latency_ms_per_batch", "train_wall_s", "cost_usd")
                   if row.get(k) is not None}
        metrics |= {"candidate_id": row["candidate_id"], "kind": row["kind"], "label": row["label"],
                    "run": run["config"]["name"], "evaluated_at": "fp32"}  # the run's numbers, before storage
        name = name or _safe_name(run.get("task", {}).get("task") or run["config"]["data"]["task"])
        tail = f"{row['candidate_id']}:seed{row.get('seed')}"
        # once per adapter and precision: a resumed run whose run.json missed the first registration finds it here; the
        # weights tell it from a new run of the same name, whose source string is the same. Read and encoded once: add
        # takes them as they are
        read = _read_stored(run_dir / row["adapter_dir"], precision)
        weights_name, weights = read[1]
        digest = sha256_bytes(weights)
        stored = next((e for e in self.list(name) if names_run(e.source, run_dir, tail) and e.precision == precision
                       and _holds(e, weights_name, digest)), None)
        return stored or self.add(name, run_dir / row["adapter_dir"], run["config"]["data"]["task"],
                                  run["config"]["model"]["name"], row["allocation"], metrics, precision, promote=promote,
                                  source=f"{run_dir.resolve()}:{tail}", _read=read)  # absolute: see names_run

    def promote(self, name: str, version: int) -> Entry:
        """Make `version` the current one of `name`."""
        with self._connect(write=True) as conn:
            self._pick(conn, name, version)
            conn.execute("UPDATE entries SET is_current = 0 WHERE name = ?", (name,))
            conn.execute("UPDATE entries SET is_current = 1 WHERE name = ? AND version = ?", (name, version))
            row = conn.execute("SELECT * FROM entries WHERE name = ? AND version = ?", (name, version)).fetchone()
        return self._entry(row)

    def rollback(self, name: str) -> Entry:
        """Make the highest version below the current one current again; later versions are kept."""
        with self._connect(write=True) as conn:
            _check_name(name)
            rows = self._rows(conn, name)
            if not rows:
                raise UserError(f"registry: no adapter named '{name}' in {self.root}; "
                                f"see `lora-search registry list --root {self.root}`")
            current = next((r for r in rows if r["is_current"]), None)
            if current is None:
                raise UserError(f"registry: '{name}' has no current version; make one current with "
                                f"`lora-search registry promote {name} <version>`")
            earlier = [r for r in rows if r["version"] < current["version"]]
            if not earlier:
                raise UserError(f"registry: '{name}' v{current['version']} is its oldest version, there is nothing to "
                                f"roll back to; promote a later version with `lora-search registry promote {name} <version>`")
            target = earlier[-1]["version"]
            conn.execute("UPDATE entries SET is_current = 0 WHERE name = ?", (name,))
            conn.execute("UPDATE entries SET is_current = 1 WHERE name = ? AND version = ?", (name, target))
            row = conn.execute("SELECT * FROM entries WHERE name = ? AND version = ?", (name, target)).fetchone()
        return self._entry(row)

    def remove(self, name: str, version: int) -> None:
        """Delete a version's files; its row stays (marked removed) so the number is never reused.

        The current version can only be removed when it is the last one left.
        """
        with self._connect(write=True) as conn:
            row = self._pick(conn, name, version)
            others = [r for r in self._rows(conn, name) if r["version"] != version]
            if row["is_current"] and others:
                raise UserError(f"registry: '{name}' v{version} is the current version; make another current first "
                                f"(`lora-search registry rollback {name}` or `promote {name} <version>`), then remove it")
            conn.execute("UPDATE entries SET removed_at = ?, is_current = 0 WHERE name = ? AND version = ?",
                         (_now(), name, version))
        # Only after the commit: a crash before it keeps the version whole, one after it leaves files no live row
        # names (the number is never reused, so nothing reads them).
        shutil.rmtree(self.root / name / f"v{version}", ignore_errors=True)

    # -------------------------------------------------------- reading

    def list(self, name: str | None = None) -> list[Entry]:
        with self._connect(write=False) as conn:
            if conn is None:
                return []
            if name is None:
                rows = conn.execute("SELECT * FROM entries WHERE removed_at IS NULL ORDER BY name, version").fetchall()
            else:
                rows = self._rows(conn, _check_name(name))
        return [self._entry(r) for r in rows]

    def show(self, name: str, version: int | None = None) -> Entry:
        """An entry; version None → the current version."""
        with self._connect(write=False) as conn:
            return self._entry(self._pick(conn, name, version))

    def verified_files(self, name: str, version: int | None = None) -> tuple[Entry, dict[str, bytes]]:
        """The entry and its files' bytes, each checked against its recorded SHA-256."""
        entry = self.show(name, version)
        contents = {}
        for file, expected in entry.files.items():
            path = entry.path / file
            if not path.is_file():
                raise UserError(f"registry: {entry.name} v{entry.version} is missing {file}; restore it from an export "
                                f"or remove the version (`lora-search registry remove {entry.name} {entry.version}`)")
            data = path.read_bytes()
            digest = sha256_bytes(data)
            if digest != expected:
                raise UserError(f"registry: {entry.name} v{entry.version} {file} is corrupt or was modified (SHA-256 "
                                f"{digest[:12]}… ≠ recorded {expected[:12]}…); restore it from an export or remove the "
                                f"version (`lora-search registry remove {entry.name} {entry.version}`)")
            contents[file] = data
        return entry, contents

    def verify(self, name: str, version: int | None = None) -> Entry:
        return self.verified_files(name, version)[0]

    def export(self, name: str, version: int | None, out_dir: str | Path) -> Path:
        """A plain PEFT adapter directory (int8 dequantised to fp32) plus registry_entry.json; checksums checked first."""
        entry, contents = self.verified_files(name, version)
        out = Path(out_dir)
        if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
            raise UserError(f"registry: export target '{out}' exists and is not an empty directory; give a new directory")
        weights = contents[entry.weights_file]
        if entry.precision == "int8":
            from safetensors.torch import save

            weights = save(decode(weights, "int8"), metadata={"format": "pt", "lora_search_precision": "int8-dequantised"})
        from orchestrator.report import replace_dir_atomically

        def write(staged: Path) -> None:
            (staged / CONFIG_FILE).write_bytes(contents[CONFIG_FILE])
            (staged / WEIGHTS_FILE).write_bytes(weights)
            for file in SHORTCUT_FILES:
                if file in contents:
                    (staged / file).write_bytes(contents[file])
            (staged / "registry_entry.json").write_text(json.dumps(entry.to_dict(), indent=1, default=str))

        try:
            replace_dir_atomically(out, write)
        except OSError as err:
            raise UserError(f"registry: cannot export to '{out}' ({err.strerror or err}); give a new directory you "
                            "can write") from None
        return out

    def load(self, name: str, version: int | None = None, base_model: str | None = None):
        """A PeftModel (eval mode) of the stored adapter on `base_model` (default: the recorded one).

        Refuses, with UserError, a stored file whose SHA-256 changed, a base model whose config.json or weights
        differ from the ones the adapter was stored with, and an adapter PEFT cannot load on it.
        """
        entry, contents = self.verified_files(name, version)
        base = base_model if base_model is not None else entry.base_model
        hashes = self.base_model_hashes(str(base))  # the registry exists: verified_files read it
        if entry.base_model_sha256 not in hashes:
            raise UserError(f"registry: base model '{base}' (SHA-256 {hashes[0][:12]}…) is not the one {entry.name} "
                            f"v{entry.version} was stored with ('{entry.base_model}', SHA-256 "
                            f"{entry.base_model_sha256[:12]}…); load it on that model, its config.json and weights as "
                            "they were")
        tensors = decode(contents[entry.weights_file], entry.precision)
        shortcuts = {name: contents[name] for name in SHORTCUT_FILES if name in contents}
        fix = (f"remove it (`lora-search registry remove {entry.name} {entry.version}`) and add it again with the base "
               "model it was trained on")  # an entry stored before `add` tried loading it
        return peft_model_from_tensors(str(base), contents[CONFIG_FILE], tensors, shortcuts,
                                       f"{entry.name} v{entry.version}", fix)


def peft_model_from_tensors(base_model: str, config_bytes: bytes, tensors: dict, shortcuts: dict | None = None,
                            what: str = "the adapter", fix: str = "use the base model it was trained on"):
    """PeftModel.from_pretrained on a private temporary directory holding these tensors as safetensors, with the
    shortcut connections of `shortcuts` (their files' bytes) attached, frozen. A failure is a UserError naming `what`
    and `fix`."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from orchestrator.models import load_model
    from orchestrator.shortcuts import load_shortcuts

    model = load_model(base_model, num_labels=num_labels_of(tensors))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG_FILE).write_bytes(config_bytes)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        for name, data in (shortcuts or {}).items():
            (Path(tmp) / name).write_bytes(data)
        try:
            with warnings.catch_warnings():  # PEFT 0.21's false alarm on every AdaLoRA adapter (README, "reloads")
                warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
                peft_model = PeftModel.from_pretrained(model, tmp)
            if shortcuts:
                load_shortcuts(peft_model, tmp, trainable=False)
        except (ValueError, RuntimeError, KeyError, TypeError) as err:  # PEFT's and torch's, many lines each
            reason = " ".join(str(err).split())[:240] or type(err).__name__
            raise UserError(f"registry: {what} does not load on base model '{base_model}' ({reason}); it was likely "
                            "trained on another base model, or its adapter_config.json names modules this one lacks; "
                            f"{fix}") from None
    return peft_model.eval()


# ---------------------------------------------------------------- runs


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def best_candidate(run_dir: Path, candidate_id: str | None = None, run_keys: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(report row, run.json) of `candidate_id`, or of the report's best searched model (best mean over seeds of
    accuracy, or of validation accuracy where the run held some out): its best seed. A run.json without one of
    `run_keys` (dotted: what the caller reads) is refused with a UserError naming it."""
    import pandas as pd

    from orchestrator.report import DYNAMIC, load as load_report, ranked, read_run_json, selection_order

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"registry: '{run_dir}' has no run.json; give a finished run directory, e.g. results/quickstart")
    run = read_run_json(run_dir, *run_keys)
    table = load_report(run_dir)
    usable = table[table.adapter_dir.notna() & table.accuracy.notna()]
    dynamic = usable.candidate_id.astype(str).str.startswith(DYNAMIC)
    storable = usable[(usable.kind != "routed") & ~dynamic]
    if candidate_id is not None:
        rows = usable[usable.candidate_id == candidate_id]  # a routed one too: read_adapter_dir says how to load it
        if rows.empty:
            raise UserError(f"registry: candidate '{candidate_id}' has no trained adapter in {run_dir}; "
                            f"choose one of {', '.join(sorted(storable.candidate_id.unique()))}")
        if candidate_id.startswith(DYNAMIC):
            raise UserError(f"registry: candidate '{candidate_id}' is a dynamic model: its adapter carries the top rank "
                            "on every searched module, masked to the allocation it ended on, so its stored allocation "
                            f"and size would be wrong; store its static twin '{candidate_id[len(DYNAMIC):]}', or train "
                            "its final_allocation (report.csv) in a run of its own")
    else:
        rows = storable[storable.kind == "searched"]
        if rows.empty:
            raise UserError(f"registry: {run_dir} has no trained searched candidate; pass --candidate with a baseline id")
        rows = rows[rows.candidate_id == ranked(rows)[0]]  # the best model, then its best seed
    best = rows.sort_values(selection_order(rows) + ["f1"], ascending=False, kind="stable").iloc[0]
    return {k: (None if (not isinstance(v, (list, dict)) and pd.isna(v)) else v) for k, v in best.to_dict().items()}, run


def quantisation_report(run_dir: str | Path, candidate_id: str | None = None,
                        precisions: tuple[str, ...] = PRECISIONS, device: str | None = None):
    """Per storage precision: weights files' size and accuracy/F1 on the run's eval split, change vs fp32.

    The adapter is encoded exactly as the registry stores it, decoded back, loaded with
    PeftModel.from_pretrained and evaluated with orchestrator.train.evaluate on the eval split the
    run used (orchestrator.data.load_task on run.json's data config).
    """
    import pandas as pd
    import torch

    from orchestrator.config import DataConfig, build
    from orchestrator.data import load_task, make_loader
    from orchestrator.models import load_tokenizer
    from orchestrator.train import evaluate

    run_dir = Path(run_dir)
    row, run = best_candidate(run_dir, candidate_id, ("config.data.task", "config.model.name", "config.model.max_length",
                                                      "config.train.eval_batch_size"))
    cfg = run["config"]
    adapter = read_adapter_dir(run_dir / row["adapter_dir"])
    reference, config_bytes = adapter.tensors, adapter.config_bytes

    task = load_task(build(DataConfig, cfg["data"], "data."))
    tokenizer = load_tokenizer(cfg["model"]["name"])
    loader = make_loader(task.eval, tokenizer, cfg["model"]["max_length"], cfg["train"]["eval_batch_size"], shuffle=False)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    rows = []
    for precision in precisions:
        name, blob = encode(reference, precision)
        size = len(blob) + len(adapter.shortcuts.get(SHORTCUT_WEIGHTS, b""))  # as the registry stores it: shortcuts fp32
        tensors = decode(blob, precision)
        error = max(float((tensors[k] - reference[k]).abs().max()) for k in reference if reference[k].is_floating_point())
        model = peft_model_from_tensors(cfg["model"]["name"], config_bytes, tensors, adapter.shortcuts,
                                        f"'{run_dir / row['adapter_dir']}'").to(device)
        metrics = evaluate(model, loader, device)
        rows.append({"precision": precision, "weights_file": name, "size_bytes": size,
                     "accuracy": metrics["accuracy"], "f1": metrics["f1"], "eval_loss": metrics["eval_loss"],
                     "max_abs_weight_error": error})
        del model
    table = pd.DataFrame(rows)
    fp32 = table.loc[table.precision == "fp32"]
    base_acc = float(fp32.accuracy.iloc[0]) if not fp32.empty else float("nan")
    base_size = float(fp32.size_bytes.iloc[0]) if not fp32.empty else float("nan")
    table.insert(3, "size_vs_fp32", table.size_bytes / base_size)
    table["accuracy_change_pts"] = 100 * (table.accuracy - base_acc)
    table.attrs = {"run_dir": str(run_dir), "candidate_id": row["candidate_id"], "label": row["label"],
                   "report_accuracy": row.get("accuracy"), "eval_examples": len(task.eval), "device": device.type}
    return table


def write_quantisation_report(table, out_dir: str | Path) -> list[Path]:
    """quantisation.csv and quantisation.md in out_dir (atomic writes)."""
    from orchestrator.report import write_atomic

    out_dir = Path(out_dir)
    a = table.attrs
    md = [f"# Low-precision adapter storage: {a.get('candidate_id')} ({a.get('label')})", "",
          f"Run `{a.get('run_dir')}`, {a.get('eval_examples')} eval examples, evaluated on {a.get('device')}; "
          f"accuracy in the run's report: {a.get('report_accuracy')}. Size is the weights files on disk: the adapter's, "
          "and shortcuts.safetensors (fp32 at every precision) where it has shortcut connections "
          "(adapter_config.json and shortcuts.json, the same for all, are not counted). int8: symmetric "
          "quantisation of lora_A/lora_B with one fp32 scale per rank channel (per row of lora_A, per column of "
          "lora_B), other tensors fp16.", "",
          table.to_markdown(index=False, floatfmt=".4g"), ""]
    csv_path, md_path = out_dir / "quantisation.csv", out_dir / "quantisation.md"
    write_atomic(csv_path, lambda p: table.to_csv(p, index=False))
    write_atomic(md_path, lambda p: Path(p).write_text("\n".join(md), encoding="utf-8"))
    return [csv_path, md_path]
