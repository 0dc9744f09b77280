"""The models of one merge: opened lazily, checked for compatibility before any work.

Opening a pool reads only config.json files and safetensors headers; tensors are read one at a
time when a merge asks for them. Every way in which two models cannot be merged (another family,
another vocabulary, tied vs untied head, other tensors or shapes) is reported at open time with
both model names and the first tensor that differs, instead of as a shape error mid-merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.io.config import read_config
from evomerge.io.safetensors_reader import TensorIndex
from evomerge.pool.layer_map import LayerMap


@dataclass
class SourceModel:
    """One local Hugging Face model folder: its config, lazy tensor index and layer map."""

    name: str
    path: Path
    config: dict[str, Any]
    index: TensorIndex
    layer_map: LayerMap
    tied: bool

    @classmethod
    def load(cls, name: str, path: str | Path, *, trust_remote_code: bool = False) -> SourceModel:
        """Open the folder ``path`` as model ``name`` (headers only; no tensor is read)."""
        path = Path(path).expanduser()
        where = f"model {name!r} ({path})"
        if not path.is_dir():
            raise ModelError(f"{where}: folder not found (expected a local Hugging Face model folder)")
        config = read_config(path)
        if config.get("auto_map") and not trust_remote_code:
            raise ModelError(
                f"{where}: config.json auto_map needs custom code from the model folder; "
                "set trust_remote_code: true only if you trust that code"
            )
        index = TensorIndex.open(path)
        layer_map = LayerMap.build(config, index.names, where)
        return cls(name, path, config, index, layer_map, layer_map.tied)

    @property
    def model_type(self) -> str:
        return self.layer_map.model_type

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: the vocabulary the weights were trained for."""
        return self.index.shape(self.layer_map.embedding_name)[0]

    def stored_names(self) -> tuple[str, ...]:
        """Tensor names that carry distinct values (a tied head's redundant copy left out)."""
        head = self.layer_map.head_name
        return tuple(n for n in self.layer_map.names if not (self.tied and n == head))

    def stored_name(self, name: str) -> str:
        """The stored tensor that holds ``name``: a tied head not stored is the token embedding."""
        if name not in self.index and self.tied and name == self.layer_map.head_name:
            return self.layer_map.embedding_name
        return name

    def read(
        self, name: str, device: str | torch.device, dtype: torch.dtype | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read ``name`` (see ``stored_name``) onto ``device`` as ``dtype`` (or into ``out``), caller-owned."""
        return self.index.get(self.stored_name(name), device=device, dtype=dtype, out=out)

    def read_range(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read flat entries of ``name`` (see ``stored_name``) from ``start`` into the flat buffer ``out``."""
        return self.index.get_range(self.stored_name(name), start, out)


def _check_compatible(ref: SourceModel, other: SourceModel) -> None:
    """Raise a one-line ``ModelError`` naming both models if ``other`` cannot merge with ``ref``."""
    pair = f"models {ref.name!r} and {other.name!r}"
    if ref.model_type != other.model_type:
        raise ModelError(
            f"{pair} are not one architecture family: model_type {ref.model_type!r} vs {other.model_type!r}"
        )
    if ref.vocab_size != other.vocab_size:
        raise ModelError(
            f"{pair} have different vocabulary sizes ({ref.vocab_size} vs {other.vocab_size}): merging needs one "
            "tokenizer, and evomerge does not slice or pad embeddings"
        )
    if ref.tied != other.tied:
        tied, untied = (ref, other) if ref.tied else (other, ref)
        raise ModelError(
            f"{pair} differ in the output head: {tied.name!r} ties it to the embeddings, {untied.name!r} does not"
        )
    ref_names, other_names = ref.stored_names(), other.stored_names()
    other_set, ref_set = set(other_names), set(ref_names)
    for name in ref_names:
        if name not in other_set:
            raise ModelError(f"{pair} differ: tensor {name!r} is in {ref.name!r} but not in {other.name!r}")
    for name in other_names:
        if name not in ref_set:
            raise ModelError(f"{pair} differ: tensor {name!r} is in {other.name!r} but not in {ref.name!r}")
    for name in ref_names:
        a, b = ref.index.shape(name), other.index.shape(name)
        if a != b:
            raise ModelError(
                f"{pair} differ: tensor {name!r} has shape {list(a)} in {ref.name!r} but {list(b)} in {other.name!r}"
            )


class ModelPool:
    """A base model (optional) and source models of one family, read lazily; open with ``ModelPool.open``."""

    def __init__(self, models: Mapping[str, SourceModel], base: str | None) -> None:
        self._models = dict(models)
        self.names: tuple[str, ...] = tuple(self._models)
        self.base = base
        self.sources: tuple[str, ...] = tuple(n for n in self.names if n != base)
        self.reference: str = base if base is not None else self.sources[0]
        ref = self._models[self.reference]
        self.layer_map: LayerMap = ref.layer_map
        self.tensor_names: tuple[str, ...] = ref.layer_map.names
        self.reference_path: Path = ref.path

    @classmethod
    def open(
        cls, models: Mapping[str, Path | str], base: str | None = None, *, trust_remote_code: bool = False
    ) -> ModelPool:
        """Open every model of ``models`` (name -> folder) and check they can be merged with each other.

        ``base``, if given, is one of the names; the output follows its layout, else the first source's.
        """
        if not models:
            raise ConfigError("models: expected at least one model")
        for name in models:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"models: expected non-empty string names, got {name!r}")
        if base is not None and base not in models:
            raise ConfigError(f"base: {base!r} is not one of the models ({', '.join(models)})")
        if all(name == base for name in models):
            raise ConfigError(f"models: expected at least one model besides the base {base!r}")
        loaded: dict[str, SourceModel] = {}
        try:
            for name, path in models.items():
                loaded[name] = SourceModel.load(name, path, trust_remote_code=trust_remote_code)
            reference = loaded[base if base is not None else next(iter(loaded))]
            for model in loaded.values():
                if model is not reference:
                    _check_compatible(reference, model)
        except BaseException:
            for model in loaded.values():
                model.index.close()
            raise
        return cls(loaded, base)

    def model(self, name: str) -> SourceModel:
        """The model called ``name``."""
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"no model {name!r} in the pool ({', '.join(self.names)})") from None

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the reference model's config.json, for writing next to a merged model."""
        return copy.deepcopy(self._models[self.reference].config)

    @property
    def num_parameters(self) -> int:
        """Parameters of one model of the pool, a tied embedding/head counted once."""
        ref = self._models[self.reference]
        return sum(math.prod(ref.index.shape(name)) for name in ref.stored_names())

    def parameter_order(self) -> tuple[tuple[str, int], ...]:
        """The canonical order: the reference's stored floating tensors, in layer-map order, with sizes.

        Split-point crossovers cut this line; a tied head is its embedding and appears once.
        """
        ref = self._models[self.reference]
        return tuple(
            (name, math.prod(ref.index.shape(name)))
            for name in ref.stored_names()
            if ref.index.dtype(name).is_floating_point
        )

    def path(self, model: str) -> Path:
        """The folder of ``model``."""
        return self.model(model).path

    def shape(self, model: str, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` in ``model`` (the same in every model of the pool)."""
        self._check_name(name)
        source = self.model(model)
        return source.index.shape(source.stored_name(name))

    def dtype(self, model: str, name: str) -> torch.dtype:
        """The dtype ``model`` stores tensor ``name`` in (models of a pool may differ here)."""
        self._check_name(name)
        source = self.model(model)
        return source.index.dtype(source.stored_name(name))

    def _check_name(self, name: str) -> None:
        if name not in self.layer_map:
            raise KeyError(f"tensor {name!r} is not in the pool's {self.layer_map.model_type} layout")

    def tensor(
        self,
        model: str,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read tensor ``name`` of ``model`` onto ``device`` as ``dtype`` (float32 by default), caller-owned.

        ``out``: a buffer of the tensor's shape to read into instead of allocating (its dtype wins).
        """
        self._check_name(name)
        return self.model(model).read(name, device, dtype, out)

    def tensor_range(self, model: str, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read flat entries of tensor ``name`` of ``model`` from ``start`` into the flat buffer ``out``."""
        self._check_name(name)
        return self.model(model).read_range(name, start, out)

    def close(self) -> None:
        """Release every open file mapping."""
        for model in self._models.values():
            model.index.close()

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
