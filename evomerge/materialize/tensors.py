"""The one place where a planned tensor is computed from the pool's tensors.

Both materializations (streamed export and resident in-place search) call ``merge_tensor`` (a
parameter recipe) or ``blend_tensor`` (a blend) so that a recipe gives bit-identical tensors either
way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge import TensorInputs
from evomerge.merge.interpolation import weighted_sum
from evomerge.recipe import Blend, TensorPlan


def merge_tensor(
    plan: TensorPlan,
    *,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    source_names: Sequence[str],
    num_layers: int,
    seed: int,
    cache: dict | None = None,
    out: torch.Tensor | None = None,
    offset: int = 0,
    stats: dict | None = None,
) -> torch.Tensor:
    """Run the planned operator on float32 inputs; a non-finite result is a one-line error.

    ``offset``/``stats``: the inputs are one block of the tensor (see ``evomerge.materialize.blocks``).
    """
    inputs = TensorInputs(
        name=plan.name,
        base=base,
        sources=sources,
        source_names=source_names,
        layer=plan.layer,
        num_layers=num_layers,
        kind=plan.kind,
        seed=seed,
        cache=cache,
        offset=offset,
        stats=stats,
    )
    result = plan.operator.fn(inputs, plan.params, out)
    low, high = torch.aminmax(result)  # NaN propagates; no tensor-sized temporary
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ConfigError(
            f"tensor {plan.name}: merge method '{plan.operator.name}' produced NaN or inf "
            f"with parameters {_summary(plan)}"
        )
    return result


def _summary(plan: TensorPlan) -> str:
    shared = ", ".join(f"{k}={v}" for k, v in plan.params.shared.items())
    per_source = "; ".join(", ".join(f"{k}={v}" for k, v in p.items()) for p in plan.params.per_source)
    return "{" + "; ".join(part for part in (shared, per_source) if part) + "}"


def blend_tensor(blend: Blend, offset: int, numel: int, inputs: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The tensor at ``[offset, offset + numel)`` of the canonical order, piece by piece: Σ_m w_m θ_m.

    ``inputs`` are each model's float32 tensor; resident merge and export both call this, so an
    exported blend is the scored one bit for bit.
    """
    flat_out = out.view(-1)
    names = list(inputs)
    flats = [inputs[m].reshape(-1) for m in names]
    for lo, hi, weights in blend.pieces(offset, numel):
        weighted_sum([f[lo:hi] for f in flats], [weights.get(m, 0.0) for m in names], flat_out[lo:hi])
    return out


def is_mergeable(dtype: torch.dtype) -> bool:
    """Floating tensors are merged; integer and boolean buffers are copied from the reference."""
    return dtype.is_floating_point


def output_dtype(recipe_dtype: str | None, stored: torch.dtype) -> torch.dtype:
    """The dtype a merged tensor is written in: the recipe's, else the reference's own."""
    return getattr(torch, recipe_dtype) if recipe_dtype else stored



class BufferPool:
    """One reusable buffer per role (base, source i, out), viewed in each tensor's shape.

    The export reads and merges tensor after tensor: writing into warm buffers avoids the
    first-touch cost of fresh allocations, and one buffer per role, grown to the largest tensor
    seen, bounds the memory by that tensor rather than by the number of distinct shapes. Buffers
    are float32 unless a role asks for another dtype (a staging copy in a stored dtype).
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of ``shape`` for ``role`` (contents undefined; valid until the role's next ``get``)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            self._buffers.pop(role, None)
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[role] = buffer
        return buffer[:numel].view(tuple(shape))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
