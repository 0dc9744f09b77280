"""Cache-sized chunks of flattened tensors, shared by every operator.

An operator that makes several elementwise passes (trim, weight, elect, sum) over a whole tensor
streams it through main memory once per pass; doing all passes on one chunk before moving on keeps
the intermediates in cache, so a merge reads each input and writes the output about once. Each
operation on a chunk still runs on PyTorch's intra-op threads (the caller's setting).

2¹⁷ entries (512 KiB per float32 buffer) measured fastest on a 2-core CPU against 2¹⁵–2²⁰:
smaller chunks pay per-operation overhead (~3 µs), larger ones spill the intermediates out of
cache. Chunk bodies get the chunk's index so anything order-dependent (floating-point partial
sums) is combined in index order; random draws are made before the chunks are processed.

Caveat measured here: on a CPU shared with other busy processes, many short multi-threaded
operations stall at OpenMP barriers whose partner thread is descheduled (4–10× slower); give each
worker one thread per core it owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

CHUNK = 1 << 17
# On accelerators kernels are asynchronous and launches dominate small chunks.
DEVICE_CHUNK = 1 << 22


def chunk_size(device: torch.device) -> int:
    """Entries per chunk on ``device``."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D float32 view of ``t`` (a copy only when ``t`` is not contiguous or not float32)."""
    return t.reshape(-1).to(torch.float32)


def spans(n: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering ``range(n)`` on ``device``."""
    size = chunk_size(device)
    for start in range(0, n, size):
        yield start, min(n, start + size)


def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The chunks of a flat tensor as views, made in one call (slicing per chunk costs more)."""
    return t.split(chunk_size(t.device))


class Scratch:
    """Reusable chunk-sized buffers of one operator call, looked up by an owner-chosen key.

    Full chunks all have one size, so a buffer is returned as is (no slicing) except for a tensor's
    last, shorter chunk.
    """

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}

    def _fit(self, key: object, like: torch.Tensor, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        n = like.numel()
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = make(n)
            self._buffers[key] = buf
        return buf if buf.numel() == n else buf[:n]

    def get(self, key: object, like: torch.Tensor) -> torch.Tensor:
        """A float32 buffer for ``key``, sized and placed like ``like`` (contents undefined)."""
        return self._fit(key, like, lambda n: torch.empty(n, dtype=torch.float32, device=like.device))

    def filled(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``value`` everywhere, sized like ``like`` (filled once)."""
        return self._fit(("filled", value), like, lambda n: torch.full((n,), value, device=like.device))


ChunkBody = Callable[[int, int, int, Scratch], None]


def for_chunks(n: int, device: torch.device, body: ChunkBody) -> None:
    """Run ``body(index, start, stop, scratch)`` for every chunk of ``range(n)`` on ``device``, in order."""
    scratch = Scratch()
    for index, (start, stop) in enumerate(spans(n, device)):
        body(index, start, stop, scratch)


def output_for(like: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(result, flat view) to write into: ``out`` itself when it is contiguous, else a new tensor.

    Operators write through the flat view; when ``out`` cannot be viewed flat, a scratch tensor is
    used and ``finish`` copies it back.
    """
    if out is None:
        result = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return result, result.view(-1)
    if out.shape != like.shape or out.dtype != torch.float32:
        raise ValueError(f"out buffer is {out.dtype} {tuple(out.shape)}, expected float32 {tuple(like.shape)}")
    if out.is_contiguous():
        return out, out.view(-1)
    scratch = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return scratch, scratch.view(-1)


def finish(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Return the operator's result, copying it into ``out`` when it was computed elsewhere."""
    if out is None or result is out:
        return result
    out.copy_(result)
    return out
