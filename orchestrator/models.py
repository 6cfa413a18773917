"""Base model and tokenizer loading, and discovery of the Linear modules an adapter may sit on."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.config import LAYER_MODULE, MODULE_TYPES, PACKAGED_MODELS, module_type
from orchestrator.errors import UserError

# Without one of these, transformers 5 silently builds a 5-token default vocabulary: every word becomes [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")
# transformers 5.23 warns about its own deprecated property whenever PEFT wraps a model: once in every Ray
# worker's log, about nothing a user can change. Every process that builds a model imports this module.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class AdaptableModule:
    """One Linear module inside an encoder layer: where an adapter can go and what a rank costs."""

    name: str  # full module name, e.g. bert.encoder.layer.0.attention.self.query
    layer: int
    type: str  # query, key, value, attention.output.dense, intermediate.dense, output.dense (config.module_type)
    in_features: int
    out_features: int

    @property
    def short(self) -> str:
        return f"L{self.layer}.{self.type}"

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features


def resolve_model_path(name: str) -> Path:
    """A packaged model name or a local Hugging Face directory → a directory with safetensors weights."""
    if name in PACKAGED_MODELS:
        package = __import__(PACKAGED_MODELS[name])
        return Path(package.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"model.name: '{name}' is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor a directory; "
                        "give a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"model.name: '{path}' has no config.json; point it at a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"model.name: '{path}' has no *.safetensors weights; convert the weights to safetensors "
                        "(pickled .bin files are refused for safety)")
    if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise UserError(f"model.name: '{path}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                        "save the model's tokenizer into the same directory (tokenizer.save_pretrained)")
    return path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_model(name: str, num_labels: int, seed: int = 0, dropout: float | None = None) -> nn.Module:
    """Sequence classifier on the base model. The seed fixes the fresh classification head; a given
    `dropout` replaces the rate of every dropout layer (None keeps the checkpoint's)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is expected for the head
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    from safetensors import SafetensorError

    path = resolve_model_path(name)
    try:
        # a checkpoint's own classifier for another label count is replaced by a fresh one, as a missing one is
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as err:  # bad config.json, unknown model_type, corrupt weights
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"model.name: '{path}' could not be loaded ({first}); check config.json and the "
                        "*.safetensors weights (e.g. save the model again with save_pretrained)") from None
    _check_only_head_is_new(path, info, head_modules(model))
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    return model


def head_modules(model: nn.Module) -> list[str]:
    """The classification head: the model's top-level modules with weights beside the encoder (BERT, RoBERTa:
    classifier; DistilBERT: pre_classifier, classifier; DeBERTa: pooler, classifier). It is new for each task, so it
    is trained and saved with the adapter (PEFT modules_to_save)."""
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and next(child.parameters(), None) is not None]


def output_layer(model: nn.Module, num_labels: int, field: str = "model.name") -> str:
    """The head's last Linear, the one that maps to the labels: `classifier` (BERT, DistilBERT, DeBERTa) or
    `classifier.out_proj` (RoBERTa). Its input is what the layers before it in the head make of the encoder."""
    found = [".".join(filter(None, (head, name))) for head in head_modules(model)
             for name, module in model.get_submodule(head).named_modules()
             if isinstance(module, nn.Linear) and module.out_features == num_labels]
    if len(found) != 1:
        raise UserError(f"{field}: the classification head of {type(model).__name__} has "
                        f"{'no' if not found else len(found)} Linear layer(s) with {num_labels} outputs "
                        f"({', '.join(found) or 'in ' + ', '.join(head_modules(model))}); use a sequence classifier "
                        "whose head ends in one, as BERT, DistilBERT, RoBERTa and DeBERTa do")
    return found[0]


def _check_only_head_is_new(path: Path, info: dict, heads: list[str]) -> None:
    """Only the head may be freshly initialised: any other weight missing from the checkpoint, or of another
    shape (a config.json that does not match the weights), would silently be random, and frozen."""
    keys = list(info["missing_keys"]) + [k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]]
    fresh = sorted(k for k in keys if k.split(".")[0] not in heads)  # mismatched: (key, ckpt shape, model shape)
    if fresh and all(".pooler." in f".{k}" for k in fresh):  # saved from a masked-LM model, which has no pooler
        raise UserError(f"model.name: '{path}' has no pooler weights ({fresh[0]}; a checkpoint saved from a masked-LM "
                        "model), and its classifier reads the pooler: a random one would differ between seeds and the "
                        "registry; save it once with a pooler (AutoModel.from_pretrained(dir).save_pretrained(new_dir), "
                        "then copy the tokenizer files) and use that")
    if fresh:
        shown = ", ".join(fresh[:3]) + (", …" if len(fresh) > 3 else "")
        raise UserError(f"model.name: '{path}' has {len(fresh)} weight(s) missing from its *.safetensors or of another "
                        f"shape than its config.json says ({shown}), which would be random; use the config.json "
                        "saved with these weights (save_pretrained writes both)")


def check_max_length(model: nn.Module, max_length: int) -> None:
    """model.max_length against the model's position embeddings (longer inputs fail inside the first forward)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    # RoBERTa-style embeddings number positions from padding_idx + 1: that many fewer tokens fit
    offset = getattr(getattr(getattr(model, "base_model", model), "embeddings", None), "padding_idx", None)
    if isinstance(positions, int) and isinstance(offset, int):
        positions -= offset + 1
    if isinstance(positions, int) and max_length > positions:
        raise UserError(f"model.max_length: {max_length} is more tokens than the model's {positions} positions; "
                        f"use at most {positions}")


def adaptable_modules(model: nn.Module) -> list[AdaptableModule]:
    """Every Linear of BERT's six module types inside an encoder layer, in model order. Pooler and classifier are
    not adaptable, nor other Linears in a layer (DeBERTa's pos_key_proj projects position embeddings, not tokens)."""
    found = []
    for name, module in model.named_modules():
        match = LAYER_MODULE.search(name)
        if isinstance(module, nn.Linear) and match and module_type(match.group(2)) in MODULE_TYPES:
            found.append(AdaptableModule(name, int(match.group(1)), module_type(match.group(2)), module.in_features,
                                         module.out_features))
    if not found:
        raise UserError("model.name: no Linear modules inside `.layer.N.` blocks were found; "
                        "use a BERT-style encoder (BERT, RoBERTa, MiniLM, DistilBERT, DeBERTa, ...)")
    return found


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for name in head_modules(model) for p in model.get_submodule(name).parameters())
