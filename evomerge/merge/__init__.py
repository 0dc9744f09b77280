"""Merge engine: pure per-tensor operators registered by name (see ``registry``).

Importing this package registers every built-in operator: the task-vector family
(``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``,
``della``, ``della_linear``, ``lines``), ``linear``, ``slerp``, ``model_stock``, ``passthrough`` and
``layer_swap``.
"""

from evomerge.merge import interpolation, layerwise, model_stock, task_arithmetic  # noqa: F401  (registration)
from evomerge.merge.registry import (
    OPERATORS,
    MemoryCost,
    OperatorSpec,
    ParamDef,
    Params,
    TensorInputs,
    TensorStream,
    get_operator,
    register_operator,
)

__all__ = [
    "OPERATORS",
    "MemoryCost",
    "OperatorSpec",
    "ParamDef",
    "Params",
    "TensorInputs",
    "TensorStream",
    "get_operator",
    "register_operator",
]
