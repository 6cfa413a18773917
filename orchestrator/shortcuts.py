"""LoRA-adapted shortcut connections (HeteroLoRA) as real modules hooked into a BERT-style encoder.

A shortcut is a low-rank map Δ(x) = s · B A x (A: r×d_in, B: d_out×r, s = alpha/r with
alpha = alpha_ratio · r, i.e. s = 2 by default, exactly like the LoRA modules of an `Allocation`).
B starts at zero, so attaching any shortcut leaves the model's outputs bit-identical until B is trained.
A starts like PEFT's lora_A (kaiming-uniform, a = √5). No dropout.

Notation for encoder layer ℓ of a Hugging Face BERT (`<prefix>.encoder.layer.ℓ`, a `BertLayer`):

    h_ℓ  = the layer's input hidden states (= output of layer ℓ-1, or of the embeddings for ℓ = 0)
    a_ℓ  = `layer.attention(h_ℓ)[0]`: the attention block's output after its LayerNorm; this is the FFN's input,
           i.e. what `layer.intermediate` reads and what `layer.output` gets as `input_tensor` (its residual)
    f_ℓ  = `dropout(output.dense(intermediate(a_ℓ)))`: the FFN's output before the final LayerNorm
    out  = `layer.output.LayerNorm(f_ℓ + a_ℓ)`: the layer's output h_{ℓ+1}

The three kinds (each a switch with a rank r, at most one of each kind per layer):

- `residual` at ℓ (W0 = I): the FFN's residual connection a_ℓ → (f_ℓ + ·) gets a low-rank update,
      out = LayerNorm(f_ℓ + a_ℓ + s·B A a_ℓ) = LayerNorm(f_ℓ + (I + s·B A) a_ℓ).
  Reads a_ℓ (the FFN input), adds to the FFN output before the final LayerNorm of layer ℓ.
- `cross_block` at ℓ (W0 = 0): a new connection over the whole block (attention and FFN) of layer ℓ,
      out = LayerNorm(f_ℓ + a_ℓ + s·B A h_ℓ).
  Reads h_ℓ (the layer input), adds to the FFN output before the final LayerNorm of layer ℓ.
- `cross_layer` at ℓ ≥ 1 (W0 = 0): a new connection from layer ℓ-1's FFN input to layer ℓ's FFN input,
      a_ℓ ← a_ℓ + s·B A a_{ℓ-1}.
  Reads a_{ℓ-1} (as layer ℓ-1's FFN saw it, i.e. including layer ℓ-1's own cross_layer term), adds to the attention
  output of layer ℓ (after the attention LayerNorm, before `intermediate`), so the modified a_ℓ feeds both the
  FFN and the FFN's residual; `residual` at ℓ then reads this modified a_ℓ.

Mechanics: forward (pre-)hooks on `layer` (captures h_ℓ), `layer.attention` (adds cross_layer, captures a_ℓ) and
`layer.output` (adds residual + cross_block to its `input_tensor` argument, which is the same as adding to f_ℓ
because the two are summed before the LayerNorm). Captured activations live in the `ShortcutSet`'s state for one
forward and are cleared by hooks on the encoder before and after each forward. The shortcut modules are registered
as the submodule `shortcuts` of the Hugging Face model (inside a PeftModel: `model.base_model.model.shortcuts`), so
`model.parameters()`, `.to()`, optimizers and DDP see them. Their parameter names contain no `lora_`, so PEFT's
`save_pretrained` leaves them out; `save_shortcuts` writes them beside the adapter.

Order with PEFT: attach *after* `get_peft_model`/`apply_lora` (PEFT freezes every non-LoRA parameter when it wraps).
Not supported (refused with an error): gradient checkpointing, chunked feed-forward, decoders with cross-attention.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.errors import UserError

KINDS = ("residual", "cross_block", "cross_layer")
FIELD = "space.shortcuts"
SUBMODULE = "shortcuts"  # attribute on the HF model; must not contain "lora_" (PEFT would save it as adapter weight)
WEIGHTS_FILE = "shortcuts.safetensors"
SPECS_FILE = "shortcuts.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^L(\d+)\.shortcut\.([a-z_]+)$")


# ---------------------------------------------------------------- value types


@dataclass(frozen=True, order=True)
class ShortcutSpec:
    """One switched-on shortcut: kind, the layer ℓ it ends in, and its rank r."""

    kind: str
    layer: int
    rank: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"{FIELD}: unknown shortcut kind '{self.kind}'; choose from {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise UserError(f"{FIELD}: layer {self.layer!r} of {self.kind} must be an integer ≥ 0")
        if self.kind == "cross_layer" and self.layer == 0:
            raise UserError(f"{FIELD}: cross_layer at layer 0 has no previous layer to read; use layers from 1")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"{FIELD}: rank {self.rank!r} of L{self.layer}.shortcut.{self.kind} must be an integer ≥ 1")

    @property
    def name(self) -> str:
        """Stable short name, e.g. `L3.shortcut.residual` (the `short` of an AdaptableModule's analogue)."""
        return f"L{self.layer}.shortcut.{self.kind}"

    @property
    def compact(self) -> str:
        """`L3.shortcut.residual:4`, the same `<short>:<rank>` form as `Allocation.compact` items."""
        return f"{self.name}:{self.rank}"

    @property
    def key(self) -> str:
        """ModuleDict key (no dots allowed there)."""
        return f"L{self.layer}_shortcut_{self.kind}"

    def params(self, hidden_size: int) -> int:
        """Exact trainable parameters: r · (d_in + d_out); every kind maps hidden → hidden (384 → 384: 768 per rank)."""
        return self.rank * 2 * hidden_size

    @classmethod
    def parse(cls, item: str) -> ShortcutSpec:
        """`L3.shortcut.residual:4` → ShortcutSpec('residual', 3, 4)."""
        name, _, rank = item.strip().rpartition(":")
        match = _NAME.match(name)
        if not match or not (rank.isascii() and rank.isdigit()):  # '²' is a digit to isdigit, not to int
            raise UserError(f"{FIELD}: '{item.strip()}' is not `L<layer>.shortcut.<kind>:<rank>`; "
                            f"e.g. L3.shortcut.residual:4 (kinds: {', '.join(KINDS)})")
        return cls(match.group(2), int(match.group(1)), int(rank))


def is_shortcut_item(item: str) -> bool:
    """Whether one comma-separated item of a compact allocation text names a shortcut (vs. a LoRA module)."""
    return ".shortcut." in item


def parse_compact(text: str) -> tuple[ShortcutSpec, ...]:
    """`L1.shortcut.cross_layer:2,L3.shortcut.residual:4` → sorted, validated specs (no duplicates)."""
    return normalize_specs(ShortcutSpec.parse(part) for part in text.split(",") if part.strip())


def format_compact(specs) -> str:
    return ",".join(spec.compact for spec in sorted(specs, key=lambda s: (s.layer, KINDS.index(s.kind))))


def normalize_specs(specs) -> tuple[ShortcutSpec, ...]:
    """Sorted by (layer, kind); one shortcut per (kind, layer)."""
    specs = sorted(specs, key=lambda s: (s.layer, KINDS.index(s.kind), s.rank))
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise UserError(f"{FIELD}: {spec.name} is given twice; give each (layer, kind) at most once")
        seen.add(spec.name)
    return tuple(specs)


@dataclass(frozen=True)
class ShortcutSite:
    """A place a shortcut may go; same attributes as `models.AdaptableModule` so allocators can treat both alike."""

    kind: str
    layer: int
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return f"L{self.layer}.shortcut.{self.kind}"

    short = name

    @property
    def type(self) -> str:
        return f"shortcut.{self.kind}"

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features

    def spec(self, rank: int) -> ShortcutSpec:
        return ShortcutSpec(self.kind, self.layer, rank)


# ---------------------------------------------------------------- finding the encoder


@dataclass
class _Encoder:
    root: nn.Module  # the HF model the `shortcuts` submodule is registered on
    encoder: nn.Module  # the module whose `.layer` is the ModuleList
    layers: nn.ModuleList
    hidden_size: int


def _hf_model(model: nn.Module) -> nn.Module:
    """Unwrap DDP (`.module`) and PEFT (`PeftModel.base_model.model`) down to the Hugging Face model."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model


def _find_encoder(model: nn.Module) -> _Encoder:
    root = _hf_model(model)
    found = [(name, module) for name, module in root.named_modules()
             if isinstance(module, nn.ModuleList) and (name == "layer" or name.endswith(".layer")) and len(module)
             and all(hasattr(layer, part) for layer in module for part in ("attention", "intermediate", "output"))]
    if len(found) != 1:
        raise UserError(f"model.name: shortcuts need one BERT-style `encoder.layer` list with attention/intermediate/"
                        f"output blocks; found {len(found)}. Use such an encoder (BERT, RoBERTa, MiniLM, DeBERTa; "
                        "not DistilBERT) or search without them (space.shortcuts: [])")
    name, layers = found[0]
    encoder = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
    for index, layer in enumerate(layers):
        if getattr(layer, "chunk_size_feed_forward", 0):
            raise UserError(f"model.name: layer {index} uses chunk_size_feed_forward > 0, which shortcuts do not support; "
                            "set chunk_size_feed_forward: 0 in the model config")
        if hasattr(layer, "crossattention"):
            raise UserError(f"model.name: layer {index} has cross-attention (a decoder); shortcuts need an encoder")
        if not isinstance(getattr(layer.output, "LayerNorm", None), nn.LayerNorm):
            raise UserError(f"model.name: layer {index}'s `output` has no LayerNorm; use a BERT-style encoder")
    hidden = int(layers[0].output.LayerNorm.normalized_shape[-1])
    return _Encoder(root, encoder, layers, hidden)


def shortcut_sites(model: nn.Module, kinds=KINDS, layers=None) -> list[ShortcutSite]:
    """Every place a shortcut may go in `model` (optionally only some kinds/layers), in (layer, kind) order."""
    enc = _find_encoder(model)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise UserError(f"{FIELD}: unknown shortcut kind(s) {unknown}; choose from {', '.join(KINDS)}")
    wanted = range(len(enc.layers)) if layers is None else layers
    return [ShortcutSite(kind, layer, enc.hidden_size, enc.hidden_size)
            for layer in wanted for kind in KINDS if kind in kinds
            and 0 <= layer < len(enc.layers) and not (kind == "cross_layer" and layer == 0)]


def check_specs(model: nn.Module, specs) -> tuple[ShortcutSpec, ...]:
    """Validate `specs` against `model` (layer range, duplicates) and return them normalised."""
    specs = normalize_specs(specs)
    if not specs:  # an allocation without shortcuts fits any encoder, BERT's layer blocks or not
        return specs
    n_layers = len(_find_encoder(model).layers)
    for spec in specs:
        if spec.layer >= n_layers:
            raise UserError(f"{FIELD}: {spec.name} names layer {spec.layer}, but the model has {n_layers} layers "
                            f"(0–{n_layers - 1})")
    return specs


def specs_params(model: nn.Module, specs) -> int:
    """Exact trainable parameters of `specs` on `model`, without attaching anything."""
    hidden = _find_encoder(model).hidden_size
    return sum(spec.params(hidden) for spec in check_specs(model, specs))


# ---------------------------------------------------------------- modules and hooks


class LowRankShortcut(nn.Module):
    """Δ(x) = scaling · B(A(x)); `A.weight` is r×d_in and `B.weight` d_out×r, like PEFT's lora_A/lora_B."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha_ratio: float, generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        self.scaling = float(alpha_ratio)  # lora_alpha / r with lora_alpha = alpha_ratio · r, as in Allocation
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x.to(self.A.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x)) * self.scaling


