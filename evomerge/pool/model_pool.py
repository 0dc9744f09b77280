"""The models of one merge: opened lazily, checked for compatibility before any work.

Opening a pool reads only config.json files and safetensors headers; tensors are read one at a
time when a merge asks for them. A model is any reference ``evomerge.pool.sources`` resolves (a
folder, a hub id in the local cache, a LoRA adapter on a model); a LoRA source reads as its base
with the adapter's update applied tensor by tensor (``evomerge.pool.lora``). Every way in which two models cannot be merged (another family,
another vocabulary, tied vs untied head, other tensors or shapes) is reported at open time with
both model names and the first tensor that differs, instead of as a shape error mid-merge.
"""

from __future__ import annotations

import copy
import json
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
from evomerge.pool.lora import CONFIG_FILE as ADAPTER_CONFIG
from evomerge.pool.lora import AdaptedTensors, LoraAdapter
from evomerge.pool.sources import ResolvedSource, resolve_source

TensorStore = TensorIndex | AdaptedTensors
ModelRef = str | Path | ResolvedSource


@dataclass
class SourceModel:
    """One model of a pool: where it came from, its config, lazy tensor store and layer map."""

    name: str
    path: Path
    config: dict[str, Any]
    index: TensorStore
    layer_map: LayerMap
    tied: bool
    source: ResolvedSource

    @classmethod
    def load(cls, name: str, source: ModelRef, *, trust_remote_code: bool = False) -> SourceModel:
        """Open ``source`` (a reference or a resolved one) as model ``name`` (headers only; no tensor is read)."""
        if not isinstance(source, ResolvedSource):
            source = resolve_source(str(source), where=f"model {name!r}", require_folder=False)
        path = source.path
        where = f"model {name!r} ({path if source.ref == str(path) else source.ref})"
        if not path.is_dir():
            raise ModelError(f"{where}: folder not found (expected a local Hugging Face model folder)")
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            raise ModelError(f"{where}: {_adapter_hint(path, source.model.ref)}")
        config = read_config(path)
        if config.get("auto_map") and not trust_remote_code:
            raise ModelError(
                f"{where}: config.json auto_map needs custom code from the model folder; "
                "set trust_remote_code: true only if you trust that code"
            )
        index: TensorStore = TensorIndex.open(path)
        if source.adapter is not None:
            try:
                adapter = LoraAdapter.open(source.adapter.path, where)
                try:
                    index = AdaptedTensors(index, adapter, where, base_id=source.model.repo_id)
                except BaseException:
                    adapter.close()
                    raise
            except BaseException:
                index.close()
                raise
        layer_map = LayerMap.build(config, index.names, where)
        return cls(name, path, config, index, layer_map, layer_map.tied, source)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the model is read from: config.json, weight shards, adapter config and weights."""
        return (self.path / "config.json", *self.index.files) + (
            (self.source.adapter.path / ADAPTER_CONFIG,) if self.source.adapter is not None else ()
        )

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


def _adapter_hint(path: Path, ref: str) -> str:
    """What to write instead of a bare adapter folder: the adapter on its base."""
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    base = base if isinstance(base, str) and base else "<base model>"
    return f"is a LoRA adapter, not a model; name the model it applies to: '{base}+{ref}' or {{model: {base}, lora: {ref}}}"


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
        cls, models: Mapping[str, ModelRef], base: str | None = None, *, trust_remote_code: bool = False
    ) -> ModelPool:
        """Open every model of ``models`` (name -> reference) and check they can be merged with each other.

        A reference is a folder, a pinned or unpinned hub id, ``model+adapter`` (see
        ``evomerge.pool.sources``; relative paths against the current directory) or a ``ResolvedSource``.

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
        """The folder of ``model``'s config and tokenizer (a LoRA source's: its base's)."""
        return self.model(model).path

    def source(self, model: str) -> ResolvedSource:
        """Where ``model`` came from (its pinned ``ref``, hub id and commit, adapter)."""
        return self.model(model).source

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
