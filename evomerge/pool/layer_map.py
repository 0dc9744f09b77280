"""Which layer and which kind of module every tensor of a model belongs to.

Recipes speak of layer groups and module kinds ("mlp of layers 0-7"), checkpoints of tensor names;
the layer map translates. It is derived from config.json (``model_type``, layer count, tied
embeddings) and the tensor names alone, so it needs no model code and works before any weight is
read. A layer index is parsed only right after the block container (``model.layers.<i>.``,
``transformer.h.<i>.``), never from any dotted number, so ``mlp.experts.1.w1`` stays in its layer.
Anything that cannot be placed is an error: silently treating an unknown tensor as "other" would
merge it with the wrong parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from evomerge.errors import ModelError


class ModuleKind(str, Enum):
    """The kind of module a tensor belongs to, as recipes filter on it."""

    ATTENTION = "attention"
    MLP = "mlp"
    NORM = "norm"
    EMBEDDING = "embedding"
    HEAD = "head"
    OTHER = "other"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor sits: its layer (``None`` outside the blocks) and module kind."""

    name: str
    layer: int | None
    kind: ModuleKind


@dataclass(frozen=True)
class Naming:
    """How a family of architectures names its tensors (module prefixes, without ``.weight``)."""

    label: str
    block: str
    embeddings: tuple[str, ...]
    final_norms: tuple[str, ...]
    head: str


DECODER = Naming(
    "llama-style", "model.layers", ("model.embed_tokens",), ("model.norm", "model.final_layernorm"), "lm_head"
)
GPT2 = Naming("gpt2-style", "transformer.h", ("transformer.wte", "transformer.wpe"), ("transformer.ln_f",), "lm_head")
GPT2_BARE = Naming("gpt2-style (no prefix)", "h", ("wte", "wpe"), ("ln_f",), "lm_head")
GPT_NEOX = Naming(
    "gpt-neox-style", "gpt_neox.layers", ("gpt_neox.embed_in",), ("gpt_neox.final_layer_norm",), "embed_out"
)
NAMINGS = (DECODER, GPT2, GPT2_BARE, GPT_NEOX)

MODEL_TYPES: dict[str, tuple[Naming, ...]] = {
    **{
        t: (DECODER,)
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "starcoder2", "stablelm", "cohere",
        )
    },
    "gpt2": (GPT2, GPT2_BARE),
    "gpt_neox": (GPT_NEOX,),
}

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
ATTENTION_PARTS = frozenset(
    {
        "self_attn", "attn", "attention", "self_attention", "q_proj", "k_proj", "v_proj", "o_proj",
        "qkv_proj", "c_attn", "query_key_value", "wqkv",
    }
)
MLP_PARTS = frozenset(
    {
        "mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "fc1", "fc2", "c_fc", "gate_proj",
        "up_proj", "down_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h",
    }
)


def _block_kind(suffix: str) -> ModuleKind:
    """The kind of an in-block tensor from its module path (``mlp.down_proj.weight``).

    Norms win over their container (``self_attn.q_norm`` is a norm): norm gains sit around 1, not
    around 0, and recipes treat them apart from the projections they belong to.
    """
    modules = suffix.split(".")[:-1]
    if any("norm" in part or part.startswith("ln_") for part in modules):
        return ModuleKind.NORM
    if any(part in ATTENTION_PARTS for part in modules):
        return ModuleKind.ATTENTION
    if any(part in MLP_PARTS for part in modules):
        return ModuleKind.MLP
    return ModuleKind.OTHER


def _top_level(naming: Naming, name: str) -> tuple[ModuleKind, int] | None:
    """(kind, rank among its kind) of a tensor outside the blocks, or ``None`` if it is unknown."""
    module, _, param = name.rpartition(".")
    if not module or not param:
        return None
    if module in naming.embeddings:
        return ModuleKind.EMBEDDING, naming.embeddings.index(module)
    if module in naming.final_norms:
        return ModuleKind.NORM, naming.final_norms.index(module)
    if module == naming.head:
        return ModuleKind.HEAD, 0
    return None