def _spec_generator(seed: int, spec: ShortcutSpec) -> torch.Generator:
    """Init independent of spec order: the generator's seed mixes the run seed and the shortcut's name."""
    digest = hashlib.sha1(f"{seed}:{spec.name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class ShortcutSet:
    """The shortcuts attached to one model: their modules, hooks and per-forward activation state."""

    def __init__(self, model: nn.Module, specs: tuple[ShortcutSpec, ...], alpha_ratio: float, seed: int | None):
        enc = _find_encoder(model)
        if hasattr(enc.root, SUBMODULE):
            raise RuntimeError(f"the model already has a `{SUBMODULE}` submodule; detach() the old ShortcutSet first")
        self.specs = specs
        self.alpha_ratio = float(alpha_ratio)
        self.hidden_size = enc.hidden_size
        self.num_layers = len(enc.layers)
        self._root = enc.root
        self._state: dict[tuple[str, int], torch.Tensor] = {}
        self._handles = []
        reference = enc.layers[0].output.LayerNorm.weight
        modules = nn.ModuleDict()
        for spec in specs:
            generator = None if seed is None else _spec_generator(seed, spec)
            modules[spec.key] = LowRankShortcut(enc.hidden_size, enc.hidden_size, spec.rank, alpha_ratio, generator)
        modules.to(device=reference.device, dtype=reference.dtype)
        enc.root.add_module(SUBMODULE, modules)
        self.modules = modules
        self._install_hooks(enc)

    # -------------------------------------------------------- public API

    def module(self, spec_or_name) -> LowRankShortcut:
        name = spec_or_name.name if isinstance(spec_or_name, ShortcutSpec) else spec_or_name
        return self.modules[self._by_name()[name].key]

    def factors(self, spec_or_name) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of one shortcut, shaped like PEFT's lora_A/lora_B weights (for proxies)."""
        module = self.module(spec_or_name)
        return module.A.weight, module.B.weight

    def parameters(self):
        return self.modules.parameters()

    def trainable_params(self) -> int:
        """Exact count from the modules themselves; equals Σ spec.params(hidden_size)."""
        return sum(p.numel() for p in self.modules.parameters())

    @property
    def compact(self) -> str:
        return format_compact(self.specs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`<spec name>.A` / `<spec name>.B` → weights (the layout of shortcuts.safetensors)."""
        out = {}
        for spec in self.specs:
            module = self.modules[spec.key]
            out[f"{spec.name}.A"] = module.A.weight.detach()
            out[f"{spec.name}.B"] = module.B.weight.detach()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {name: tensor.shape for name, tensor in self.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
        if missing or unexpected or wrong:
            raise UserError(f"{WEIGHTS_FILE}: does not match {SPECS_FILE}: missing {missing}, unexpected {unexpected}, "
                            f"wrong shape {wrong}; save both files together with save_shortcuts")
        with torch.no_grad():
            for spec in self.specs:
                module = self.modules[spec.key]
                module.A.weight.copy_(tensors[f"{spec.name}.A"])
                module.B.weight.copy_(tensors[f"{spec.name}.B"])

    def load_weights(self, directory) -> None:
        """Load `shortcuts.safetensors` from `directory` into these (already attached) shortcuts, e.g. on resume."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{path}: missing; shortcut weights are read from safetensors only")
        try:
            tensors = load_file(path)
        except (SafetensorError, ValueError) as err:
            raise UserError(f"{path}: not a valid safetensors file ({str(err).splitlines()[0][:120]}); save the "
                            "shortcuts again with save_shortcuts") from None
        self.load_state_dict(tensors)

    def detach(self) -> None:
        """Remove the hooks and the `shortcuts` submodule; the model computes exactly as before attaching."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state.clear()
        if getattr(self._root, SUBMODULE, None) is self.modules:
            delattr(self._root, SUBMODULE)

    def __enter__(self) -> ShortcutSet:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -------------------------------------------------------- hooks

    def _by_name(self) -> dict[str, ShortcutSpec]:
        return {spec.name: spec for spec in self.specs}

    def _install_hooks(self, enc: _Encoder) -> None:
        at = {(spec.kind, spec.layer): self.modules[spec.key] for spec in self.specs}
        clear = lambda *_args, **_kwargs: self._state.clear()  # noqa: E731
        self._handles.append(enc.encoder.register_forward_pre_hook(clear))
        self._handles.append(enc.encoder.register_forward_hook(clear))
        for index, layer in enumerate(enc.layers):
            residual, cross_block = at.get(("residual", index)), at.get(("cross_block", index))
            cross_layer, feeds_next = at.get(("cross_layer", index)), ("cross_layer", index + 1) in at
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index, cross_block is not None),
                                                                  with_kwargs=True))
            if cross_layer is not None or feeds_next:
                self._handles.append(layer.attention.register_forward_hook(
                    self._attention_hook(index, cross_layer, feeds_next)))
            if residual is not None or cross_block is not None:
                self._handles.append(layer.output.register_forward_pre_hook(
                    self._output_pre_hook(index, residual, cross_block), with_kwargs=True))

    def _source(self, what: str, index: int) -> torch.Tensor:
        try:
            return self._state[(what, index)]
        except KeyError:
            raise RuntimeError(f"shortcut source {what} of layer {index} was not captured in this forward; run the "
                               "encoder as a whole (not single layers) while shortcuts are attached") from None

    def _layer_pre_hook(self, index: int, capture_input: bool):
        def hook(layer, args, kwargs):
            if getattr(layer, "gradient_checkpointing", False) and layer.training:
                raise RuntimeError("shortcuts do not support gradient checkpointing (their hooks would run again in "
                                   "the recomputation); disable it")
            if capture_input:
                self._state[("input", index)] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _attention_hook(self, index: int, cross_layer: LowRankShortcut | None, feeds_next: bool):
        def hook(_module, _args, output):
            is_tuple = isinstance(output, tuple)
            attention_output = output[0] if is_tuple else output
            if cross_layer is not None:
                delta = cross_layer(self._source("ffn_input", index - 1))
                attention_output = attention_output + delta.to(attention_output.dtype)
            if feeds_next:
                self._state[("ffn_input", index)] = attention_output
            if cross_layer is None:
                return None  # output unchanged
            return (attention_output, *output[1:]) if is_tuple else attention_output
        return hook

    def _output_pre_hook(self, index: int, residual: LowRankShortcut | None, cross_block: LowRankShortcut | None):
        def hook(_module, args, kwargs):
            args = list(args)
            if len(args) >= 2:
                input_tensor = args[1]
            else:
                input_tensor = kwargs["input_tensor"]
            delta = None
            if residual is not None:
                delta = residual(input_tensor)
            if cross_block is not None:
                term = cross_block(self._source("input", index))
                delta = term if delta is None else delta + term
            input_tensor = input_tensor + delta.to(input_tensor.dtype)
            if len(args) >= 2:
                args[1] = input_tensor
            else:
                kwargs = {**kwargs, "input_tensor": input_tensor}
            return tuple(args), kwargs
        return hook


# ---------------------------------------------------------------- attach, save, load


def attach_shortcuts(model: nn.Module, specs, alpha_ratio: float = 2.0, seed: int | None = None) -> ShortcutSet:
    """Insert `specs` into `model` (plain HF model or PeftModel) as trainable modules with B = 0.

    Call after `apply_lora`. `seed` makes A's init reproducible and independent of spec order;
    None draws from torch's global RNG.
    """
    if alpha_ratio <= 0:
        raise UserError(f"{FIELD}: alpha_ratio {alpha_ratio} must be positive")
    specs = check_specs(model, specs)
    return ShortcutSet(model, specs, alpha_ratio, seed)


def save_shortcuts(shortcut_set: ShortcutSet, directory) -> None:
    """Write `shortcuts.safetensors` (weights) and `shortcuts.json` (specs) into `directory`, e.g. a PEFT adapter dir."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in shortcut_set.state_dict().items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"version": FORMAT_VERSION, "alpha_ratio": shortcut_set.alpha_ratio, "hidden_size": shortcut_set.hidden_size,
            "num_layers": shortcut_set.num_layers, "compact": shortcut_set.compact,
            "specs": [{"kind": s.kind, "layer": s.layer, "rank": s.rank} for s in shortcut_set.specs]}
    (directory / SPECS_FILE).write_text(json.dumps(meta, indent=1))


