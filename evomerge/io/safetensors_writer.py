"""A streaming safetensors writer: peak memory is one tensor, not one shard.

The ``safetensors`` library can only serialize a complete dict of tensors, so exporting a merged
model with it would hold a whole shard in memory. The format is small enough to write by hand: an
8-byte little-endian header length, a JSON header mapping each name to its dtype, shape and
``data_offsets``, padded with spaces to a multiple of 8, then the raw little-endian bytes of every
tensor with no gaps. Because every name, shape and dtype is known before the first byte, each
shard's header is written first and each tensor's bytes are written as soon as the caller produces
them.

Within a shard the data are laid out by descending element size (as the safetensors library does),
so every tensor starts at an offset aligned to its dtype; tensors still arrive in the caller's
order and are written at their precomputed offsets. Shards are written under a temporary name and
renamed when complete, the index last, so an interrupted export never looks like a finished one.
Bytes are written in host order, which is little-endian on every platform torch supports.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from evomerge.errors import ModelError
from evomerge.io.dtypes import safetensors_code
from evomerge.io.safetensors_reader import INDEX_FILE, SINGLE_FILE

FILE_MODE = 0o644
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Shard:
    path: Path
    specs: list[TensorSpec]
    header: bytes
    offsets: dict[str, int]
    handle: BinaryIO | None = None
    written: int = 0


def _plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (a larger tensor stands alone)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and max_shard_bytes is not None and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The padded header bytes of one shard and each tensor's offset in its data section."""
    layout = sorted(range(len(specs)), key=lambda i: (-specs[i].dtype.itemsize, i))
    offsets: dict[str, int] = {}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    position = 0
    for i in layout:
        spec = specs[i]
        offsets[spec.name] = position
        header[spec.name] = {
            "dtype": safetensors_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class ShardedSafetensorsWriter:
    """Write a model's tensors, in a declared order, to ``model.safetensors`` or shards plus an index.

    Use as a context manager: ``write`` every declared tensor in order, and leaving the block
    finishes the files (or, on an exception, removes the partial ones).
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: Iterable[TensorSpec | tuple[str, Sequence[int], torch.dtype]],
        *,
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.specs = [s if isinstance(s, TensorSpec) else TensorSpec(s[0], tuple(s[1]), s[2]) for s in specs]
        if not self.specs:
            raise ValueError("a safetensors file needs at least one tensor")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor name {next(n for n in names if names.count(n) > 1)!r}")
        for spec in self.specs:
            safetensors_code(spec.dtype)
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.glob("model*.safetensors*"))
        if existing:
            raise ModelError(f"{self.out_dir}: already holds model weights ({existing[0]}); choose an empty folder")
        groups = _plan_shards(self.specs, max_shard_bytes)
        self._shards: list[_Shard] = []
        for i, group in enumerate(groups):
            file = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            header, offsets = _header(group, self.metadata)
            self._shards.append(_Shard(self.out_dir / file, group, header, offsets))
        self._next = 0
        self._shard = 0
        self.files: tuple[Path, ...] = tuple(s.path for s in self._shards)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; its name, shape and dtype must match the declaration."""
        spec = self._expect(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: declared {list(spec.shape)} {spec.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        self._write_pieces(spec, [tensor.reshape(-1)])

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Write the next declared tensor from consecutive flat pieces of its dtype, as they come.

        The pieces must add up to the declared number of entries; only one piece is held at a time.
        """
        self._write_pieces(self._expect(name), pieces)

    def _expect(self, name: str) -> TensorSpec:
        if self._next >= len(self.specs):
            raise ValueError(f"tensor {name!r} was not declared: all {len(self.specs)} tensors are written")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        return spec

    def _write_pieces(self, spec: TensorSpec, pieces: Iterable[torch.Tensor]) -> None:
        shard = self._shards[self._shard]
        if shard.handle is None:
            partial = shard.path.with_name(shard.path.name + PARTIAL_SUFFIX)
            shard.handle = partial.open("wb")
            shard.handle.write(shard.header)
        shard.handle.seek(len(shard.header) + shard.offsets[spec.name])
        written, total = 0, math.prod(spec.shape)
        for piece in pieces:
            if piece.dtype != spec.dtype or piece.dim() != 1:
                raise ValueError(f"tensor {spec.name!r}: pieces must be flat {spec.dtype}, got {piece.dtype} {list(piece.shape)}")
            if written + piece.numel() > total:
                raise ValueError(f"tensor {spec.name!r}: declared {total} entries, got more")
            shard.handle.write(memoryview(piece.detach().to("cpu").contiguous().view(torch.uint8).numpy()))
            written += piece.numel()
        if written != total:
            raise ValueError(f"tensor {spec.name!r}: declared {total} entries, got {written}")
        shard.written += 1
        self._next += 1
        if shard.written == len(shard.specs):
            self._finish(shard)
            self._shard += 1

    def _finish(self, shard: _Shard) -> None:
        assert shard.handle is not None
        partial = Path(shard.handle.name)
        shard.handle.close()
        shard.handle = None
        os.chmod(partial, FILE_MODE)
        os.replace(partial, shard.path)

    def close(self) -> tuple[Path, ...]:
        """Check every tensor was written, write the index if sharded, and return the files written."""
        if self._next < len(self.specs):
            missing = self.specs[self._next].name
            self.abort()
            raise ValueError(f"tensor {missing!r} was declared but never written")
        if len(self._shards) == 1:
            return self.files
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
            "weight_map": {spec.name: shard.path.name for shard in self._shards for spec in shard.specs},
        }
        path = self.out_dir / INDEX_FILE
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        partial.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.chmod(partial, FILE_MODE)
        os.replace(partial, path)
        return (*self.files, path)

    def abort(self) -> None:
        """Remove everything this writer created (finished shards included)."""
        for shard in self._shards:
            if shard.handle is not None:
                shard.handle.close()
                shard.handle = None
            shard.path.with_name(shard.path.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
            shard.path.unlink(missing_ok=True)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
