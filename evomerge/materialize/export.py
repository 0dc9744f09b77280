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
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.devices import usable_device
from evomerge.errors import ConfigError
from evomerge.io.safetensors_writer import ShardedSafetensorsWriter
from evomerge.materialize.blocks import blockwise, merge_blocks
from evomerge.materialize.tensors import BufferPool, is_mergeable, merge_tensor, output_dtype
from evomerge.pool import ModelPool
from evomerge.recipe import Recipe, RecipePlanner

DEFAULT_SHARD_BYTES = 5 * 1024**3
_NOT_TOKENIZER = {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json", "zoo.json"}


def export_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    card_extra: str = "",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``recipe`` and write it to ``out_dir`` (safetensors, config, tokenizer, model card)."""
    out_dir = Path(out_dir)
    usable_device(device, "--device")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with ModelPool.open(recipe.models, recipe.base, trust_remote_code=trust_remote_code) as pool:
            _write_tensors(recipe, pool, tmp, device, max_shard_bytes, progress)
            tokenizer_model = recipe.tokenizer or recipe.reference
            _write_metadata(recipe, pool.path(recipe.reference), pool.path(tokenizer_model), tmp, card_extra)
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


def _cast(merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one cast on write: to the output dtype, on the CPU."""
    return merged if merged.dtype == dtype and merged.device.type == "cpu" else merged.to(dtype).cpu()


def _input(
    pool: ModelPool, model: str, name: str, device: str, buffers: BufferPool, role: str, shape: list[int]
) -> torch.Tensor:
    """A float32 input read into a reused buffer (warm pages: no first-touch faults)."""
    return pool.tensor(model, name, device=device, out=buffers.get(role, shape))


def _write_metadata(recipe: Recipe, reference: Path, tokenizer_from: Path, folder: Path, card_extra: str) -> None:
    config = json.loads((reference / "config.json").read_text())
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
    (folder / "README.md").write_text(model_card(recipe, card_extra))


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"))


def model_card(recipe: Recipe, extra: str = "") -> str:
    """A model card that says what the model is made of (the recipe, verbatim)."""
    models = "\n".join(f"- `{name}`: `{path}`" for name, path in recipe.models.items())
    parts = [
        "---\ntags: [merge, evomerge]\n---\n",
        "# Merged model\n",
        f"Made by evomerge with method `{recipe.method}`"
        + (f" on base `{recipe.base}`" if recipe.base else "")
        + ".\n",
        f"## Models\n{models}\n",
        f"## Recipe\n```yaml\n{recipe.to_yaml()}```\n",
    ]
    if extra:
        parts.append(extra.rstrip() + "\n")
    return "\n".join(parts)


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

