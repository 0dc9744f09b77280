"""LoRA adapters as merge sources: the base model's tensors plus the adapter's dense update, lazily.

A LoRA adapter (peft's ``adapter_config.json`` + ``adapter_model.safetensors``) stores, for each
adapted module, factors A (r × in) and B (out × r). Merged into its base (peft's
``merge_and_unload``), the module's weight becomes W + ΔW with ΔW = scaling · B·A, transposed for
``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings, where

    scaling = lora_alpha / r          (LoRA)      or      lora_alpha / √r   (rsLoRA, use_rslora)

with per-module r and alpha from ``rank_pattern`` / ``alpha_pattern`` (the first pattern that
matches the end of the module's name, as peft matches them). ``lora_bias`` adapters also add
scaling · bias(B) to the module's bias. Tensors the adapter saves whole (``modules_to_save``,
biases trained with ``bias: all | lora_only``, resized embeddings) replace the base's.

``AdaptedTensors`` puts base and adapter behind the tensor-store interface of ``TensorIndex``: a
tensor the adapter does not touch is read from the base as is, a touched one is computed when it is
read (whole, or a block of rows for blockwise merges) — never the whole model at once. Updates are
computed in float32. Adapter kinds whose merge is not W + scaling·B·A (DoRA, other PEFT methods,
LoRA variants, initialisations that rewrite the base weights) are refused with a one-line error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ModelError
from evomerge.io.config import read_json_object
from evomerge.io.safetensors_reader import PICKLE_SUFFIXES, TensorIndex

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
DELTA_BLOCK = 1 << 20  # entries of ΔW formed at once (4 MiB in float32): the memory a LoRA read adds
# adapter_config.json fields whose (truthy) value makes the merge something other than W + scaling·B·A
_VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
}
# initialisations that rewrite the base weights, so the adapter is a delta from another base
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class Patch:
    """How the adapter changes one tensor: a saved replacement and/or a low-rank (or bias) update."""

    replace: str | None = None  # adapter tensor holding the whole new value
    lora_a: str | None = None  # A factor (None: a bias update scaling · lora_B.bias)
    lora_b: str | None = None
    scaling: float = 1.0
    transposed: bool = False  # ΔW = (B·A)ᵀ: fan_in_fan_out layers and embeddings

    @property
    def has_update(self) -> bool:
        return self.lora_b is not None


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / √r for rank-stabilized LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(a: torch.Tensor | None, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """ΔW = scaling · B·A (transposed when asked), in peft's operation order; a bias update is scaling · b."""
    if a is None:
        return b * scaling
    product = b @ a
    return (product.T if transposed else product) * scaling


def lora_delta_rows(
    a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool, start: int, stop: int
) -> torch.Tensor:
    """Rows ``start:stop`` of ``lora_delta(a, b, …)`` without forming the rest.

    The factor slices are copied to fresh memory first, so a given block comes out bit for bit the
    same whichever read asks for it (BLAS kernels may round differently on misaligned operands).
    """
    if transposed:
        return (b @ a[:, start:stop].clone()).T * scaling
    return (b[start:stop].clone() @ a) * scaling


