"""In-place materialization for the search: one live model, rewritten for every candidate.

A search worker loads its pool once — the base and source tensors held where its placement says
(``evomerge.materialize.placement``: float32 on the device, stored dtype on the device, or stored
dtype in host memory) — next to one model skeleton. ``apply(recipe)`` writes every floating
parameter of the skeleton in place — no re-instantiation — so a candidate costs only the merge
arithmetic (and, off the ``resident`` placement, one conversion or copy per input tensor). The
merge runs in float32 on the device and is cast once into the skeleton's dtype.

Per-tensor caches keep what never changes between candidates (task vectors, their order
statistics, random keys); with a ``cache_bytes`` budget a tensor gets one only while the budget
lasts (in merge order, never evicted), and the others are merged from scratch. A tensor whose
merge is the same as the one that wrote it last (same operator, parameters, models and seed — a
layer the recipe does not change) is left as it is. So the model after any sequence of recipes
equals a fresh materialization of the last one.

Example::

    merger = ResidentMerger.load(pool, device="cpu")
    merger.apply(recipe)            # merger.model now *is* the merged model
    merger.model.generate(...)
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.errors import ConfigError, ModelError
from evomerge.materialize.placement import SourceTensors, load_sources
from evomerge.materialize.registry import register_materializer
from evomerge.materialize.tensors import BufferPool, blend_tensor, is_mergeable, merge_tensor
from evomerge.merge.fused import repeated_merges
from evomerge.pool import ModelPool
from evomerge.recipe import Blend, Blueprint, Recipe, RecipePlanner, TensorPlan, order_digest


class ResidentMerger:
    """Sources held per placement + one model skeleton; ``apply`` materializes a recipe into it in place."""

    def __init__(
        self,
        pool: ModelPool,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        placement: str = "resident",
        cache_bytes: int | None = None,
    ):
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
        self.sources: SourceTensors = load_sources(pool, list(self._targets), self.device, placement)
        self._out = BufferPool(self.device)
        self._caches: dict[tuple, dict] = {}
        self.cache_budget = cache_bytes
        self.cache_reserved = 0
        self._written: dict[str, Hashable] = {}
        self.last_apply = {"merged": 0, "unchanged": 0}
        self._order = pool.parameter_order()

    @property
    def placement(self) -> str:
        return self.sources.placement

    @classmethod
    def load(
        cls,
        pool: ModelPool,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        placement: str = "resident",
        cache_bytes: int | None = None,
    ) -> ResidentMerger:
        """Instantiate the reference model once as the skeleton and hold the pool per ``placement``.

        On an accelerator the skeleton is loaded straight onto it (``device_map``), so the host never
        holds a whole copy of it.
        """
        on_device = {"device_map": {"": str(device)}} if torch.device(device).type != "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(
            pool.path(pool.reference),
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
            **on_device,
        )
        model.to(device).eval()
        return cls(pool, model, device, placement=placement, cache_bytes=cache_bytes)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The live model, typed for Hugging Face consumers (lm-eval's HFLM)."""
        return self.model  # type: ignore[return-value]

    @torch.no_grad()
    def apply(self, recipe: Blueprint) -> None:
        """Write the merge described by ``recipe`` (a parameter recipe or a blend) into the live model."""
        self._check_models(recipe)
        self.last_apply = {"merged": 0, "unchanged": 0}
        if isinstance(recipe, Blend):
            self._write_blend(recipe)
            return
        with repeated_merges():  # a worker merges the same tensors for every candidate
            self._write(recipe)

    def _write_blend(self, blend: Blend) -> None:
        if order_digest(self._order) != blend.order:
            raise ConfigError("blend: it was made over another parameter order than this pool's")
        offset = 0
        models = list(blend.models)
        for name, numel in self._order:
            pieces = tuple((lo, hi, tuple(sorted(w.items()))) for lo, hi, w in blend.pieces(offset, numel))
            target = self._targets[name]
            offset += numel
            if self._unchanged(name, ("blend", tuple(models), pieces)):
                continue
            out = self._output(target)
            inputs = {m: self.sources.get(m, name, f"model{i}") for i, m in enumerate(models)}
            blend_tensor(blend, offset - numel, numel, inputs, out)
            self._store(name, target, out, ("blend", tuple(models), pieces))

    def _write(self, recipe: Recipe) -> None:
        layer_map = self.pool.layer_map
        planner = RecipePlanner(recipe, layer_map.num_layers)
        sources = recipe.source_names
        for name, target in self._targets.items():
            info = layer_map.info(name)
            plan = planner.plan(name, info.layer, info.kind.value)
            signature = _signature(plan, recipe, sources)
            if self._unchanged(name, signature):
                continue
            out = self._output(target)
            result = merge_tensor(
                plan,
                base=self.sources.get(recipe.base, name, "base") if recipe.base else None,
                sources=[self.sources.get(model, name, f"source{i}") for i, model in enumerate(sources)],
                source_names=sources,
                num_layers=layer_map.num_layers,
                seed=recipe.seed,
                cache=self._cache(name, recipe.base, tuple(sources), plan, target.numel()),
                out=out,
            )
            self._store(name, target, result, signature)

    def _unchanged(self, name: str, signature: Hashable) -> bool:
        """Whether ``name`` already holds this merge; else forget what it held (it is about to change)."""
        if self._written.get(name) == signature:
            self.last_apply["unchanged"] += 1
            return True
        self._written.pop(name, None)
        return False

    def _store(self, name: str, target: torch.Tensor, result: torch.Tensor, signature: Hashable) -> None:
        """Cast the float32 result once into the live tensor and remember what it holds."""
        if result.data_ptr() != target.data_ptr():
            target.copy_(result)
        self._written[name] = signature
        self.last_apply["merged"] += 1

    def _output(self, target: torch.Tensor) -> torch.Tensor:
        """Where the float32 merge is written: the live tensor itself when it is float32, else one reused buffer."""
        if target.dtype == torch.float32 and target.is_contiguous():
            return target
        return self._out.get("out", target.shape)

    def _cache(self, name: str, base: str | None, sources: tuple[str, ...], plan: TensorPlan, numel: int) -> dict | None:
        """The tensor's cache, opened if the budget has room for what its operator may keep."""
        key = (name, base, sources)
        cache = self._caches.get(key)
        if cache is not None:
            return cache
        cost = plan.operator.memory.cache_bytes(numel, len(sources))
        if self.cache_budget is not None and self.cache_reserved + cost > self.cache_budget:
            return None
        self.cache_reserved += cost
        cache = self._caches[key] = {}
        return cache

    @property
    def cache_nbytes(self) -> int:
        """Bytes the caches hold now (tensors inside them, at any nesting)."""
        return sum(_nbytes(value) for cache in self._caches.values() for value in cache.values())

    def close(self) -> None:
        """Drop the held sources, the caches and the output buffer (the pool belongs to the caller)."""
        self.sources.release()
        self._caches.clear()
        self._written.clear()
        self._out = BufferPool(self.device)

    def _check_models(self, recipe: Blueprint) -> None:
        for name, ref in recipe.models.items():
            if name not in self.pool.names:
                raise ConfigError(f"recipe.models: '{name}' is not in this worker's model pool ({', '.join(self.pool.names)})")
            pooled = self.pool.source(name).ref
            if ref != pooled and Path(ref).resolve() != Path(pooled).resolve():
                raise ConfigError(f"recipe.models.{name}: '{ref}' differs from the pool's '{pooled}'")


def _signature(plan: TensorPlan, recipe: Recipe, sources: list[str]) -> Hashable:
    """What determines a tensor's merge: operator, parameters, models and seed."""
    per_source = tuple(tuple(sorted(p.items())) for p in plan.params.per_source)
    return (plan.operator.name, tuple(sorted(plan.params.shared.items())), per_source, recipe.base, tuple(sources), recipe.seed)


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@register_materializer("recipe", "blend")
def _resident_merger(
    pool: ModelPool, device: torch.device, dtype: torch.dtype, *, placement: str = "resident", cache_bytes: int | None = None
) -> ResidentMerger:
    return ResidentMerger.load(pool, device=device, dtype=dtype, placement=placement, cache_bytes=cache_bytes)
