"""Shared by the reliability tests (imported relatively, so every test sees the same classes)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest


class RayStarted(Exception):
    """Raised by the guards: the run got past validation and was about to start Ray or fetch data."""


class LeftBehind(AssertionError):
    """A refused run left files or directories behind (it should leave the disk as it found it)."""


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`lora-search ARGV` in-process through the real entry point: (exit code, stdout, stderr)."""
    from orchestrator import cli

    monkeypatch.setattr(sys, "argv", ["lora-search", *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, stderr exactly one `error: ` line holding every expected substring, no traceback anywhere."""
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"stderr is not one line: {err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "; " in line, f"no `problem; fix` in {line!r}"
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (directories as None, files with their bytes)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


class _Bomb:
    """Unpickling this object creates `marker` (a harmless stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_bomb(path: Path, marker: Path, *, torch_format: bool = True) -> Path:
    """A file whose unpickling would create `marker`: torch.save's zip format, or a raw pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        import torch

        torch.save({"state": _Bomb(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": _Bomb(marker)}, protocol=2))
    assert not marker.exists()
    return path
