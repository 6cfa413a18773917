"""validate-proxies' measurement: rank agreement and top-k hits in the screen's direction, and how many allocations
the space can give."""

import pandas as pd
import pytest

from orchestrator.errors import UserError
from orchestrator.validate import agreement, check_drawn


def _table(accuracies, scores):
    return pd.DataFrame({"candidate_id": [f"c{i}" for i in range(len(accuracies))], "budget": "budget",
                         "accuracy": accuracies, "proxy_p": scores})


def test_a_perfect_proxy_hits_every_top_model_even_with_fewer_models_than_k():
    row = agreement(_table([0.5, 0.6, 0.7], [1.0, 2.0, 3.0]), ["p"], top_k=4).iloc[0]
    assert row.spearman_rho == pytest.approx(1.0) and row.top_k == 3 and row.top_k_hit_rate == 1.0


def test_top_k_is_taken_in_the_screens_direction():
    """A proxy that ranks backwards finds every top model for a `direction: minimize` screen (which keeps its lowest
    scores): the hit rate must say so, as ρ's sign does."""
    table = _table([0.4, 0.5, 0.6, 0.7, 0.8], [5.0, 4.0, 3.0, 2.0, 1.0])
    maximise, minimise = (agreement(table, ["p"], top_k=2, sign=sign).iloc[0] for sign in (1.0, -1.0))
    assert maximise.spearman_rho == pytest.approx(-1.0) and maximise.top_k_hit_rate == 0.0
    assert minimise.top_k_hit_rate == 1.0


def test_too_few_distinct_allocations_in_the_band_are_refused_and_fewer_than_asked_are_named(capsys):
    with pytest.raises(UserError, match=r"^--n: the space holds only 2 distinct allocations inside the budget band "
                                        r"\(--n 20 asked\), too few to rank; widen space.budget.tolerance"):
        check_drawn(2, 20)
    check_drawn(5, 20)
    assert "the space holds 5 distinct allocations inside the budget band; training those, not 20" in capsys.readouterr().out
    check_drawn(20, 20)
    assert capsys.readouterr().out == ""
