"""Streamed export: write a recipe's merged model as a Hugging Face folder, tensor by tensor.

Tensors are read when merged and written as soon as they are. A large tensor of a blockwise
operator is merged and written block by block (``blocks``), so peak memory stays a few blocks
whatever the number of sources; other tensors are merged whole (one tensor per source). The
folder is assembled under a temporary name beside the destination and renamed at the end, so a
crash never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from evomerge.devices import usable_device
from evomerge.errors import ConfigError
from evomerge.io.safetensors_writer import ShardedSafetensorsWriter
from evomerge.materialize.blocks import blockwise, merge_blocks
from evomerge.materialize.tensors import (
    BufferPool,
    blend_tensor,
    is_mergeable,
    merge_tensor,
    output_dtype,
)
from evomerge.materialize.path_export import (
    check_path,
    path_config,
    path_tensors,
    read_path_tensor,
    untied_head,
)
from evomerge.pool import ModelPool
from evomerge.pool.sources import ResolvedSource, Weights
from evomerge.recipe import Blend, Blueprint, LayerPath, Recipe, RecipePlanner, order_digest

DEFAULT_SHARD_BYTES = 5 * 1024**3
MANIFEST = ".evomerge-export.json"
"""Lists the files an export wrote: ``--overwrite`` replaces a folder only when it holds nothing else."""
_NOT_TOKENIZER = {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json", "zoo.json"}


def export_merge(
    recipe: Blueprint,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    card_extra: str = "",
    extra_files: Mapping[str, str] | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``recipe`` (any kind) and write it to ``out_dir`` (safetensors, config, tokenizer, model card).

    ``extra_files``: more text files (name → content) written into the folder with the model.
    ``overwrite`` replaces an empty folder or an earlier export holding only what it wrote; a
    folder with anything else in it is refused, untouched.
    """
    out_dir = Path(out_dir)
    usable_device(device, "--device")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")
    if out_dir.exists():
        _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        base = recipe.base if isinstance(recipe, Recipe) else recipe.reference if isinstance(recipe, Blend) else None
        with ModelPool.open(recipe.models, base, trust_remote_code=trust_remote_code) as pool:
            config = None
            if isinstance(recipe, Blend):
                _write_blend(recipe, pool, tmp, device, max_shard_bytes, progress)
            elif isinstance(recipe, LayerPath):
                config = _write_path(recipe, pool, tmp, device, max_shard_bytes, progress)
            else:
                _write_tensors(recipe, pool, tmp, device, max_shard_bytes, progress)
            sources = {name: pool.source(name) for name in recipe.models}
            _write_metadata(
                recipe, pool.path(recipe.reference), pool.path(recipe.tokenizer_source), tmp, card_extra, sources, config
            )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(sorted([MANIFEST, *(p.name for p in tmp.iterdir())])) + "\n")
        _finalize(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tensors(
    recipe: Recipe, pool: ModelPool, folder: Path, device: str, max_shard_bytes: int, show: bool
) -> None:
    reference = recipe.reference
    layer_map = pool.layer_map
    planner = RecipePlanner(recipe, layer_map.num_layers)
    sources = recipe.source_names
    names = pool.tensor_names
    layout = []
    for name in names:
        stored = pool.dtype(reference, name)
        dtype = output_dtype(recipe.dtype, stored) if is_mergeable(stored) else stored
        layout.append((name, pool.shape(reference, name), dtype))
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_bytes=max_shard_bytes)
    buffers = BufferPool(device)
    with writer, _progress(show) as bar:
        task = bar.add_task("merging", total=len(names))
        for (name, _, dtype) in layout:
            if not is_mergeable(pool.dtype(reference, name)):
                writer.write(name, pool.tensor(reference, name, device=device, dtype=None))
            else:
                info = layer_map.info(name)
                plan = planner.plan(name, info.layer, info.kind.value)
                shape = pool.shape(reference, name)
                if blockwise(plan, math.prod(shape), buffers.device):
                    blocks = merge_blocks(
                        plan,
                        pool,
                        base=recipe.base,
                        sources=sources,
                        num_layers=layer_map.num_layers,
                        seed=recipe.seed,
                        buffers=buffers,
                    )
                    writer.write_pieces(name, (_cast(merged, dtype) for merged in blocks))
                    bar.advance(task)
                    continue
                base = _input(pool, recipe.base, name, device, buffers, "base", shape) if recipe.base else None
                tensors = [
                    _input(pool, model, name, device, buffers, f"source{i}", shape) for i, model in enumerate(sources)
                ]
                merged = merge_tensor(
                    plan,
                    base=base,
                    sources=tensors,
                    source_names=sources,
                    num_layers=layer_map.num_layers,
                    seed=recipe.seed,
                    out=buffers.get("out", shape),
                )
                writer.write(name, _cast(merged, dtype))
            bar.advance(task)


