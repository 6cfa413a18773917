"""Shared fixtures of the unit tests: a tiny random BERT classifier on disk and a small labelled split.

Nothing here touches the network: the model and its WordPiece vocabulary are written from scratch.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    # transformers 5.23 warns about its own deprecated name whenever PEFT wraps a model
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "nice", "happy", "love", "best", "fun", "bright", "warm", "funny", "clever"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "hate", "worst", "dull", "dark", "cold", "weak", "slow"]
NOUNS = ["movie", "film", "story", "plot", "actor", "music", "scene", "ending", "cast", "script", "book", "show"]
COMMON = ["the", "a", "an", "this", "that", "it", "is", "was", "and", "but", "very", "really", "so", "too", "of",
          "to", "in", "on", "for", "with", "not", "i", "you", "we", "they", "he", "she", "my", "your", "our",
          "be", "have", "do", "say", "get", "make", "go", "know", "take", "see", "come", "think", "look", "want",
          "give", "use", "find", "tell", "all", "one", "two", "time", "day", "year", "way", "man", "thing", "life",
          "world", "people", "just", "quite", "rather", "at", "by", "from", "as", ".", ",", "!", "?"]
VOCAB = SPECIAL_TOKENS + COMMON + POSITIVE + NEGATIVE + NOUNS

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight BertForSequenceClassification (hidden 32, 2 layers) with its own tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    assert len(VOCAB) == len(set(VOCAB)), "duplicate word in the test vocabulary"
    root = tmp_path_factory.mktemp("tiny_bert")
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    # transformers 5 takes `vocab`; make sure it really loaded our words and not the 5-token default.
    assert tokenizer.convert_tokens_to_ids("movie") == VOCAB.index("movie")
    tokenizer.save_pretrained(root)

    torch.manual_seed(1234)
    config = BertConfig(vocab_size=len(VOCAB), num_labels=2, **TINY)
    model = BertForSequenceClassification(config)
    model.save_pretrained(root, safe_serialization=True)
    assert list(root.glob("*.safetensors"))
    return root


def _save_encoder(root, family: str) -> None:
    """A random-weight sequence classifier of another encoder family (the tiny BERT's sizes) and a tokenizer."""
    import torch
    from transformers import (BertTokenizerFast, DebertaV2Config, DebertaV2ForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, DistilBertTokenizerFast, RobertaConfig,
                              RobertaForSequenceClassification)

    sizes = dict(vocab_size=len(VOCAB), num_labels=2)
    builds = {  # DistilBERT's tokenizer gives no token_type_ids, which its forward refuses
        "distilbert": (DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
                                        **sizes), DistilBertForSequenceClassification, DistilBertTokenizerFast),
        # v2's own pos_key_proj and pos_query_proj project relative positions; v3 shares query_proj and key_proj
        "deberta": (DebertaV2Config(**TINY, **sizes, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                    position_buckets=16, max_relative_positions=32),
                    DebertaV2ForSequenceClassification, BertTokenizerFast),
        "deberta3": (DebertaV2Config(**TINY, **sizes, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                     position_buckets=16, max_relative_positions=32, share_att_key=True),
                     DebertaV2ForSequenceClassification, BertTokenizerFast),
        "roberta": (RobertaConfig(**TINY | {"max_position_embeddings": 130}, **sizes, pad_token_id=0),
                    RobertaForSequenceClassification, BertTokenizerFast)}
    config, model_class, tokenizer_class = builds[family]
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer_class(vocab=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(1234)
    model_class(config).save_pretrained(root, safe_serialization=True)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """family ('distilbert', 'deberta', 'deberta3', 'roberta') → a directory with that tiny random model, built once."""
    built = {}

    def build(family: str):
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            _save_encoder(built[family], family)
        return built[family]

    return build


def make_sentences(n: int = 64) -> tuple[list[str], list[int]]:
    """n (≤ 72) distinct English sentences of varied length, alternating labels 1 (positive) and 0.

    Token counts (with [CLS] and [SEP]) are 7, 10, 13 or 16; consecutive blocks of 8 differ in their longest.
    """
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        adjectives = POSITIVE if label else NEGATIVE
        words = [("the", "this", "that")[i // 24], NOUNS[i % len(NOUNS)], "was", adjectives[(i // 2) % len(adjectives)]]
        words += ["and", "very", adjectives[(i // 2 + 3) % len(adjectives)]] * ((i // 8 + i % 3) % 4)
        texts.append(" ".join(words) + ("!" if label else "."))
        labels.append(label)
    assert len(set(texts)) == n, "test sentences must be distinct"
    return texts, labels


@pytest.fixture(scope="session")
def sentences() -> tuple[list[str], list[int]]:
    return make_sentences(64)


@pytest.fixture
def tiny_split(sentences):
    from orchestrator.data import Split

    texts, labels = sentences
    return Split(list(texts), list(labels))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The loaded tiny classifier (a fresh copy is cheap; tests that wrap it in PEFT load their own)."""
    from orchestrator.models import load_model

    return load_model(str(tiny_model_dir), 2)


@pytest.fixture(scope="session")
def tiny_modules(tiny_model):
    from orchestrator.models import adaptable_modules

    return adaptable_modules(tiny_model)


@pytest.fixture(scope="module")
def embedded_ray():
    """The embedded local Ray cluster (pipeline.init_ray), shared by the tests that ask for it: the first starts it,
    the rest find it up, and Ray stops it when pytest exits. Here a pipeline run on a warm cluster took 34 s against
    57 s on a fresh one (the cluster's start, the probe worker's imports, the driver's first model load).
    A test that needs its own environment in the cluster's processes shuts it down and starts its own."""
    import ray

    from orchestrator import pipeline

    pipeline.set_runtime_env()
    pipeline.init_ray(None)  # a no-op while the shared cluster is up
    return ray


@pytest.fixture
def run_tiny_screens(tmp_path, tiny_model_dir, tiny_modules, embedded_ray):
    """Real Tune + OptunaSearch screens of the tiny model on the shared local Ray cluster, each given as a list of
    config overrides; returns (config, screen table, context) per screen. Proxy scores: params and a made-up grad_norm."""
    def run(*overrides: list[str]) -> list:
        from orchestrator import pipeline
        from orchestrator.allocators import make_budget, space_modules
        from orchestrator.config import load_config
        from orchestrator.proxies import ModuleScores
        from orchestrator.screen import ScreenContext, run_screen

        scores = ModuleScores({"params": {m.name: float(m.params_per_rank) for m in tiny_modules},
                               "grad_norm": {m.name: float(len(m.name)) for m in tiny_modules}})
        screens = []
        for extra in overrides:
            cfg = load_config(None, [f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", *extra])
            pipeline.prepare_run_dir(cfg, resume=False)
            context = ScreenContext.from_config(cfg, space_modules(tiny_modules, cfg.space),
                                                make_budget(tiny_modules, cfg.space), scores)
            screens.append((cfg, run_screen(cfg, context), context))
        return screens
    return run


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def fake_aws(monkeypatch):
    """Fake AWS credentials in the environment (what a local S3 API accepts); no instance-metadata lookups."""
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def s3_endpoint():
    """host:port of a real S3 API (moto's server) on 127.0.0.1, for storage_path=s3://… tests; stopped afterwards."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    server = shutil.which("moto_server")
    if server is None:
        pytest.skip("moto[server] (a test dependency) is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint, fake_aws):
    """(storage URI, pyarrow S3 filesystem) of a fresh, empty bucket on the local S3 API; fake credentials set."""
    import uuid

    import pyarrow.fs

    bucket = f"lora-{uuid.uuid4().hex[:12]}"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True,
                                 access_key="testing", secret_key="testing", region="us-east-1")
    fs.create_dir(bucket)
    return f"s3://{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http", fs
