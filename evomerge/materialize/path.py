"""The path assembler: a layer path as a live model whose layers *are* the resident source layers.

Every model of the pool is loaded once (``from_pretrained`` on the worker's device and dtype). A
path is then assembled without copying a weight: the model is a shallow clone of the embeddings
model (same class, so lm-eval, ``generate`` and evomerge's fast greedy loop see an ordinary
transformers model), whose layer list holds one *hop* per step of the path, whose final norm and
head are the head model's, and whose config says ``num_hidden_layers`` = the path's length.

A hop is a shallow clone of a source layer: new module objects (a few dicts of references) holding
the very same parameter tensors. Two things differ from the source layer. Its attention modules get
``layer_idx`` = the hop's position, because transformers keys the KV cache by ``layer_idx``: a layer
used twice is two hops that must not share a cache slot. And the hop applies its scale.

A scale s_j multiplies the stream entering hop j (Sakana's definition). Where the architecture has
a fold (``path_export.FOLD_RULES``: pre-norm blocks), the assembler computes the *folded* form the
export writes — the stream divided by C_j = s_1·…·s_j, i.e. each sublayer output that joins the
residual stream (attention output, MLP down projection, Gemma 2's post-norms) multiplied by 1/C_j
by a forward hook — which is the scaled path up to the norms' ε and the exported model up to float
rounding, so the model a run scores is the model it ships. Elsewhere a forward pre-hook scales the
hop's input (such paths are searched but not exported). Clones are cached by (model, layer,
position), so assembling a path is a list of dictionary look-ups, a few attribute writes and one
``ModuleList`` (``benchmarks/path_assembly.py`` measures it).

Example::

    assembler = PathAssembler.load(pool, device="cpu")
    assembler.apply(path)          # assembler.model now *is* the path's model
    assembler.model.generate(...)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.errors import ConfigError, ModelError
from evomerge.materialize.path_export import FOLD_RULES, FoldRule
from evomerge.materialize.registry import register_materializer
from evomerge.pool import ModelPool
from evomerge.recipe import LayerPath

_SCALE = "_evomerge_path_scale"
"""Attribute of a hop (input scale) or of a sublayer output module (1/C_j) holding this path's factor."""


