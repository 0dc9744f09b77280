"""Where a search worker keeps its source models: the placements.

- ``resident``: every floating tensor of every model in float32 on the merge device. A merge reads
  its inputs in place: the fastest, and 4 bytes per parameter per model.
- ``compact``: the tensors in their stored dtype (bfloat16 for most checkpoints: half the memory)
  on the merge device, converted to float32 into a reused buffer per model when a merge needs them.
- ``streamed``: the stored tensors in host memory (pinned on CUDA, so copies run at full PCIe speed
  without a staging copy by the driver) and copied to the device tensor by tensor, so the device
  holds only the merged model, one tensor's buffers and the caches.

All three hand the operators the same float32 values, so a candidate merges to the same bits
whatever the placement. Tensors are read from the files with ``pread`` into buffers (never through
a memory map, whose pages would stay in the worker's resident memory).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from evomerge.materialize.tensors import BufferPool
from evomerge.pool import ModelPool


def stored_dtype(pool: ModelPool, model: str, name: str) -> torch.dtype:
    """The dtype a compact or streamed placement keeps ``model``'s tensor in: as stored, except a
    LoRA source's (its adapted values exist only in float32)."""
    return torch.float32 if pool.source(model).adapter is not None else pool.dtype(model, name)


class SourceTensors(ABC):
    """The floating tensors of a pool's models, held where the placement says."""

    placement: str

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers = BufferPool(device)
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    @abstractmethod
    def get(self, model: str, name: str, role: str) -> torch.Tensor:
        """``model``'s tensor ``name`` as float32 on the device (for a role's buffer: valid until its next get)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held for the models (the buffers not counted)."""

    @property
    def buffer_bytes(self) -> int:
        return self._buffers.nbytes

    def release(self) -> None:
        """Drop every held tensor and buffer (a worker switching materializers frees them now)."""
        self._tensors.clear()
        self._buffers = BufferPool(self.device)


def _read_host(pool: ModelPool, model: str, name: str, dtype: torch.dtype, staging: BufferPool, pin: bool = False,
               keep: bool = False) -> torch.Tensor:
    """``model``'s tensor read with pread into host memory in ``dtype``: a new tensor when ``keep``
    (pinned if ``pin``), else the reused staging buffer of that dtype."""
    shape = pool.shape(model, name)
    if keep:
        out = torch.empty(shape, dtype=dtype, pin_memory=pin)
    else:
        out = staging.get(f"read-{dtype}", shape, dtype)
    return pool.tensor(model, name, out=out)


class ResidentSources(SourceTensors):
    """Float32 on the device; ``get`` returns the tensor itself."""

    placement = "resident"

    def __init__(self, pool: ModelPool, names: list[str], device: torch.device) -> None:
        super().__init__(device)
        staging = BufferPool("cpu")
        for model in pool.names:
            held = self._tensors[model] = {}
            for name in names:
                stored = stored_dtype(pool, model, name)
                if stored == torch.float32 and device.type == "cpu":
                    held[name] = _read_host(pool, model, name, stored, staging, keep=True)
                else:
                    host = _read_host(pool, model, name, stored, staging)
                    held[name] = torch.empty(host.shape, dtype=torch.float32, device=device).copy_(host)

    def get(self, model: str, name: str, role: str) -> torch.Tensor:
        return self._tensors[model][name]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for held in self._tensors.values() for t in held.values())


class StoredSources(SourceTensors):
    """Stored dtype on the device (``compact``) or in host memory (``streamed``), converted on ``get``."""

    def __init__(self, pool: ModelPool, names: list[str], device: torch.device, placement: str) -> None:
        super().__init__(device)
        self.placement = placement
        on_device = placement == "compact" or device.type == "cpu"
        pin = placement == "streamed" and device.type == "cuda"
        staging = BufferPool("cpu")
        for model in pool.names:
            held = self._tensors[model] = {}
            for name in names:
                stored = stored_dtype(pool, model, name)
                if on_device and device.type != "cpu":
                    held[name] = _read_host(pool, model, name, stored, staging).to(device, copy=True)
                else:
                    held[name] = _read_host(pool, model, name, stored, staging, pin=pin, keep=True)

    def get(self, model: str, name: str, role: str) -> torch.Tensor:
        held = self._tensors[model][name]
        # streamed to a GPU: the stored bytes cross the bus (from pinned memory, asynchronously on
        # the current stream, so the merge that reads the buffer waits for them) and are upcast there
        return self._buffers.get(role, held.shape).copy_(held, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * t.element_size() for held in self._tensors.values() for t in held.values())


def load_sources(pool: ModelPool, names: list[str], device: torch.device, placement: str) -> SourceTensors:
    """Read the floating tensors ``names`` of every model of ``pool`` into ``placement``."""
    if placement == "resident":
        return ResidentSources(pool, names, device)
    if placement in ("compact", "streamed"):
        return StoredSources(pool, names, device, placement)
    raise ValueError(f"unknown placement {placement!r}")
