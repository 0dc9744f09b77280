"""The safetensors dtype codes and their torch dtypes, shared by the reader and the writer."""

from __future__ import annotations

import torch

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype``; ``ValueError`` for dtypes the format cannot store."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store dtype {dtype}") from None
