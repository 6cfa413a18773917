"""Every shipped search space loads, names its own run command, and describes a space that can be met."""

from pathlib import Path

import pytest

from orchestrator.allocators import make_budget, space_modules
from orchestrator.config import load_config

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_the_expected_spaces_ship():
    names = {p.stem for p in SPACES}
    assert {"quickstart", "heterolora_static", "heterolora_dynamic", "full_space", "sms_spam", "reuters_r8",
            "newsgroups_tight_budget", "sparse_adapters"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_space_loads_and_is_feasible(path, real_units):
    cfg = load_config(path)
    assert f"lora-search run search_spaces/{path.name}" in path.read_text().split("\n\n")[0]  # header names the command
    searchable = space_modules(real_units, cfg.space)
    budget = make_budget(real_units, cfg.space)
    assert searchable and budget.low <= budget.target <= budget.high


@pytest.fixture(scope="module")
def real_units():
    """MiniLM-L6's modules and every shortcut site (the packaged model loads in a second, offline)."""
    from orchestrator.allocation import searchable_units
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.shortcuts import KINDS

    base = load_model("minilm-l6", 2)
    return searchable_units(base, adaptable_modules(base), KINDS)