def has_shortcuts(directory) -> bool:
    return (Path(directory) / SPECS_FILE).is_file()


def read_specs(directory) -> tuple[tuple[ShortcutSpec, ...], dict]:
    """The specs and metadata of `shortcuts.json` in `directory`."""
    path = Path(directory) / SPECS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; this directory holds no shortcuts")
    try:
        meta = json.loads(path.read_text())
        specs = normalize_specs(ShortcutSpec(str(s["kind"]), int(s["layer"]), int(s["rank"])) for s in meta["specs"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a shortcuts file written by save_shortcuts ({error})") from None
    return specs, meta


def load_shortcuts(model: nn.Module, directory, trainable: bool = True) -> ShortcutSet:
    """Attach the shortcuts saved in `directory` to a fresh `model` and load their weights (safetensors only)."""
    specs, meta = read_specs(directory)
    hidden = _find_encoder(model).hidden_size
    if int(meta.get("hidden_size", hidden)) != hidden:
        raise UserError(f"{Path(directory) / SPECS_FILE}: saved for hidden size {meta['hidden_size']}, "
                        f"but the model has {hidden}; load it on the base model it was trained on")
    # building the modules draws their init (which load_weights overwrites) from torch's global stream: keep it as it was
    with torch.random.fork_rng(devices=[]):
        shortcut_set = attach_shortcuts(model, specs, alpha_ratio=float(meta.get("alpha_ratio", 2.0)))
    try:
        shortcut_set.load_weights(directory)
    except BaseException:  # leave the model as it came, so a retry with the right files works on it
        shortcut_set.detach()
        raise
    for parameter in shortcut_set.parameters():
        parameter.requires_grad_(trainable)
    return shortcut_set
