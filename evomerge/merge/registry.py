"""The merge-operator registry and the per-tensor calling convention.

An operator merges *one tensor*: it gets the base tensor (if any) and the source tensors, already
upcast to float32, plus its parameters resolved to plain values for that tensor, and returns a
float32 tensor. Everything about *which* tensor, layer or model is in ``TensorInputs`` so that the
math stays a pure function and randomness is reproducible from (seed, model, tensor) alone.

A new operator is one function and one decorator::

    @register_operator("my_op", per_source={"weight": ParamDef(1.0)})
    def my_op(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
        ...

``out``, when given, is a preallocated float32 buffer of the tensor's shape; the operator writes its
result there and returns it (in-place materialization reuses buffers instead of allocating).

A *blockwise* operator can also merge a tensor block by block, so an export holds a few blocks
instead of every source's whole tensor: it is called on consecutive flat blocks (``offset`` = the
block's first entry, a multiple of the chunk size) and must give exactly the entries of the
whole-tensor call. Statistics of the whole tensor that it needs (a magnitude threshold, a random
stream) come from its ``prepare`` hook, which reads the tensor in streamed passes (a
``TensorStream``) and returns them as ``TensorInputs.stats``.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from evomerge.errors import ConfigError

ParamValue = float | int | bool | str | None
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class ParamDef:
    """One operator parameter: its default, type and inclusive bounds.

    ``required`` parameters have no sensible default (e.g. which source a layer comes from); a
    missing value is then a one-line error when the recipe is resolved, not when a tensor is merged.
    """

    default: ParamValue
    kind: type = float
    low: float | None = None
    high: float | None = None
    doc: str = ""
    required: bool = False

    def validate(self, where: str, value: Any) -> ParamValue:
        """Return ``value`` coerced to ``kind``; raise a one-line ``ConfigError`` naming ``where``."""
        if value is None:
            if self.required:
                raise ConfigError(f"{where}: required, expected a {self.kind.__name__}")
            if self.default is None:
                return None
            raise ConfigError(f"{where}: expected a {self.kind.__name__}, got null")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not abs(value) <= _FLOAT32_MAX:
                raise ConfigError(f"{where}: expected a finite float32 number, got {value!r}")
        if self.low is not None and value < self.low:
            raise ConfigError(f"{where}: expected a value >= {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"{where}: expected a value <= {self.high}, got {value!r}")
        return value


@dataclass
class Params:
    """An operator's parameters resolved to plain values for one tensor."""

    shared: dict[str, ParamValue] = field(default_factory=dict)
    per_source: list[dict[str, ParamValue]] = field(default_factory=list)

    def source_values(self, key: str) -> list[Any]:
        """The per-source values of ``key``, in source order."""
        return [p[key] for p in self.per_source]


