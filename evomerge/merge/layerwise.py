"""Operators that pick whole tensors by layer: passthrough and layer swapping.

Sources are named as in the recipe (``inputs.source_names``); the literal ``"base"`` names the base.

Layer swap (Bandarkar et al., 2025) with L blocks, ``bottom`` = b, ``top`` = k, ``width`` = w: block
ℓ takes the fraction ω(ℓ) of ``outer`` and 1 − ω(ℓ) of ``inner``, where ω = 1 for ℓ < b and for
ℓ ≥ L − k, and the w blocks just inside each outer zone blend linearly: the j-th of them
(j = 1..w, counted away from the zone) gets ω = 1 − j/(w+1). A transition only exists next to a
non-empty outer zone, so b = k = 0 gives ``inner`` everywhere; where the two transitions overlap
the larger ω wins. Tensors outside the blocks (embeddings, final norm, head) come from ``rest``,
by default ``outer``.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge.chunking import finish, flat, output_for
from evomerge.merge.interpolation import weighted_sum
from evomerge.merge.registry import ParamDef, Params, TensorInputs, register_operator

BASE = "base"


def source_tensor(inputs: TensorInputs, name: str, field: str) -> torch.Tensor:
    """The input tensor of the model called ``name`` (a source name or "base")."""
    if name == BASE:
        if inputs.base is None:
            raise ConfigError(f"tensor {inputs.name}: {field}: 'base' was named but the recipe has no base model")
        return inputs.base
    names = list(inputs.source_names)
    if name not in names:
        known = ", ".join(names + ([BASE] if inputs.base is not None else []))
        raise ConfigError(f"tensor {inputs.name}: {field}: unknown model '{name}'; expected one of: {known}")
    return inputs.sources[names.index(name)]


@register_operator(
    "passthrough",
    shared={
        "source": ParamDef(None, kind=str, required=True, doc="model the tensor is taken from, or 'base'"),
        "scale": ParamDef(1.0, doc="multiplier applied to the tensor"),
    },
    min_sources=0,
    blockwise=True,
)
def passthrough(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
    """Take the tensor from one model, times ``scale``."""
    src = source_tensor(inputs, str(params.shared["source"]), "parameters.source")
    result, dest = output_for(src, out)
    weighted_sum([flat(src)], [float(params.shared["scale"])], dest)
    return finish(result, out)


def outer_fraction(layer: int, num_layers: int, bottom: int, top: int, width: int) -> float:
    """ω(ℓ): the share of ``outer`` in block ``layer`` (see the module docstring)."""

    def from_zone(distance: int, size: int) -> float:
        # distance = blocks between this one and the model's edge the zone starts at
        if distance < size:
            return 1.0
        j = distance - size + 1
        return 1.0 - j / (width + 1) if size > 0 and j <= width else 0.0

    return max(from_zone(layer, bottom), from_zone(num_layers - 1 - layer, top))


@register_operator(
    "layer_swap",
    shared={
        "outer": ParamDef(None, kind=str, required=True, doc="model giving the bottom and top blocks"),
        "inner": ParamDef(None, kind=str, required=True, doc="model giving the middle blocks"),
        "bottom": ParamDef(0, kind=int, low=0, doc="number of bottom blocks taken from outer"),
        "top": ParamDef(0, kind=int, low=0, doc="number of top blocks taken from outer"),
        "width": ParamDef(0, kind=int, low=0, doc="blocks blending linearly next to each outer zone"),
        "rest": ParamDef(None, kind=str, doc="model giving tensors outside the blocks (default: outer)"),
    },
    blockwise=True,
)
def layer_swap(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
    """Layer swapping: outer model's bottom/top blocks around the inner model's middle."""
    outer_name = str(params.shared["outer"])
    inner_name = str(params.shared["inner"])
    outer = source_tensor(inputs, outer_name, "parameters.outer")
    inner = source_tensor(inputs, inner_name, "parameters.inner")
    if inputs.layer is None:
        rest_name = params.shared["rest"]
        chosen = source_tensor(inputs, str(rest_name), "parameters.rest") if rest_name is not None else outer
        tensors, coefs = [chosen], [1.0]
    else:
        omega = outer_fraction(
            inputs.layer,
            inputs.num_layers,
            int(params.shared["bottom"]),
            int(params.shared["top"]),
            int(params.shared["width"]),
        )
        tensors, coefs = [outer, inner], [omega, 1.0 - omega]
    result, dest = output_for(outer, out)
    weighted_sum([flat(t) for t in tensors], coefs, dest)
    return finish(result, out)