def delta_block_rows(columns: int) -> int:
    """Rows of ΔW computed at once: blocks of ``DELTA_BLOCK`` entries, the same for whole and ranged reads."""
    return max(1, DELTA_BLOCK // columns)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


class LoraAdapter:
    """One adapter folder: its checked config and, per base tensor name, the ``Patch`` it applies."""

    def __init__(self, folder: Path, config: dict[str, Any], index: TensorIndex, patches: dict[str, Patch]) -> None:
        self.folder = folder
        self.config = config
        self.index = index
        self.patches = patches

    @property
    def base_model(self) -> str | None:
        """The base the adapter says it was trained on (``base_model_name_or_path``)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.folder / CONFIG_FILE, self.folder / WEIGHTS_FILE)

    @classmethod
    def open(cls, folder: str | Path, where: str) -> LoraAdapter:
        """Read and check the adapter in ``folder`` (headers only; factors are read when used)."""
        folder = Path(folder)
        config = _read_config(folder, where)
        _check_kind(config, where)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            also = f" (only {', '.join(pickles)}: evomerge reads safetensors only, unpickling runs code)" if pickles else ""
            raise ModelError(f"{where}: adapter {folder} has no {WEIGHTS_FILE}{also}")
        index = TensorIndex.open_file(weights)
        try:
            patches = _patches(config, index, where)
        except BaseException:
            index.close()
            raise
        return cls(folder, config, index, patches)

    def close(self) -> None:
        self.index.close()


def _read_config(folder: Path, where: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{where}: {folder} is not a LoRA adapter (no {CONFIG_FILE})")
    return read_json_object(path)


def _check_kind(config: dict[str, Any], where: str) -> None:
    """Refuse every adapter whose merged weights are not W + scaling·B·A."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ModelError(f"{where}: the adapter is a {kind or 'unknown'} adapter (peft_type); evomerge merges LoRA adapters only")
    for key, label in _VARIANTS.items():
        if config.get(key):
            raise ModelError(f"{where}: {label} adapters are not supported yet; evomerge merges plain LoRA and rsLoRA adapters")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ModelError(
            f"{where}: the adapter was initialised with '{init}', which rewrites the base weights; convert it to a plain "
            "LoRA first (peft's save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{where}: {CONFIG_FILE}: {key} must be a positive number, got {value!r}")


def _patches(config: dict[str, Any], index: TensorIndex, where: str) -> dict[str, Patch]:
    """Map the adapter's saved tensors to the base tensors they change."""
    factors: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()  # modules adapted as embeddings: ΔW = (B·A)ᵀ
    bias_updates: dict[str, str] = {}
    replacements: dict[str, str] = {}
    for key in index.names:
        name = key.removeprefix(PREFIX)
        if ".lora_" in name:
            module, _, part = name.partition(".lora_")
            if part in ("A.weight", "embedding_A"):
                factors.setdefault(module, {})["A"] = key
                if part == "embedding_A":
                    embeddings.add(module)
            elif part in ("B.weight", "embedding_B"):
                factors.setdefault(module, {})["B"] = key
            elif part == "B.bias":
                bias_updates[module] = key
            elif part == "magnitude_vector":
                raise ModelError(f"{where}: DoRA adapters (lora_magnitude_vector) are not supported yet")
            else:
                raise ModelError(f"{where}: the adapter holds {key!r}, which is not part of a plain LoRA adapter")
        elif ".token_adapter." in name:
            raise ModelError(f"{where}: trainable tokens ({key!r}) are not supported yet")
        else:
            target = re.sub(r"\.(base_layer|modules_to_save(\.default)?)\.", ".", name)
            replacements[target] = key
    patches: dict[str, Patch] = {}
    rslora = bool(config.get("use_rslora"))
    for module, parts in factors.items():
        if "A" not in parts or "B" not in parts:
            raise ModelError(f"{where}: the adapter has only one LoRA factor for module {module!r}")
        r_config = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        a_shape, b_shape = index.shape(parts["A"]), index.shape(parts["B"])
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ModelError(f"{where}: module {module!r}: LoRA on convolutions is not supported (factor shape {list(a_shape)})")
        if a_shape[0] != r_config or b_shape[1] != r_config:
            raise ModelError(
                f"{where}: module {module!r}: {CONFIG_FILE} gives rank {r_config} but the factors are "
                f"{list(a_shape)} and {list(b_shape)}"
            )
        target = f"{module}.weight"
        patches[target] = Patch(
            replace=replacements.pop(target, None),
            lora_a=parts["A"],
            lora_b=parts["B"],
            scaling=lora_scaling(alpha, r_config, rslora),
            transposed=module in embeddings or bool(config.get("fan_in_fan_out")),
        )
    for module, key in bias_updates.items():
        r_config = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        target = f"{module}.bias"
        patches[target] = Patch(
            replace=replacements.pop(target, None), lora_b=key, scaling=lora_scaling(alpha, r_config, rslora)
        )
    for target, key in replacements.items():
        patches[target] = Patch(replace=key)
    return patches


class AdaptedTensors:
    """A base model's tensor store with a LoRA adapter applied: ``TensorIndex``'s read interface.

    ``base_id`` is the hub id the base was resolved from (if any): an adapter that names another
    hub model as its base is refused, as is one whose updates do not fit the base's tensors.
    """

    def __init__(self, base: TensorIndex, adapter: LoraAdapter, where: str, base_id: str | None = None) -> None:
        self.base = base
        self.adapter = adapter
        self.folder = base.folder
        self.names = base.names
        self.files: tuple[Path, ...] = (*base.files, *adapter.files)
        _check_named_base(adapter, base_id, where)
        self._patches = {name: self._fitted(name, patch, where) for name, patch in adapter.patches.items()}

    def _fitted(self, name: str, patch: Patch, where: str) -> Patch:
        """``patch`` checked against the base tensor it changes (orientation of ΔW settled by shape)."""
        trained_on = f" (trained on '{self.adapter.base_model}')" if self.adapter.base_model else ""
        mismatch = f"{where}: the adapter{trained_on} does not fit this base"
        if name not in self.base:
            raise ModelError(f"{mismatch}: it changes tensor {name!r}, which the base does not store")
        shape = self.base.shape(name)
        if patch.replace is not None and self.adapter.index.shape(patch.replace) != shape:
            got = list(self.adapter.index.shape(patch.replace))
            raise ModelError(f"{mismatch}: tensor {name!r} is {list(shape)} in the base but {got} in the adapter")
        if not patch.has_update:
            return patch
        b_shape = self.adapter.index.shape(patch.lora_b)  # type: ignore[arg-type]
        if patch.lora_a is None:
            if (b_shape[0],) != shape:
                raise ModelError(f"{mismatch}: bias {name!r} is {list(shape)} in the base but the adapter's update is {[b_shape[0]]}")
            return patch
        a_shape = self.adapter.index.shape(patch.lora_a)
        straight, flipped = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        if shape not in (straight, flipped):
            raise ModelError(
                f"{mismatch}: tensor {name!r} is {list(shape)} in the base but the adapter's update is {list(straight)}"
            )
        if straight != flipped:  # only square updates need the config's fan_in_fan_out to say which way
            return Patch(patch.replace, patch.lora_a, patch.lora_b, patch.scaling, shape == flipped)
        return patch

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def file(self, name: str) -> Path:
        return self.base.file(name)

    def patched(self) -> Iterator[str]:
        """The base tensors the adapter changes."""
        return iter(self._patches)

    def get(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` with the adapter applied (``TensorIndex.get``'s contract)."""
        patch = self._patches.get(name)
        if patch is None:
            return self.base.get(name, device=device, dtype=dtype, out=out)
        direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
        store, key = (self.adapter.index, patch.replace) if patch.replace is not None else (self.base, name)
        value = store.get(key, device=device, dtype=torch.float32, out=out if direct else None)  # type: ignore[arg-type]
        if patch.has_update:
            self._add_update(name, patch, value.view(-1), 0)
        if out is not None:
            return value if direct else out.copy_(value)
        return value.to(dtype=dtype or self.dtype(name))

    def get_range(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Flat entries ``start … start + out.numel()`` of ``name`` with the adapter applied."""
        patch = self._patches.get(name)
        if patch is None:
            return self.base.get_range(name, start, out)
        direct = out.dtype == torch.float32 and out.is_contiguous()
        staged = out if direct else torch.empty(out.numel(), dtype=torch.float32, device=out.device)
        if patch.replace is not None:
            self.adapter.index.get_range(patch.replace, start, staged)
        else:
            self.base.get_range(name, start, staged)
        if patch.has_update:
            self._add_update(name, patch, staged, start)
        return out if direct else out.copy_(staged)

    def _add_update(self, name: str, patch: Patch, flat: torch.Tensor, start: int) -> None:
        """Add ΔW's flat entries ``start … start + flat.numel()`` to ``flat``, block of rows by block of rows."""
        index = self.adapter.index
        a = None if patch.lora_a is None else index.get(patch.lora_a, device=flat.device, dtype=torch.float32)
        b = index.get(patch.lora_b, device=flat.device, dtype=torch.float32)  # type: ignore[arg-type]
        shape = self.shape(name)
        stop = start + flat.numel()
        if a is None or len(shape) != 2:
            flat += lora_delta(a, b, patch.scaling, patch.transposed).reshape(-1)[start:stop]
            return
        rows, columns = shape
        step = delta_block_rows(columns)
        for row in range((start // columns) // step * step, rows, step):
            low = row * columns
            if low >= stop:
                break
            block = lora_delta_rows(a, b, patch.scaling, patch.transposed, row, min(rows, row + step)).reshape(-1)
            first, last = max(start, low), min(stop, low + block.numel())
            flat[first - start : last - start] += block[first - low : last - low]

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> AdaptedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_named_base(adapter: LoraAdapter, base_id: str | None, where: str) -> None:
    """An adapter that names a hub model as its base must be applied to that model."""
    from evomerge.pool.sources import HUB_ID, is_hub_id

    named = adapter.base_model
    if base_id is None or named is None or not is_hub_id(named):
        return
    match = HUB_ID.match(named)
    assert match is not None
    if match["repo"].lower() != base_id.lower():
        raise ModelError(f"{where}: the adapter was trained on '{named}', not on '{base_id}' (the model it is applied to here)")