def seed_for(seed: int, model: str, tensor: str) -> int:
    """A 63-bit seed derived from (seed, model, tensor): stable across runs, processes and order."""
    digest = hashlib.blake2b(f"{seed}\x00{model}\x00{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class TensorInputs:
    """Everything an operator may know about the tensor it merges.

    ``sources`` are the models being merged, in recipe order, *not* including the base. ``cache`` is
    an optional dict owned by the caller and kept for the same tensor across calls (a search
    worker keeps one per tensor so task vectors and their order statistics are computed once).
    In a blockwise call, the tensors are one flat block starting at entry ``offset`` of the tensor
    and ``stats`` holds what the operator's ``prepare`` hook computed from the whole tensor.
    """

    name: str
    base: torch.Tensor | None
    sources: Sequence[torch.Tensor]
    source_names: Sequence[str]
    layer: int | None = None
    num_layers: int = 1
    kind: str = "other"
    seed: int = 0
    cache: dict[str, Any] | None = None
    offset: int = 0
    stats: dict[str, Any] | None = None

    @property
    def layer_fraction(self) -> float:
        """ℓ/(L−1) for a block tensor, 0 for tensors outside the blocks (mergekit's convention)."""
        if self.layer is None or self.num_layers <= 1:
            return 0.0
        return self.layer / (self.num_layers - 1)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return ``cache[key]``, computing and storing it on first use (no cache: just compute)."""
        if self.cache is None:
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def task_vector(self, i: int) -> torch.Tensor:
        """τᵢ = θᵢ − θ₀ (float32), cached when a cache is attached."""
        if self.base is None:
            raise ConfigError(f"tensor {self.name}: this merge method needs a base model")
        return self.cached(f"tv{i}", lambda: self.sources[i] - self.base)

    def generator(self, i: int, device: torch.device | None = None) -> torch.Generator:
        """A fresh generator for source ``i`` seeded by (seed, source name, tensor name)."""
        gen = torch.Generator(device=device if device is not None else self.sources[i].device)
        gen.manual_seed(seed_for(self.seed, self.source_names[i], self.name))
        return gen


class TensorStream(Protocol):
    """One tensor of every model, read block by block (the whole tensor never in memory at once).

    Blocks are flat, consecutive, in order, and start at multiples of the chunk size; each call
    starts a new pass.
    """

    numel: int
    device: torch.device

    def task_vector_blocks(self, i: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, τᵢ block) for source ``i``, the block valid until the next one is drawn."""
        ...

    def blocks(self, i: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, block) of source ``i``'s tensor, or of the base's for None."""
        ...


def lockstep(*passes: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Several passes of a ``TensorStream`` advanced together: (offset, [block of each])."""
    for items in zip(*passes):
        yield items[0][0], [block for _, block in items]


@dataclass(frozen=True)
class MemoryCost:
    """What merging one tensor holds beyond its inputs and output, in bytes per entry of the tensor.

    ``cache_per_source``: kept per source across candidates when the caller attaches a cache (task
    vectors, sorted magnitudes, random keys), and ``fill`` held for a moment while one source's
    entry is built (a sort's scratch); ``work_per_source`` and ``work``: held while one call runs
    without a cache. Memory plans (``evomerge plan``) add these up; the default is a safe bound for
    an operator that declares nothing (one float32 temporary per source and one more).
    """

    cache_per_source: int = 0
    fill: int = 0
    work_per_source: int = 4
    work: int = 4

    def cache_bytes(self, numel: int, sources: int) -> int:
        return self.cache_per_source * sources * numel

    def work_bytes(self, numel: int, sources: int, cached: bool) -> int:
        """The most a call holds besides inputs, output and cache (a cached call: while filling it)."""
        if cached and self.cache_per_source:
            return (self.fill + self.work) * numel
        return (self.work_per_source * sources + self.work) * numel


OperatorFn = Callable[[TensorInputs, Params, "torch.Tensor | None"], torch.Tensor]
PrepareFn = Callable[[TensorInputs, Params, TensorStream], dict[str, Any]]


@dataclass(frozen=True)
class OperatorSpec:
    """A registered operator: the function and the parameters it accepts."""

    name: str
    fn: OperatorFn
    shared: Mapping[str, ParamDef]
    per_source: Mapping[str, ParamDef]
    needs_base: bool
    min_sources: int
    max_sources: int | None
    stochastic: bool
    doc: str
    blockwise: bool | Callable[[Params], bool] = False
    prepare: PrepareFn | None = None
    memory: MemoryCost = MemoryCost()

    def merges_blockwise(self, params: Params) -> bool:
        """Whether a call with ``params`` may run block by block."""
        return self.blockwise(params) if callable(self.blockwise) else self.blockwise

    def resolve(self, shared: Mapping[str, Any], per_source: Sequence[Mapping[str, Any]], where: str) -> Params:
        """Validate raw values against the declared parameters and fill in defaults."""
        self.check_keys(shared, self.shared, f"{where}.parameters")
        out_shared = {
            key: d.validate(f"{where}.parameters.{key}", shared.get(key, d.default)) for key, d in self.shared.items()
        }
        out_per_source = []
        for i, values in enumerate(per_source):
            self.check_keys(values, self.per_source, f"{where}.model_parameters[{i}]")
            out_per_source.append(
                {
                    key: d.validate(f"{where}.model_parameters[{i}].{key}", values.get(key, d.default))
                    for key, d in self.per_source.items()
                }
            )
        return Params(out_shared, out_per_source)

    def check_arity(self, n_sources: int, has_base: bool, where: str) -> None:
        """Raise a one-line error when the number of sources or the base does not fit."""
        if self.needs_base and not has_base:
            raise ConfigError(f"{where}: merge method '{self.name}' needs a base model")
        if n_sources < self.min_sources:
            raise ConfigError(
                f"{where}: merge method '{self.name}' needs at least {self.min_sources} source model(s), got {n_sources}"
            )
        if self.max_sources is not None and n_sources > self.max_sources:
            raise ConfigError(
                f"{where}: merge method '{self.name}' takes at most {self.max_sources} source model(s), got {n_sources}"
            )

    def check_keys(self, given: Mapping[str, Any], declared: Mapping[str, ParamDef], where: str) -> None:
        for key in given:
            if key not in declared:
                hint = difflib.get_close_matches(key, list(declared), n=1)
                allowed = ", ".join(sorted(declared)) or "none"
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(
                    f"{where}.{key}: unknown parameter for '{self.name}'{suggestion}; allowed: {allowed}"
                )


OPERATORS: dict[str, OperatorSpec] = {}


def register_operator(
    name: str,
    *,
    shared: Mapping[str, ParamDef] | None = None,
    per_source: Mapping[str, ParamDef] | None = None,
    needs_base: bool = False,
    min_sources: int = 1,
    max_sources: int | None = None,
    stochastic: bool = False,
    blockwise: bool | Callable[[Params], bool] = False,
    prepare: PrepareFn | None = None,
    memory: MemoryCost | None = None,
) -> Callable[[OperatorFn], OperatorFn]:
    """Register ``fn`` as the merge operator ``name`` (the decorator form of the registry).

    ``blockwise``: ``fn`` may be called block by block (see the module docstring), always or for
    the parameters a predicate accepts; ``prepare`` then computes the whole-tensor statistics
    those calls need. ``memory``: what a call holds beyond its inputs and output (``MemoryCost``).
    """
    if prepare is not None and not blockwise:
        raise ValueError(f"merge operator '{name}': a prepare hook only serves blockwise operators")

    def wrap(fn: OperatorFn) -> OperatorFn:
        if name in OPERATORS:
            raise ValueError(f"merge operator '{name}' is registered twice")
        OPERATORS[name] = OperatorSpec(
            name=name,
            fn=fn,
            shared=dict(shared or {}),
            per_source=dict(per_source or {}),
            needs_base=needs_base,
            min_sources=min_sources,
            max_sources=max_sources,
            stochastic=stochastic,
            doc=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            blockwise=blockwise,
            prepare=prepare,
            memory=memory or MemoryCost(),
        )
        return fn

    return wrap


def get_operator(name: str, where: str = "method") -> OperatorSpec:
    """The operator registered as ``name``, or a one-line error with a did-you-mean."""
    if name not in OPERATORS:
        hint = difflib.get_close_matches(name, list(OPERATORS), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{where}: unknown merge method '{name}'{suggestion}; known: {', '.join(sorted(OPERATORS))}"
        )
    return OPERATORS[name]