def _natural_key(text: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


@dataclass(frozen=True)
class _Placed:
    info: TensorInfo
    suffix: str | None
    rank: tuple[Any, ...]


def _place(naming: Naming, names: Iterable[str]) -> tuple[dict[str, _Placed], str | None]:
    """Place every name under ``naming``; return the placements and the first name that does not fit."""
    placed: dict[str, _Placed] = {}
    prefix = naming.block + "."
    group = {ModuleKind.EMBEDDING: 0, ModuleKind.NORM: 2, ModuleKind.HEAD: 3}
    for name in names:
        if name.startswith(prefix):
            index, _, suffix = name[len(prefix) :].partition(".")
            if index.isascii() and index.isdigit() and suffix:
                layer = int(index)
                info = TensorInfo(name, layer, _block_kind(suffix))
                placed[name] = _Placed(info, suffix, (1, layer, _natural_key(suffix)))
                continue
            return placed, name
        top = _top_level(naming, name)
        if top is None:
            return placed, name
        kind, rank = top
        placed[name] = _Placed(TensorInfo(name, None, kind), None, (group[kind], rank, _natural_key(name)))
    return placed, None


class LayerMap:
    """The layer and module kind of every tensor of one model layout; build with ``LayerMap.build``."""

    def __init__(
        self, model_type: str, naming: Naming, num_layers: int, tied: bool, placed: Mapping[str, _Placed]
    ) -> None:
        self.model_type = model_type
        self.naming = naming
        self.num_layers = num_layers
        self.tied = tied
        self.embedding_name = naming.embeddings[0] + ".weight"
        self.head_name = naming.head + ".weight"
        self._placed = dict(placed)
        self.names: tuple[str, ...] = tuple(sorted(self._placed, key=lambda n: self._placed[n].rank))
        by_layer: list[list[str]] = [[] for _ in range(num_layers)]
        for name in self.names:
            layer = self._placed[name].info.layer
            if layer is not None:
                by_layer[layer].append(name)
        self._by_layer = tuple(tuple(names) for names in by_layer)

    @classmethod
    def build(cls, config: Mapping[str, Any], tensor_names: Iterable[str], where: str) -> LayerMap:
        """Map ``tensor_names`` of the model described by ``config``; ``where`` names it in errors."""
        names = list(tensor_names)
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ModelError(f"{where}: config.json has no model_type")
        candidates = MODEL_TYPES.get(model_type, NAMINGS)
        first_misfit = None
        for naming in candidates:
            placed, misfit = _place(naming, names)
            if misfit is None:
                break
            first_misfit = first_misfit or misfit
        else:
            if model_type in MODEL_TYPES:
                naming = candidates[0]
                raise ModelError(
                    f"{where}: tensor {first_misfit!r} does not fit the {naming.label} layout of model_type "
                    f"{model_type!r} (expected {naming.block}.<i>.*, embeddings, final norm or {naming.head})"
                )
            raise ModelError(
                f"{where}: model_type {model_type!r} has no known tensor naming (tensor {first_misfit!r} fits "
                f"none of: {', '.join(n.label for n in NAMINGS)})"
            )
        num_layers = cls._layer_count(config, where)
        layers = {p.info.layer for p in placed.values() if p.info.layer is not None}
        beyond = [p.info.name for p in placed.values() if p.info.layer is not None and p.info.layer >= num_layers]
        if beyond:
            raise ModelError(f"{where}: tensor {beyond[0]!r} lies beyond the {num_layers} layers in config.json")
        empty = [i for i in range(num_layers) if i not in layers]
        if empty:
            raise ModelError(f"{where}: config.json says {num_layers} layers but no tensor belongs to layer {empty[0]}")
        embedding = naming.embeddings[0] + ".weight"
        if embedding not in placed:
            raise ModelError(f"{where}: no token embedding tensor {embedding!r}")
        tied = cls._tied(config, naming.head + ".weight" in placed, naming, where)
        return cls(model_type, naming, num_layers, tied, placed)

    @staticmethod
    def _layer_count(config: Mapping[str, Any], where: str) -> int:
        for key in LAYER_COUNT_KEYS:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        raise ModelError(f"{where}: config.json has no positive {' / '.join(LAYER_COUNT_KEYS)}")

    @staticmethod
    def _tied(config: Mapping[str, Any], has_head: bool, naming: Naming, where: str) -> bool:
        """Tied when config says so; when config is silent, when no head tensor is stored."""
        declared = config.get("tie_word_embeddings")
        if declared is None:
            return not has_head
        if declared is False and not has_head:
            raise ModelError(
                f"{where}: config.json sets tie_word_embeddings false but there is no {naming.head}.weight tensor"
            )
        return bool(declared)

    def __contains__(self, name: object) -> bool:
        return name in self._placed

    def __len__(self) -> int:
        return len(self._placed)

    def __iter__(self) -> Iterator[TensorInfo]:
        return (self._placed[name].info for name in self.names)

    def info(self, name: str) -> TensorInfo:
        """The layer and kind of tensor ``name``."""
        try:
            return self._placed[name].info
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in this {self.model_type} layout") from None

    def names_in_layer(self, layer: int) -> tuple[str, ...]:
        """The tensors of block ``layer``, in canonical order."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self._by_layer[layer]

    def relocate(self, name: str, layer: int) -> str:
        """The name tensor ``name`` (of some block) would have in block ``layer``; for layer stacking."""
        suffix = self._placed[name].suffix if name in self._placed else None
        if suffix is None:
            raise KeyError(f"tensor {name!r} is not inside a layer block")
        if layer < 0:
            raise IndexError(f"layer {layer} is negative")
        return f"{self.naming.block}.{layer}.{suffix}"