class PathAssembler:
    """Resident source models; ``apply(path)`` links their layers into ``model`` by reference."""

    def __init__(self, pool: ModelPool, models: dict[str, PreTrainedModel]) -> None:
        self.pool = pool
        self.sources = models
        naming = pool.layer_map.naming
        self._container, _, self._layers_name = naming.block.rpartition(".")
        self._final_norms = naming.final_norms
        self._head = naming.head
        self._layers = {name: list(_child(model, naming.block)) for name, model in models.items()}
        for name, model in models.items():
            if getattr(model.config, "is_heterogeneous", False):
                raise ModelError(f"model '{name}': per-layer (heterogeneous) configs cannot be assembled into a path")
        self._fold: FoldRule | None = FOLD_RULES.get(pool.layer_map.model_type)
        self._hops: dict[tuple[str, int, int], tuple[torch.nn.Module, list[torch.nn.Module]]] = {}
        self._shells: dict[tuple[str, str], PreTrainedModel] = {}
        self.model: PreTrainedModel | None = None

    @classmethod
    def load(
        cls, pool: ModelPool, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> PathAssembler:
        """Load every model of ``pool`` once (a LoRA source with its adapter applied)."""
        models = {}
        for name in pool.names:
            model = AutoModelForCausalLM.from_pretrained(pool.path(name), dtype=dtype or torch.float32)
            if pool.source(name).adapter is not None:
                params = dict(model.named_parameters(remove_duplicate=False))
                with torch.no_grad():
                    for tensor in pool.tensor_names:
                        params[tensor].copy_(pool.tensor(name, tensor))
            models[name] = model.to(device).eval()
        return cls(pool, models)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The live model, typed for Hugging Face consumers (lm-eval's HFLM)."""
        if self.model is None:
            raise ConfigError("path assembler: no path applied yet")
        return self.model

    def apply(self, path: LayerPath) -> None:
        """Make ``model`` the model of ``path`` (a one-line error if it cannot be assembled)."""
        self._check(path)
        shell = self._shell(path.embeddings, path.head_model)
        factors = [1.0 / c for c in path.cumulative_scales()] if self._fold else [hop.scale for hop in path.hops]
        hops = [self._hop(hop.model, hop.layer, position, factor) for position, (hop, factor) in enumerate(zip(path.hops, factors))]
        _child(shell, self._container)._modules[self._layers_name] = torch.nn.ModuleList(hops)
        config = shell.config
        config.num_hidden_layers = len(hops)
        layer_types = [self._layer_type(hop.model, hop.layer) for hop in path.hops]
        if None not in layer_types:
            config.layer_types = layer_types
        self.model = shell

    def close(self) -> None:
        """Drop the assembled model, the clones and the source models (the pool belongs to the caller)."""
        self.model = None
        self._hops.clear()
        self._shells.clear()
        self.sources.clear()
        self._layers.clear()

    def _check(self, path: LayerPath) -> None:
        for name, ref in path.models.items():
            if name not in self.sources:
                raise ConfigError(f"path.models: '{name}' is not in this worker's model pool ({', '.join(self.sources)})")
            pooled = self.pool.source(name).ref
            if ref != pooled and Path(ref).resolve() != Path(pooled).resolve():
                raise ConfigError(f"path.models.{name}: '{ref}' differs from the pool's '{pooled}'")
        path.check({name: len(layers) for name, layers in self._layers.items()})

    def _layer_type(self, model: str, layer: int) -> str | None:
        types = getattr(self.sources[model].config, "layer_types", None)
        return types[layer] if types is not None else None

    def _hop(self, model: str, layer: int, position: int, factor: float) -> torch.nn.Module:
        """Layer ``layer`` of ``model`` as hop ``position`` (a cached clone) with this path's factor:
        1/C_j on its sublayer outputs (folded), or s_j on its input."""
        key = (model, layer, position)
        if key not in self._hops:
            hop = _clone_tree(self._layers[model][layer])
            for module in hop.modules():
                if "layer_idx" in module.__dict__:
                    module.layer_idx = position
            if self._fold is not None:
                targets = [m for name, m in hop.named_modules() if name and self._fold.folds(f"{name}.")]
                if not targets:
                    raise ModelError(f"model '{model}' layer {layer}: no module to fold a scale into ({type(hop).__name__})")
                for target in targets:
                    target.register_forward_hook(_scale_output)
            else:
                targets = [hop]
                hop.register_forward_pre_hook(_scale_input, with_kwargs=True)
            self._hops[key] = (hop, targets)
        hop, targets = self._hops[key]
        for target in targets:
            setattr(target, _SCALE, float(factor))
        return hop

    def _shell(self, embeddings: str, head: str) -> PreTrainedModel:
        """The embeddings model's clone with the head model's final norm and head (cached per pair)."""
        key = (embeddings, head)
        shell = self._shells.get(key)
        if shell is None:
            source = self.sources[embeddings]
            shell = _clone_path(source, self._container)
            shell.config = copy.deepcopy(source.config)
            _child(shell, self._container).config = shell.config
            for name in (*self._final_norms, self._head):
                parent, _, attribute = name.rpartition(".")
                module = _child(self.sources[head], name, missing_ok=True)
                if module is not None:
                    _child(shell, parent)._modules[attribute] = module
            self._shells[key] = shell
        return shell


def _scale_output(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a sublayer output module: its output times 1/C_j (the fold the export writes)."""
    factor = getattr(module, _SCALE)
    return None if factor == 1.0 else output * factor


def _scale_input(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook of a hop (architectures without a fold): its input hidden state times s_j."""
    scale = getattr(module, _SCALE)
    if scale == 1.0:
        return None
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing every attribute value of ``module`` but owning its containers
    (parameter, buffer, submodule and hook dictionaries), so changing the clone leaves the source alone."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__.update(
        {key: copy.copy(value) if isinstance(value, (dict, set)) else value for key, value in module.__dict__.items()}
    )
    return clone


def _clone_tree(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` and all its submodules cloned shallowly: the same tensors, new module objects."""
    clone = _shallow(module)
    for name, child in module._modules.items():
        clone._modules[name] = None if child is None else _clone_tree(child)
    return clone


def _clone_path(module: torch.nn.Module, dotted: str) -> torch.nn.Module:
    """``module`` and the chain of submodules down to ``dotted`` cloned shallowly; the rest shared."""
    clone = _shallow(module)
    if dotted:
        head, _, rest = dotted.partition(".")
        clone._modules[head] = _clone_path(module._modules[head], rest)
    return clone


def _child(module: torch.nn.Module, dotted: str, *, missing_ok: bool = False) -> Any:
    """The submodule at ``dotted`` ('' is ``module`` itself)."""
    for part in filter(None, dotted.split(".")):
        if part not in module._modules:
            if missing_ok:
                return None
            raise ModelError(f"{type(module).__name__} has no submodule '{part}' (of '{dotted}')")
        module = module._modules[part]
    return module


@register_materializer("path")
def _path_assembler(pool: ModelPool, device: torch.device, dtype: torch.dtype, **plan: object) -> PathAssembler:
    """Paths link resident layers by reference: every source stays resident whatever the plan's placement."""
    return PathAssembler.load(pool, device=device, dtype=dtype)
