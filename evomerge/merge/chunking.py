"""Cache-sized chunks of flattened tensors, processed by a few threads; shared by every operator.

An operator that makes several elementwise passes (trim, weight, elect, sum) over a whole tensor
streams it through main memory once per pass; doing all passes on one chunk before moving on keeps
the intermediates in cache, so a merge reads each input and writes the output about once.

Chunks hold 2¹⁵ entries: at most PyTorch's parallel grain, so no single operation opens an OpenMP
region. Parallelism comes instead from ``torch.get_num_threads()`` Python threads taking chunks
independently (PyTorch releases the GIL inside its kernels). Many short OpenMP regions stall at
every barrier whose partner thread the OS has descheduled — on a machine shared with other jobs a
chunked merge ran 4–10× slower that way — while independent threads just finish later.

Chunk bodies must not depend on the order chunks run in: anything order-dependent (random draws,
floating-point sums) is done per chunk index and combined in index order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 1 << 15
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


class Scratch:
    """One thread's reusable chunk-sized buffers, looked up by an owner-chosen key."""

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}

    def get(self, key: object, like: torch.Tensor) -> torch.Tensor:
        """A float32 buffer for ``key``, sized and placed like ``like`` (contents undefined)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = torch.empty(max(chunk_size(like.device), like.numel()), dtype=torch.float32, device=like.device)
            self._buffers[key] = buf
        return buf[: like.numel()]

    def filled(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``value`` everywhere, sized like ``like`` (filled once)."""
        key = ("filled", value)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            size = max(chunk_size(like.device), like.numel())
            buf = torch.full((size,), value, dtype=torch.float32, device=like.device)
            self._buffers[key] = buf
        return buf[: like.numel()]


ChunkBody = Callable[[int, int, int, Scratch], None]


def for_chunks(n: int, device: torch.device, body: ChunkBody) -> None:
    """Run ``body(index, start, stop, scratch)`` for every chunk of ``range(n)`` on ``device``.

    On CPU with more than one intra-op thread allowed, the chunks are shared among that many
    threads (the caller's thread included); elsewhere they run in order in the caller's thread.
    """
    chunks = list(spans(n, device))
    workers = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
    if workers <= 1:
        scratch = Scratch()
        for index, (start, stop) in enumerate(chunks):
            body(index, start, stop, scratch)
        return
    pending = iter(enumerate(chunks))
    lock = threading.Lock()

    def work() -> None:
        scratch = Scratch()
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            index, (start, stop) = item
            body(index, start, stop, scratch)

    with ThreadPoolExecutor(workers - 1) as pool:
        helpers = [pool.submit(work) for _ in range(workers - 1)]
        work()
        for helper in helpers:
            helper.result()


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
