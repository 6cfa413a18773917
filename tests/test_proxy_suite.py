"""The zero-cost proxy suite: registry, finiteness, separation, determinism, no side effects, B = 0.

Fast tests use a tiny random-weight BERT built here (no downloads); the slow test runs every proxy
through the probe on the packaged MiniLM-L6 and prints the seconds each one costs.
"""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.data import Split, make_loader
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, load_model, load_tokenizer
from orchestrator.proxies import PROXIES, Proxy, get_proxy, score_modules
from orchestrator.proxies.grad_norm import lora_factors
from orchestrator.proxies.vote import VoteProxy, normalised_ranks, rank_average

NEW_PROXIES = ["snip", "fisher", "synflow", "grasp", "nwot", "vote"]
PROBE_RANK = 4

WORDS = ("the a movie film story plot actor actors scene scenes music camera was is were are very "
         "quite too not never always good great fine bad awful boring dull funny sad long short slow "
         "fast bright dark warm cold clever silly and but with without it this that of in on i we "
         "they loved hated liked enjoyed watched ending start middle script cast director").split()

SENTENCES = [
    "the movie was very good", "the film was awful", "i loved the music and the cast",
    "we hated the ending", "the plot was boring and slow", "a clever script with a great cast",
    "the actors were fine but the story was dull", "this film is funny", "the camera work was bright",
    "it was too long", "the director never liked the script", "they enjoyed the middle of the film",
    "a sad and dark story", "the scenes were quite short", "i watched it with the cast",
    "the music was warm and the ending was great", "not a good start", "the story is always silly",
    "this movie is cold", "we loved the actors in this film", "the plot was clever",
    "it is a fast and funny movie", "the ending was bad", "they hated this boring movie",
    "i liked the director", "the film was never dull", "a great story with a sad ending",
    "the cast were awful", "this is a very long film", "we enjoyed the music",
    "the scenes were slow but the ending was good", "that movie was quite bad",
]
LABELS = [i % 2 for i in range(len(SENTENCES))]


def bits(model: torch.nn.Module) -> dict[str, bytes]:
    """Bit patterns of every tensor in the state dict (-0.0 ≠ 0.0 here, unlike torch.equal)."""
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def probe(tiny_dir):
    """(PeftModel with a rank-4 adapter on every module, modules, 2 batches of 8)."""
    torch.manual_seed(0)
    base = load_model(str(tiny_dir), 2)
    modules = adaptable_modules(base)
    model = apply_lora(base, Allocation.from_ranks({m.name: PROBE_RANK for m in modules}))
    loader = make_loader(Split(SENTENCES, LABELS), load_tokenizer(str(tiny_dir)), 32, 8, shuffle=True, seed=0)
    return model, modules, list(islice(loader, 2))


def run(name: str, probe, seed: int = 0) -> dict[str, float]:
    model, modules, batches = probe
    torch.manual_seed(seed)  # as the probe does before each proxy
    return get_proxy(name).module_scores(model, batches, modules, PROBE_RANK)


def test_tiny_model_has_twelve_modules(probe):
    _, modules, _ = probe
    assert len(modules) == 12  # 2 layers × (q, k, v, attention out, FFN up, FFN down)


@pytest.mark.parametrize("name", NEW_PROXIES)
def test_registered_and_selectable(name):
    assert name in PROXIES
    proxy = get_proxy(name)
    assert isinstance(proxy, Proxy) and proxy.name == name
    doc = __import__(type(proxy).__module__, fromlist=["_"]).__doc__ or ""
    assert "B = 0" in doc, f"{name}: the module docstring must say how B = 0 is handled"


@pytest.mark.parametrize("name", NEW_PROXIES)
def test_finite_score_for_every_module_and_modules_differ(name, probe):
    _, modules, _ = probe
    scores = run(name, probe)
    assert set(scores) == {m.name for m in modules}
    assert all(math.isfinite(v) for v in scores.values()), scores
    assert len(set(scores.values())) > 1, f"{name} gives every module the same score"


@pytest.mark.parametrize("name", NEW_PROXIES)
def test_deterministic(name, probe):
    assert run(name, probe) == run(name, probe)


@pytest.mark.parametrize("name", [*NEW_PROXIES, "grad_norm", "params"])
def test_model_left_untouched(name, probe):
    model, _, _ = probe
    model.eval()
    before = bits(model)
    flags = [m.training for m in model.modules()]
    run(name, probe)
    assert bits(model) == before, f"{name} changed the model's weights"
    assert all(p.grad is None for p in model.parameters()), f"{name} left gradients behind"
    assert [m.training for m in model.modules()] == flags, f"{name} changed train/eval flags"


