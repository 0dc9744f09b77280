"""Blockwise merging for the streamed export: a large tensor in blocks, never whole.

A whole-tensor merge holds every source's copy of the tensor at once, so an export's peak memory
grows with the number of sources (three 98 MB embeddings, a base and the output: ~490 MB). A
blockwise operator (see ``evomerge.merge.registry``) instead gets consecutive flat blocks of
``block_size`` entries read straight from the files, after its ``prepare`` hook has taken the
whole-tensor statistics it needs in streamed passes; the peak is a few blocks, whatever the number
of sources, and the result is exactly the whole-tensor one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from evomerge.materialize.tensors import BufferPool, merge_tensor
from evomerge.merge import TensorInputs
from evomerge.merge.chunking import chunk_size
from evomerge.pool import ModelPool
from evomerge.recipe import TensorPlan

CHUNKS_PER_BLOCK = 8


def block_size(device: torch.device) -> int:
    """Entries per block: whole chunks, so block and whole-tensor chunks coincide (4 MiB on CPU)."""
    return CHUNKS_PER_BLOCK * chunk_size(device)


def blockwise(plan: TensorPlan, numel: int, device: torch.device) -> bool:
    """Whether the export merges this tensor block by block (only worth it above one block)."""
    return plan.operator.merges_blockwise(plan.params) and numel > block_size(device)


def _spans(n: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, block):
        yield start, min(n, start + block)


class PoolTensorStream:
    """One tensor of the pool's models read block by block (a ``TensorStream`` for ``prepare``)."""

    def __init__(
        self, pool: ModelPool, name: str, base: str | None, sources: Sequence[str], buffers: BufferPool, block: int
    ) -> None:
        self.pool = pool
        self.name = name
        self.base = base
        self.sources = list(sources)
        self.buffers = buffers
        self.block = block
        self.device = buffers.device
        self.numel = math.prod(pool.shape(pool.reference, name))

    def read(self, model: str, start: int, stop: int, role: str) -> torch.Tensor:
        """Entries ``start…stop`` of ``model``'s tensor as float32 in the reused buffer of ``role``.

        ``prepare``'s passes and the merge pass use the same roles: the passes are over by then.
        """
        buffer = self.buffers.get(role, (self.block,))[: stop - start]
        return self.pool.tensor_range(model, self.name, start, buffer)

    def blocks(self, i: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        model, role = (self.base, "base") if i is None else (self.sources[i], f"source{i}")
        assert model is not None, "no base model"
        for start, stop in _spans(self.numel, self.block):
            yield start, self.read(model, start, stop, role)

    def task_vector_blocks(self, i: int) -> Iterator[tuple[int, torch.Tensor]]:
        assert self.base is not None, "task vectors need a base model"
        for start, stop in _spans(self.numel, self.block):
            base = self.read(self.base, start, stop, "base")
            yield start, self.read(self.sources[i], start, stop, f"source{i}").sub_(base)


def merge_blocks(
    plan: TensorPlan,
    pool: ModelPool,
    *,
    base: str | None,
    sources: Sequence[str],
    num_layers: int,
    seed: int,
    buffers: BufferPool,
) -> Iterator[torch.Tensor]:
    """The merged tensor ``plan.name`` as consecutive flat float32 blocks (each valid until the next)."""
    block = block_size(buffers.device)
    stream = PoolTensorStream(pool, plan.name, base, sources, buffers, block)
    stats = None
    if plan.operator.prepare is not None:
        meta = TensorInputs(
            name=plan.name,
            base=None,
            sources=(),
            source_names=sources,
            layer=plan.layer,
            num_layers=num_layers,
            kind=plan.kind,
            seed=seed,
        )
        stats = plan.operator.prepare(meta, plan.params, stream)
    for start, stop in _spans(stream.numel, block):
        yield merge_tensor(
            plan,
            base=stream.read(base, start, stop, "base") if base else None,
            sources=[stream.read(model, start, stop, f"source{i}") for i, model in enumerate(sources)],
            source_names=sources,
            num_layers=num_layers,
            seed=seed,
            out=buffers.get("out", (block,))[: stop - start],
            offset=start,
            stats=stats,
        )
