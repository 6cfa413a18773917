"""Pickles are never unpickled: checkpoints load with `weights_only=True`, model weights only from safetensors.

The bomb (tests/reliability/_support.py) is a pickle whose loading calls `open(marker, "w")`: a harmless
stand-in for arbitrary code. Each test first proves its bomb is live, then that the code refuses it and
the marker never appears. The adapter registry's loader is tested by its own engineer (tests/test_registry.py).
"""

from __future__ import annotations

import ast
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UserError

from ._support import write_bomb

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch_save_zip", "raw_pickle"])
def test_bomb_is_live(tmp_path, torch_format):
    """Control: without weights_only the bomb goes off (so the refusals below are not vacuous)."""
    marker = tmp_path / "PWNED"
    path = write_bomb(tmp_path / "train_state.pt", marker, torch_format=torch_format)
    loaded = torch.load(path, weights_only=False) if torch_format else pickle.loads(path.read_bytes())
    loaded["state"].close()
    assert marker.exists()


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch_save_zip", "raw_pickle"])
def test_checkpoint_bomb_refused_by_weights_only_load(tmp_path, torch_format):
    """The call train._restore makes: torch.load(path, weights_only=True)."""
    marker = tmp_path / "PWNED"
    path = write_bomb(tmp_path / "train_state.pt", marker, torch_format=torch_format)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()


class _Checkpoint:
    """What ray.train.Checkpoint offers _restore: as_directory()."""

    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def as_directory(self):
        yield str(self.path)


def _restore(checkpoint, optimizer, scheduler):
    """train._restore with the real checkpoint, optimizer and scheduler and empty stand-ins for the model side
    (its signature keeps growing: peft_model, shortcut_set, adapted, ...)."""
    import inspect
    from types import SimpleNamespace

    from orchestrator import train

    given = {"checkpoint": checkpoint, "optimizer": optimizer, "scheduler": scheduler, "peft_model": None,
             "shortcut_set": None}
    # an Adapted without extras, whose adapter weights load (train.Adapted.load) is not under test here
    nothing = SimpleNamespace(peft_model=None, shortcuts=None, dynamic=None, load=lambda path: None)
    return train._restore(**{name: given.get(name, nothing) for name in inspect.signature(train._restore).parameters})


def _checkpoint_dir(root: Path, marker: Path) -> Path:
    from safetensors.torch import save_file

    root.mkdir()
    save_file({"lora_A": torch.zeros(2, 2)}, root / "adapter_model.safetensors")
    write_bomb(root / "train_state.pt", marker)
    return root


def test_train_restore_refuses_a_bomb_checkpoint(tmp_path, monkeypatch):
    """The real resume path: a poisoned train_state.pt next to a valid adapter is refused and never runs."""
    import peft

    marker = tmp_path / "PWNED"
    checkpoint = _Checkpoint(_checkpoint_dir(tmp_path / "ckpt", marker))
    monkeypatch.setattr(peft, "set_peft_model_state_dict", lambda model, state: None)  # no PEFT model needed here
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(pickle.UnpicklingError):
        _restore(checkpoint, optimizer, scheduler)
    assert not marker.exists()


def test_real_train_state_loads_with_weights_only(tmp_path, monkeypatch):
    """The safe load does not break resume: what _report_with_checkpoint saves loads back under weights_only."""
    import json

    import peft

    from orchestrator import train

    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = train._linear_warmup_decay(optimizer, 10, 0.1)
    layer(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    root = tmp_path / "ckpt"
    root.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, root / "adapter_model.safetensors")
    history = [{"epoch": 1, "accuracy": 0.5}]
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epochs_done": 1,
                "elapsed": 2.5, "history": json.dumps(history)}, root / train.TRAIN_STATE)
    monkeypatch.setattr(peft, "set_peft_model_state_dict", lambda model, state: None)
    fresh = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    assert _restore(_Checkpoint(root), fresh, train._linear_warmup_decay(fresh, 10, 0.1)) == (1, 2.5, history)


def test_model_dir_with_only_a_pickle_bin_is_refused_unloaded(tmp_path, tiny_model_dir):
    from orchestrator.models import load_model

    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(Path(tiny_model_dir) / name, model_dir / name)
    write_bomb(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(UserError, match=r"^model.name: .* has no \*\.safetensors weights; convert .* refused for safety\)$"):
        load_model(str(model_dir), 2)
    assert not marker.exists()


def test_pickle_bin_next_to_safetensors_is_never_read(tmp_path, tiny_model_dir):
    """transformers prefers safetensors, and load_model forces use_safetensors=True: the .bin is ignored."""
    from orchestrator.models import load_model

    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_bomb(model_dir / "pytorch_model.bin", marker)
    model = load_model(str(model_dir), 2)
    assert model.config.num_labels == 2
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unsafe_loader_in_the_code():
    """Every torch.load passes weights_only=True; no pickle/joblib/dill loads; no use_safetensors=False or
    trust_remote_code=True anywhere in orchestrator/."""
    problems = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, func in _calls(tree):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
                if keywords.get("weights_only") != "True":
                    problems.append(f"{where}: {func}(...) without weights_only=True")
            if func in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "dill.loads", "cloudpickle.load",
                        "cloudpickle.loads", "torch.jit.load", "pd.read_pickle", "pandas.read_pickle"):
                problems.append(f"{where}: {func}(...) unpickles")
            if func in ("numpy.load", "np.load") and keywords.get("allow_pickle", "False") != "False":
                problems.append(f"{where}: {func}(...) with allow_pickle")
            if keywords.get("use_safetensors") == "False" or keywords.get("trust_remote_code") == "True":
                problems.append(f"{where}: {func}(...) {keywords}")
    assert not problems, problems
