"""Export a layer path as an ordinary model of its architecture: no custom code, scales folded in.

The layers are written in path order (hop j's tensors under ``<block>.j.``) with the layer count
set to the path's length, so the folder loads with ``AutoModelForCausalLM`` and the lm-eval CLI.
The input scales leave the model through the weights:

**Folding.** In a pre-norm block the stream enters every sublayer through a norm, and RMSNorm and
LayerNorm are invariant to a positive factor c (``N(c·x) = N(x)``, exactly but for ε, which becomes
ε/c²). Let x_j be the stream after hop j of the scaled path (x_j = B_j(s_j·x_{j-1})) and y_j that
of the exported model, whose hop j has the sublayer outputs divided by C_j = s_1·…·s_j. If
y_{j-1} = x_{j-1}/C_{j-1}, then s_j·x_{j-1} = C_j·y_{j-1}, each sublayer sees N(C_j·y…) = N(y…),
and B_j(C_j·y_{j-1}) = C_j·y_{j-1} + f(…) = C_j·(y_{j-1} + f(…)/C_j) = C_j·y_j: the invariant holds
after hop j (with x_0 = y_0 = the embeddings). The final norm removes C_T, so the logits agree. A
sublayer's output is linear in its output projection's weight and bias (attention output, MLP
down projection: both are divided), or, where a norm closes the sublayer (Gemma 2's post-norms),
in that norm's gain (γ ↦ γ/C_j; Gemma's (1 + w) gain: w ↦ (1 + w)/C_j − 1). Embedding scales
(Gemma's √d, Granite's multiplier) act before the first hop in both models and need nothing.

**Where it is not exact.** ε: a norm computes x/√(m + ε) for a stream of mean square m, so the
exported model, whose stream is C_j times smaller, sees ε relatively C_j² times larger; the relative
change of a norm's output is about ε·|C_j² − 1|/(2m), m the mean square the assembled path's
norm sees — negligible on trained models (m ≫ ε), about
1e-4 of the logits on tiny random fixtures, and 0 for an unscaled path (bit-identical export).
Architectures without a norm in front of every sublayer (OLMo 2 feeds the raw stream to its MLP;
post-LN transformers normalize after the residual sum) have no such invariant: a scaled path of
those is refused with the reason, as is any model type whose fold is not listed in ``FOLD_RULES``
(an unscaled path needs no fold and exports for every architecture). A negative scale would flip
the stream's sign, which norms do not remove: scales are positive. A tied head taken from another
model than the embeddings is written untied (``tie_word_embeddings: false``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.pool import ModelPool
from evomerge.pool.layer_map import LAYER_COUNT_KEYS, ModuleKind
from evomerge.recipe import LayerPath


@dataclass(frozen=True)
class FoldRule:
    """The in-block tensors (regular expressions on the name inside the block) that carry each
    sublayer's output into the residual stream: ``divide`` are scaled by 1/C, ``offset_gain`` are
    norm gains applied as (1 + w)."""

    divide: tuple[str, ...] = ()
    offset_gain: tuple[str, ...] = ()

    def folds(self, suffix: str) -> bool:
        """Whether the tensor (or module path ending in '.') ``suffix`` inside a block takes the fold."""
        return any(re.match(p, suffix) for p in (*self.divide, *self.offset_gain))

    def factor(self, suffix: str, scale: float) -> tuple[float, float]:
        """(multiplier, offset) for the tensor ``suffix`` of a hop with cumulative scale ``scale``:
        the written value is ``w · multiplier + offset``."""
        if any(re.match(p, suffix) for p in self.divide):
            return 1.0 / scale, 0.0
        if any(re.match(p, suffix) for p in self.offset_gain):
            return 1.0 / scale, 1.0 / scale - 1.0
        return 1.0, 0.0


_OUT_PROJ = FoldRule(divide=(r"self_attn\.o_proj\.", r"mlp\.down_proj\."))
_GEMMA2 = FoldRule(offset_gain=(r"post_attention_layernorm\.", r"post_feedforward_layernorm\."))
FOLD_RULES: dict[str, FoldRule] = {
    "llama": _OUT_PROJ,
    "mistral": _OUT_PROJ,
    "qwen2": _OUT_PROJ,
    "qwen3": _OUT_PROJ,
    "phi3": _OUT_PROJ,
    "gemma": _OUT_PROJ,
    "gemma2": _GEMMA2,
    "phi": FoldRule(divide=(r"self_attn\.dense\.", r"mlp\.fc2\.")),
    "gpt2": FoldRule(divide=(r"attn\.c_proj\.", r"mlp\.c_proj\.")),
}
"""Model types whose fold is derived above and verified by ``tests/test_dataflow.py`` (the folded
export against the input-scaled path with ε = 0, and against the assembled path). Every such
sublayer output is the module's output times 1/C_j, which is what the path assembler computes."""