@pytest.mark.parametrize("name", ["snip", "synflow", "grasp"])
def test_b_exactly_zero_still_scores(name, probe):
    model, modules, _ = probe
    assert all(torch.count_nonzero(lora_factors(model, m.name)[1]) == 0 for m in modules)  # PEFT init
    scores = run(name, probe)
    assert all(v != 0 for v in scores.values()), scores
    assert all(torch.count_nonzero(lora_factors(model, m.name)[1]) == 0 for m in modules)  # restored


def test_perturbation_seed_matters(probe):
    """The perturbation follows the seed (explicit Generator), so a different seed gives other scores."""
    assert run("snip", probe, seed=0) != run("snip", probe, seed=1)
    assert run("fisher", probe, seed=0) == run("fisher", probe, seed=1)  # fisher draws nothing


def test_normalised_ranks_ties_and_nan():
    assert normalised_ranks({"a": 1.0, "b": 2.0, "c": 3.0}) == {"a": 0.0, "b": 0.5, "c": 1.0}
    assert normalised_ranks({"a": 3.0, "b": 3.0, "c": 1.0}) == {"a": 0.75, "b": 0.75, "c": 0.0}
    assert normalised_ranks({"a": float("nan"), "b": -5.0}) == {"a": 0.0, "b": 1.0}
    assert normalised_ranks({"a": 7.0}) == {"a": 0.5}


def test_rank_average_by_hand():
    scores = {
        "x": {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0},      # ranks a 0, b 1/3, c 2/3, d 1
        "y": {"a": 10.0, "b": 10.0, "c": -1.0, "d": 0.0},   # ranks c 0, d 1/3, a b (2/3+1)/2 = 5/6
        "z": {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.4},      # ranks b 0, c 1/3, a 2/3, d 1
    }
    expected = {"a": (0 + 5 / 6 + 2 / 3) / 3, "b": (1 / 3 + 5 / 6 + 0) / 3,
                "c": (2 / 3 + 0 + 1 / 3) / 3, "d": (1 + 1 / 3 + 1) / 3}
    got = rank_average(scores)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())
    flipped = rank_average({"x": scores["x"], "-x": scores["x"]})  # a member and its reverse cancel
    assert all(v == pytest.approx(0.5) for v in flipped.values())
    with pytest.raises(ValueError):
        rank_average({"x": scores["x"], "y": {"a": 1.0}})


def test_vote_combines_its_members(probe):
    members = {m: run(m, probe) for m in VoteProxy.members}
    assert run("vote", probe) == pytest.approx(rank_average(members))
    model, modules, batches = probe
    torch.manual_seed(0)
    custom = VoteProxy(members=["params", "-fisher"]).module_scores(model, batches, modules, PROBE_RANK)
    assert custom == pytest.approx(rank_average({"params": run("params", probe), "-fisher": run("fisher", probe)}))
    assert all(0.0 <= v <= 1.0 for v in custom.values())


def test_vote_rejects_bad_members():
    with pytest.raises(UserError):
        VoteProxy(members=["no_such_proxy"])
    with pytest.raises(UserError):
        VoteProxy(members=["vote"])
    with pytest.raises(UserError):
        VoteProxy(members=[])


def test_every_proxy_through_the_probe_on_the_tiny_model(tiny_dir):
    modules = adaptable_modules(load_model(str(tiny_dir), 2))
    result = score_modules(str(tiny_dir), 2, Split(SENTENCES, LABELS), modules, list(PROXIES), probe_rank=PROBE_RANK,
                           num_batches=2, batch_size=8, max_length=32, seed=0)
    assert set(result.unit) == set(PROXIES)
    allocation = Allocation.from_ranks({modules[0].name: 2, modules[-1].name: 8})
    for name, score in result.scores(allocation).items():
        unit = result.unit[name]
        assert score == pytest.approx(2 * unit[modules[0].name] + 8 * unit[modules[-1].name]), name


@pytest.mark.slow
def test_every_proxy_separates_modules_on_minilm(capsys):
    modules = adaptable_modules(load_model("minilm-l6", 2))
    assert len(modules) == 36
    result = score_modules("minilm-l6", 2, Split(SENTENCES, LABELS), modules, list(PROXIES), probe_rank=4,
                           num_batches=2, batch_size=8, max_length=32, seed=0)
    with capsys.disabled():
        print("\nseconds per proxy (MiniLM-L6, 36 modules, 2 batches of 8, max length 32):")
        for name, seconds in result.seconds.items():
            print(f"  {name:10s} {seconds:7.3f} s")
    for name, scores in result.unit.items():
        assert all(math.isfinite(v) for v in scores.values()), name
        if name == "params":  # two shapes only: (384+384) and (384+1536)
            continue
        assert len(set(scores.values())) > 10, f"{name} separates only {len(set(scores.values()))} of 36 modules"
