"""In-place materialization for the search: one live model, rewritten for every candidate.

A search worker loads its pool once: the base and source tensors stay resident (float32) on the
worker's device next to one model skeleton. ``apply(recipe)`` writes every floating parameter of
the skeleton in place — no disk I/O, no re-instantiation — so a candidate costs only the merge
arithmetic. Per-tensor caches keep what never changes between candidates (task vectors, their order
statistics). Every floating tensor is rewritten on every apply, so the model after any sequence of
recipes equals a fresh materialization of the last one.

Example::

    merger = ResidentMerger.load(pool, device="cpu")
    merger.apply(recipe)            # merger.model now *is* the merged model
    merger.model.generate(...)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.errors import ConfigError, ModelError
from evomerge.materialize.registry import register_materializer
from evomerge.materialize.tensors import blend_tensor, is_mergeable, merge_tensor
from evomerge.merge.fused import repeated_merges
from evomerge.pool import ModelPool
from evomerge.recipe import Blend, Blueprint, Recipe, RecipePlanner, order_digest


class ResidentMerger:
    """Resident sources + one model skeleton; ``apply`` materializes a recipe into it in place."""

    def __init__(self, pool: ModelPool, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.pool = pool
        self.model = model
        self.device = torch.device(device)
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(dict(model.named_buffers(remove_duplicate=False)))
        missing = [name for name in pool.tensor_names if name not in targets]
        if missing:
            raise ModelError(
                f"{pool.path(pool.reference)}: the model skeleton has no parameter '{missing[0]}' "
                f"({len(missing)} tensor(s) of the checkpoint are not in the model)"
            )
        self._targets = {
            name: targets[name].data for name in pool.tensor_names if is_mergeable(targets[name].dtype)
        }
        self._tensors = {
            model_name: {name: pool.tensor(model_name, name, device=self.device) for name in self._targets}
            for model_name in pool.names
        }
        self._scratch = {
            name: torch.empty(t.shape, dtype=torch.float32, device=self.device)
            for name, t in self._targets.items()
            if t.dtype != torch.float32 or not t.is_contiguous()
        }
        self._caches: dict[tuple, dict] = {}
        self._order = pool.parameter_order()

    @classmethod
    def load(
        cls,
        pool: ModelPool,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> ResidentMerger:
        """Instantiate the reference model once as the skeleton and keep the pool resident."""
        model = AutoModelForCausalLM.from_pretrained(
            pool.path(pool.reference),
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
        )
        model.to(device).eval()
        return cls(pool, model, device)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The live model, typed for Hugging Face consumers (lm-eval's HFLM)."""
        return self.model  # type: ignore[return-value]

    @torch.no_grad()
    def apply(self, recipe: Blueprint) -> None:
        """Write the merge described by ``recipe`` (a parameter recipe or a blend) into the live model."""
        self._check_models(recipe)
        if isinstance(recipe, Blend):
            self._write_blend(recipe)
            return
        with repeated_merges():  # a worker merges the same tensors for every candidate
            self._write(recipe)

    def _write_blend(self, blend: Blend) -> None:
        if order_digest(self._order) != blend.order:
            raise ConfigError("blend: it was made over another parameter order than this pool's")
        offset = 0
        for name, numel in self._order:
            target = self._targets[name]
            out = self._scratch.get(name, target)
            blend_tensor(blend, offset, numel, {m: self._tensors[m][name] for m in blend.models}, out)
            if out.data_ptr() != target.data_ptr():
                target.copy_(out)
            offset += numel

    def _write(self, recipe: Recipe) -> None:
        layer_map = self.pool.layer_map
        planner = RecipePlanner(recipe, layer_map.num_layers)
        sources = recipe.source_names
        for name, target in self._targets.items():
            info = layer_map.info(name)
            plan = planner.plan(name, info.layer, info.kind.value)
            out = self._scratch.get(name, target)
            result = merge_tensor(
                plan,
                base=self._tensors[recipe.base][name] if recipe.base else None,
                sources=[self._tensors[model][name] for model in sources],
                source_names=sources,
                num_layers=layer_map.num_layers,
                seed=recipe.seed,
                cache=self._caches.setdefault((name, recipe.base, tuple(sources)), {}),
                out=out,
            )
            if result.data_ptr() != target.data_ptr():
                target.copy_(result)

    def close(self) -> None:
        """Drop the skeleton and the resident tensors (the pool belongs to the caller)."""
        self._tensors.clear()
        self._caches.clear()

    def _check_models(self, recipe: Blueprint) -> None:
        for name, ref in recipe.models.items():
            if name not in self._tensors:
                raise ConfigError(f"recipe.models: '{name}' is not in this worker's model pool ({', '.join(self._tensors)})")
            pooled = self.pool.source(name).ref
            if ref != pooled and Path(ref).resolve() != Path(pooled).resolve():
                raise ConfigError(f"recipe.models.{name}: '{ref}' differs from the pool's '{pooled}'")


@register_materializer("recipe", "blend")
def _resident_merger(pool: ModelPool, device: torch.device, dtype: torch.dtype) -> ResidentMerger:
    return ResidentMerger.load(pool, device=device, dtype=dtype)