NOT_FOLDABLE: dict[str, str] = {
    "olmo2": "its MLP reads the residual stream without a norm in front",
}


@dataclass(frozen=True)
class PathTensor:
    """One output tensor: ``name`` read as ``source`` from ``model``, written as ``w · multiplier + offset``."""

    name: str
    model: str
    source: str
    multiplier: float = 1.0
    offset: float = 0.0


def fold_rule(path: LayerPath, model_type: str) -> FoldRule:
    """How to fold ``path``'s scales into weights of ``model_type`` (a one-line error when they cannot be)."""
    if not path.scaled:
        return FoldRule()
    if model_type in FOLD_RULES:
        return FOLD_RULES[model_type]
    why = NOT_FOLDABLE.get(model_type, "no fold of the input scales is known for it")
    raise ConfigError(
        f"path: cannot export a scaled path of model_type '{model_type}' as a plain model ({why}); "
        "export an unscaled path (scaling: none) or one of: " + ", ".join(FOLD_RULES)
    )


def path_tensors(path: LayerPath, pool: ModelPool, untied_head: bool) -> Iterator[PathTensor]:
    """Every tensor of the exported model, in checkpoint order: embeddings, the hops' layers, final
    norm and head (``untied_head``: the head model's embedding written as the head)."""
    layer_map = pool.layer_map
    rule = fold_rule(path, layer_map.model_type)
    outside = [info for info in layer_map if info.layer is None]
    for info in outside:
        if info.kind == ModuleKind.EMBEDDING:
            yield PathTensor(info.name, path.embeddings, info.name)
    for position, (hop, scale) in enumerate(zip(path.hops, path.cumulative_scales())):
        for name in layer_map.names_in_layer(hop.layer):
            suffix = name[len(layer_map.naming.block) + 1 :].partition(".")[2]
            multiplier, offset = rule.factor(suffix, scale)
            yield PathTensor(layer_map.relocate(name, position), hop.model, name, multiplier, offset)
    for info in outside:
        if info.kind != ModuleKind.EMBEDDING:
            yield PathTensor(info.name, path.head_model, info.name)
    if untied_head:
        yield PathTensor(layer_map.head_name, path.head_model, layer_map.embedding_name)


def untied_head(path: LayerPath, pool: ModelPool) -> bool:
    """Whether a tied head must be written on its own: it comes from another model than the
    embeddings and the two models' embeddings differ."""
    if not pool.layer_map.tied or path.head_model == path.embeddings:
        return False
    name = pool.layer_map.embedding_name
    return not torch.equal(pool.tensor(path.embeddings, name), pool.tensor(path.head_model, name))


def path_config(path: LayerPath, pool: ModelPool, untied: bool) -> dict[str, Any]:
    """The embeddings model's config.json for the path: its layer count, per-layer types, head tie."""
    config = json.loads((pool.path(path.embeddings) / "config.json").read_text())
    if config.get("per_layer_config"):
        raise ConfigError("path: per-layer (heterogeneous) configs cannot be written as a path")
    keys = [key for key in LAYER_COUNT_KEYS if key in config] or [LAYER_COUNT_KEYS[0]]
    for key in keys:
        config[key] = len(path.hops)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [_layer_types(pool, hop.model)[hop.layer] for hop in path.hops]
    if untied:
        config["tie_word_embeddings"] = False
    return config


def _layer_types(pool: ModelPool, model: str) -> list[str]:
    types = json.loads((pool.path(model) / "config.json").read_text()).get("layer_types")
    if not isinstance(types, list):
        raise ConfigError(f"path: model '{model}' has no layer_types in its config, unlike the embeddings model")
    return types


def check_path(path: LayerPath, pool: ModelPool) -> None:
    """A one-line error if ``path`` cannot be exported (empty, too long, a missing layer, an unfoldable scale)."""
    path.check({name: pool.layer_map.num_layers for name in pool.names})
    fold_rule(path, pool.layer_map.model_type)


def read_path_tensor(pool: ModelPool, tensor: PathTensor, device: str | torch.device, out: torch.Tensor) -> torch.Tensor:
    """``tensor``'s value read into the float32 buffer ``out``, folded."""
    value = pool.tensor(tensor.model, tensor.source, device=device, out=out)
    if tensor.multiplier != 1.0:
        value.mul_(tensor.multiplier)
    if tensor.offset != 0.0:
        value.add_(tensor.offset)
    return value