def _write_blend(blend: Blend, pool: ModelPool, folder: Path, device: str, max_shard_bytes: int, show: bool) -> None:
    """A blend tensor by tensor: each floating tensor is the weighted sum of its pieces (``blend_tensor``)."""
    order = pool.parameter_order()
    if order_digest(order) != blend.order:
        raise ConfigError("blend: it was made over another parameter order than these models' (another model family)")
    offsets, position = {}, 0
    for name, numel in order:
        offsets[name] = position
        position += numel
    reference = pool.model(blend.reference)
    layout = []
    for name in pool.tensor_names:
        stored = pool.dtype(blend.reference, name)
        dtype = output_dtype(blend.dtype, stored) if is_mergeable(stored) else stored
        layout.append((name, pool.shape(blend.reference, name), dtype))
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_bytes=max_shard_bytes)
    buffers = BufferPool(device)
    models = list(blend.models)
    with writer, _progress(show) as bar:
        task = bar.add_task("merging", total=len(layout))
        for name, shape, dtype in layout:
            if not is_mergeable(pool.dtype(blend.reference, name)):
                writer.write(name, pool.tensor(blend.reference, name, device=device, dtype=None))
            else:
                offset, numel = offsets[reference.stored_name(name)], math.prod(shape)
                inputs = {m: _input(pool, m, name, device, buffers, f"model{i}", list(shape)) for i, m in enumerate(models)}
                merged = blend_tensor(blend, offset, numel, inputs, buffers.get("out", list(shape)))
                writer.write(name, _cast(merged, dtype))
            bar.advance(task)


def _write_path(path: LayerPath, pool: ModelPool, folder: Path, device: str, max_shard_bytes: int, show: bool) -> dict:
    """A layer path tensor by tensor, scales folded (``path_export``); returns its config."""
    check_path(path, pool)
    untied = untied_head(path, pool)
    tensors = list(path_tensors(path, pool, untied))
    layout = []
    for tensor in tensors:
        stored = pool.dtype(tensor.model, tensor.source)
        dtype = output_dtype(path.dtype, stored) if is_mergeable(stored) else stored
        layout.append((tensor.name, pool.shape(tensor.model, tensor.source), dtype))
    writer = ShardedSafetensorsWriter(folder, layout, max_shard_bytes=max_shard_bytes)
    buffers = BufferPool(device)
    with writer, _progress(show) as bar:
        task = bar.add_task("writing the path", total=len(layout))
        for tensor, (name, shape, dtype) in zip(tensors, layout):
            if not is_mergeable(pool.dtype(tensor.model, tensor.source)):
                writer.write(name, pool.tensor(tensor.model, tensor.source, device=device, dtype=None))
            else:
                value = read_path_tensor(pool, tensor, device, buffers.get("out", list(shape)))
                writer.write(name, _cast(value, dtype))
            bar.advance(task)
    return path_config(path, pool, untied)


