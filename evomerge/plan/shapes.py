"""The shapes a memory plan needs, read without loading a weight.

A model folder with safetensors weights is described by their headers (names, shapes, stored
dtypes: ``ModelPool.open`` reads nothing else). A folder holding only ``config.json`` — how a user
plans a 7B job from a laptop — is described by its config: the model is instantiated on PyTorch's
``meta`` device, which allocates nothing, and its parameters are the tensors a checkpoint would
hold, stored in the config's ``torch_dtype``. Either way the merged model's own size (parameters
and buffers in the worker's dtype, a tied head once) comes from that meta instance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ModelError
from evomerge.io.config import read_config
from evomerge.io.safetensors_reader import INDEX_FILE, SINGLE_FILE
from evomerge.pool.layer_map import LayerMap
from evomerge.pool.sources import resolve_source


@dataclass(frozen=True)
class TensorShape:
    """One floating tensor the merge writes: its name, shape, layer and kind, and each model's stored dtype."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    kind: str
    stored: Mapping[str, torch.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Dimensions:
    """What the evaluation's memory depends on: layers, attention heads, widths, vocabulary."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Dimensions:
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config

        def first(*keys: str, default: Any = None) -> Any:
            return next((text[k] for k in keys if isinstance(text.get(k), int)), default)

        hidden = first("hidden_size", "n_embd", "d_model", default=0)
        heads = first("num_attention_heads", "n_head", default=1)
        head_dim = first("head_dim", default=hidden // max(heads, 1))
        return cls(
            layers=first("num_hidden_layers", "n_layer", "num_layers", default=0),
            hidden=hidden,
            heads=heads,
            kv_heads=first("num_key_value_heads", default=heads),
            head_dim=head_dim,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden,
            vocab=first("vocab_size", default=0),
            max_positions=first("max_position_embeddings", "n_positions", "n_ctx"),
        )


@dataclass(frozen=True)
class PoolShape:
    """The models of a worker's pool as the plan sees them (no weight read)."""

    names: tuple[str, ...]
    base: str | None
    reference: str
    tensors: tuple[TensorShape, ...]
    dims: Dimensions
    config_only: tuple[str, ...]
    """Models described by their config.json alone (no weights: they can be planned, not run)."""
    skeleton: dict[str, int]
    """Bytes of the merged model (parameters and buffers) per worker dtype name."""
    tokenizer_folder: Path | None

    @property
    def num_layers(self) -> int:
        return self.dims.layers

    @property
    def largest(self) -> int:
        """Entries of the largest floating tensor (what per-tensor buffers are sized by)."""
        return max((t.numel for t in self.tensors), default=0)

    def stored_bytes(self, model: str) -> int:
        """``model``'s floating tensors in their stored dtypes."""
        return sum(t.numel * t.stored[model].itemsize for t in self.tensors)

    def parameters(self) -> int:
        """Entries of the floating tensors the merge writes (a tied head's copy counted as written)."""
        return sum(t.numel for t in self.tensors)


DTYPES = ("float32", "float16", "bfloat16")


def has_weights(folder: Path) -> bool:
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()


def read_pool_shape(models: Mapping[str, str], base: str | None) -> PoolShape:
    """Shapes of the pool ``models`` (name → pinned reference) from headers, or configs where there are no weights."""
    folders = {name: resolve_source(ref, where=f"model {name!r}", require_folder=False) for name, ref in models.items()}
    config_only = tuple(name for name, source in folders.items() if source.adapter is None and not has_weights(source.path))
    reference = base if base is not None else next(n for n in models if n != base)
    if not config_only:
        return _from_pool(models, base, reference)
    if len(config_only) < len(models):
        weighted = next(n for n in models if n not in config_only)
        raise ModelError(
            f"model {config_only[0]!r} ({folders[config_only[0]].path}) has no safetensors weights while model "
            f"{weighted!r} has: plan with every model described by its config.json only, or with every model's weights"
        )
    return _from_configs({name: source.path for name, source in folders.items()}, base, reference)


def _from_pool(models: Mapping[str, str], base: str | None, reference: str) -> PoolShape:
    from evomerge.pool import ModelPool

    with ModelPool.open(dict(models), base) as pool:
        return pool_shape(pool)


def pool_shape(pool: Any) -> PoolShape:
    """The shape of an open ``ModelPool`` (what a worker plans with)."""
    layer_map = pool.layer_map
    tensors = []
    for name in pool.tensor_names:
        if not pool.dtype(pool.reference, name).is_floating_point:
            continue
        info = layer_map.info(name)
        # a LoRA source's adapted tensors exist only in float32 (what compact placements keep)
        stored = {m: torch.float32 if pool.source(m).adapter is not None else pool.dtype(m, name) for m in pool.names}
        tensors.append(TensorShape(name, tuple(pool.shape(pool.reference, name)), info.layer, info.kind.value, stored))
    folder = pool.path(pool.reference)
    return PoolShape(
        names=tuple(pool.names),
        base=pool.base,
        reference=pool.reference,
        tensors=tuple(tensors),
        dims=Dimensions.from_config(pool.config),
        config_only=(),
        skeleton=skeleton_bytes(folder),
        tokenizer_folder=folder,
    )


def _from_configs(folders: Mapping[str, Path], base: str | None, reference: str) -> PoolShape:
    config = read_config(folders[reference])
    meta = _meta_model(folders[reference], torch.float32)
    names = {n: tuple(p.shape) for n, p in meta.state_dict().items() if p.dtype.is_floating_point}
    where = f"model {reference!r} ({folders[reference]})"
    layer_map = LayerMap.build(config, names, where)
    stored = {model: _config_dtype(read_config(folder)) for model, folder in folders.items()}
    for model, folder in folders.items():
        other = read_config(folder)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if other.get(key) != config.get(key):
                raise ModelError(
                    f"models {reference!r} and {model!r} differ: config.json {key} is {config.get(key)!r} vs {other.get(key)!r}"
                )
    tensors = tuple(
        TensorShape(name, names[name], layer_map.info(name).layer, layer_map.info(name).kind.value, stored)
        for name in layer_map.names
        if name in names
    )
    tokenizer = folders[reference] if any((folders[reference] / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    return PoolShape(
        names=tuple(folders),
        base=base,
        reference=reference,
        tensors=tensors,
        dims=Dimensions.from_config(config),
        config_only=tuple(folders),
        skeleton=skeleton_bytes(folders[reference]),
        tokenizer_folder=tokenizer,
    )


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _meta_model(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``folder``'s config instantiated on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    except (ValueError, OSError, KeyError) as err:
        raise ModelError(f"{folder}: cannot build the model from config.json: {str(err).strip().splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def skeleton_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the live model per dtype name: its parameters (tied ones once) in that dtype, and its
    buffers (rotary frequencies stay float32)."""
    model = _meta_model(folder, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {name: params * getattr(torch, name).itemsize + buffers for name in DTYPES}