def _cast(merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one cast on write: to the output dtype, on the CPU."""
    return merged if merged.dtype == dtype and merged.device.type == "cpu" else merged.to(dtype).cpu()


def _input(
    pool: ModelPool, model: str, name: str, device: str, buffers: BufferPool, role: str, shape: list[int]
) -> torch.Tensor:
    """A float32 input read into a reused buffer (warm pages: no first-touch faults)."""
    return pool.tensor(model, name, device=device, out=buffers.get(role, shape))


def _write_metadata(
    recipe: Blueprint,
    reference: Path,
    tokenizer_from: Path,
    folder: Path,
    card_extra: str,
    sources: Mapping[str, ResolvedSource] | None = None,
    config: dict | None = None,
) -> None:
    """config.json (``config``, else the reference's), generation config, tokenizer files, recipe, card."""
    config = json.loads((reference / "config.json").read_text()) if config is None else config
    if recipe.dtype:
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = recipe.dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = reference / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
    for item in sorted(tokenizer_from.iterdir()):
        if item.is_file() and item.name not in _NOT_TOKENIZER and not _is_weight_file(item.name):
            shutil.copyfile(item, folder / item.name)
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / "README.md").write_text(model_card(recipe, card_extra, sources))


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"))


def model_card(recipe: Blueprint, extra: str = "", sources: Mapping[str, ResolvedSource] | None = None) -> str:
    """A model card that says what the model is made of: each model (hub id and commit, adapter), the recipe."""
    sources = sources or {}
    models = "\n".join(
        f"- `{name}`: {_describe(sources[name]) if name in sources else f'`{ref}`'}" for name, ref in recipe.models.items()
    )
    if isinstance(recipe, Blend):
        made = f"Made by evomerge as a blend of {len(recipe.source_names)} models in {len(recipe.segments)} segment(s).\n"
    elif isinstance(recipe, LayerPath):
        made = (
            f"Made by evomerge as a layer path: {len(recipe.hops)} layers taken from {len(recipe.source_names)} models "
            "(data-flow merge; input scales folded into the output projections).\n"
        )
    else:
        made = f"Made by evomerge with method `{recipe.method}`" + (f" on base `{recipe.base}`" if recipe.base else "") + ".\n"
    parts = [
        "---\ntags: [merge, evomerge]\n---\n",
        "# Merged model\n",
        made,
        f"## Models\n{models}\n",
        f"## Recipe\n```yaml\n{recipe.to_yaml()}```\n",
    ]
    if extra:
        parts.append(extra.rstrip() + "\n")
    return "\n".join(parts)


def _describe(source: ResolvedSource) -> str:
    """One model for the card: a hub id with its revision and commit, or a folder; a LoRA adapter on it."""

    def one(weights: Weights) -> str:
        if weights.repo_id is None:
            return f"`{weights.path}`"
        asked = f" (revision `{weights.revision}`)" if weights.revision not in (None, weights.commit) else ""
        return f"[`{weights.repo_id}`](https://huggingface.co/{weights.repo_id}) at commit `{weights.commit}`{asked}"

    if source.adapter is None:
        return one(source.model)
    return f"LoRA adapter {one(source.adapter)} applied to {one(source.model)}"


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace ``out_dir`` unless it is empty or an export whose every entry it wrote itself."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: --overwrite replaces only a folder evomerge exported; this is not a folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    try:
        written = set(json.loads((out_dir / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        raise ConfigError(
            f"{out_dir}: --overwrite replaces only a folder evomerge exported (no {MANIFEST} here); "
            "choose another output folder"
        ) from None
    foreign = [name for name in entries if name not in written]
    if foreign:
        raise ConfigError(
            f"{out_dir}: --overwrite would delete '{foreign[0]}', which evomerge did not write; move it or choose another folder"
        )


def _finalize(tmp: Path, out_dir: Path) -> None:
    """Give the folder normal permissions and move it into place (replacing an old one last)."""
    os.chmod(tmp, 0o755)
    for item in tmp.iterdir():
        os.chmod(item, 0o644)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show,
        transient=False,
    )

