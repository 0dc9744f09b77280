"""Blockwise merging: streamed whole-tensor statistics and block-by-block export equal whole-tensor merges."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.io.safetensors_reader import TensorIndex
from evomerge.io.safetensors_writer import ShardedSafetensorsWriter
from evomerge.materialize import ResidentMerger, export_merge
from evomerge.materialize import blocks as blocks_module
from evomerge.merge import OPERATORS, chunking, register_operator
from evomerge.merge.sparsify import (
    breadcrumbs_ranks,
    l1_rescale,
    l1_rescale_from_blocks,
    magnitude_ranks,
    window_from_blocks,
    window_from_values,
)
from evomerge.pool import ModelPool
from evomerge.recipe import recipe_from_dict


def _passes(x: torch.Tensor, block: int):
    return lambda: ((start, x[start : start + block]) for start in range(0, x.numel(), block))


def _sample(n: int, seed: int, zeros: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(n, generator=g) * 8) / 8  # coarse grid: many tied magnitudes
    x[torch.rand(n, generator=g) < zeros] = 0
    return x


@pytest.mark.parametrize("n,seed,zeros", [(1, 0, 0.0), (7, 1, 0.0), (5000, 2, 0.0), (70001, 3, 0.3), (300000, 4, 0.9)])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.5, 0.97, 1.0])
def test_streamed_window_equals_the_whole_tensor_window(n, seed, zeros, density):
    x = _sample(n, seed, zeros)
    for lo, hi in (magnitude_ranks(n, density), breadcrumbs_ranks(n, density, 0.05)):
        whole = window_from_values(x.abs(), lo, hi)
        streamed = window_from_blocks(_passes(x, 4096), n, lo, hi)
        assert (streamed.lo, streamed.hi, streamed.low_value, streamed.high_value) == (
            whole.lo, whole.hi, whole.low_value, whole.high_value
        )
        assert (streamed.drop is None) == (whole.drop is None)
        if whole.drop is not None:
            assert torch.equal(streamed.drop, whole.drop)
        if not whole.keeps_all:
            assert l1_rescale_from_blocks(_passes(x, 1 << 17), n, x.device, streamed) == l1_rescale(x, whole)


def test_streamed_window_keeps_exactly_the_requested_count():
    x = _sample(50000, 5, 0.0)
    lo, hi = magnitude_ranks(x.numel(), 0.25)
    window = window_from_blocks(_passes(x, 1000), x.numel(), lo, hi)
    magnitudes = x.abs()
    kept = int(((magnitudes >= window.low_value) & (magnitudes <= window.high_value)).sum()) - window.drop.numel()
    assert kept == hi - lo == 12500
    assert window.low_value > 0 and window.drop.numel() > 0  # the boundary value is tied: the test means something


METHODS = {
    "linear": ({}, {"expert_1": {"weight": 0.7}, "expert_2": {"weight": 0.6}}),
    "task_arithmetic": ({"lambda": 0.9}, {"expert_1": {"weight": 0.7}, "expert_2": {"weight": -0.4}}),
    "lines": ({"alpha": 0.5, "beta": 1.0}, {"expert_1": {"weight": 1.0}, "expert_2": {"weight": 0.5}}),
    "ties": ({}, {"expert_1": {"weight": 1.0, "density": 0.4}, "expert_2": {"weight": 0.5, "density": 0.7}}),
    "ties_rescaled": (
        {"rescale": True},
        {"expert_1": {"weight": 1.0, "density": 0.4}, "expert_2": {"weight": 0.5, "density": 0.7}},
    ),
    "dare_ties": ({}, {"expert_1": {"weight": 0.9, "density": 0.6}, "expert_2": {"weight": 0.5, "density": 0.3}}),
    "dare_linear": ({}, {"expert_1": {"weight": 0.9, "density": 0.6}, "expert_2": {"weight": 0.0, "density": 0.3}}),
    "breadcrumbs": ({}, {"expert_1": {"weight": 1.0, "density": 0.5, "gamma": 0.1}, "expert_2": {"weight": 1.0, "density": 0.8}}),
    "breadcrumbs_ties": ({}, {"expert_1": {"weight": 1.0, "density": 0.5}, "expert_2": {"weight": 0.3, "density": 1.0}}),
    "passthrough": ({"source": "expert_2", "scale": 0.5}, {}),
    "slerp": ({"t": 0.3}, {}),
    "model_stock": ({}, {}),
    "model_stock_filter_wise": ({"filter_wise": True}, {}),
    "layer_swap": ({"outer": "expert_1", "inner": "expert_2", "bottom": 1, "width": 1}, {}),
}


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of 16 entries, so pico tensors span many blocks of 128."""
    monkeypatch.setattr(chunking, "CHUNK", 16)
    calls = []
    original = blocks_module.merge_blocks

    def counting(plan, *args, **kwargs):
        calls.append(plan.name)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr("evomerge.materialize.export.merge_blocks", counting)
    return calls


@pytest.mark.parametrize("key", sorted(METHODS))
def test_blockwise_export_equals_the_whole_tensor_merge(key, make_pico_family, small_chunks, tmp_path):
    family = make_pico_family("llama", 2, dtype=torch.bfloat16, hidden=32, vocab_size=96)
    shared, per_model = METHODS[key]
    method = key.removesuffix("_rescaled").removesuffix("_filter_wise")
    data = {"models": {k: str(v) for k, v in family.items()}, "method": method, "parameters": shared, "seed": 5}
    if method == "slerp":
        data["sources"] = ["expert_1"]
    if OPERATORS[method].needs_base:
        data["base"] = "base"
    if per_model:
        data["model_parameters"] = per_model
    recipe = recipe_from_dict(data)
    exported = {}
    out = export_merge(recipe, tmp_path / "merged", progress=False)
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    # 96×32 entries: 24 blocks of 128 (filter-wise model stock needs whole rows: merged whole)
    assert ("model.embed_tokens.weight" in small_chunks) == (key != "model_stock_filter_wise")
    with ModelPool.open(recipe.models, recipe.base) as pool:
        merger = ResidentMerger.load(pool, dtype=torch.float32)
        merger.apply(recipe)
        whole = merger.model.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, whole[name].to(tensor.dtype)), name


def test_only_blockwise_operators_get_a_prepare_hook():
    assert {name for name, op in OPERATORS.items() if not op.blockwise} == {"della", "della_linear"}
    with pytest.raises(ValueError, match="prepare hook only serves blockwise operators"):
        register_operator("not_blockwise", prepare=lambda inputs, params, stream: {})


def test_range_reads_and_their_errors(pico_family):
    index = TensorIndex.open(pico_family["base"])
    name = "model.embed_tokens.weight"
    whole = index.get(name).reshape(-1)
    out = torch.empty(100)
    assert torch.equal(index.get_range(name, 37, out), whole[37:137])
    half = torch.empty(100, dtype=torch.bfloat16)
    assert torch.equal(index.get_range(name, 37, half), whole[37:137].to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: entries 2000\.\.2100 are outside \[64, 32\]"):
        index.get_range(name, 2000, out)


def test_pieces_must_add_up_to_the_declared_tensor(tmp_path):
    with pytest.raises(ValueError, match="declared 6 entries, got 4"):
        with ShardedSafetensorsWriter(tmp_path / "a", [("w", (2, 3), torch.float32)]) as writer:
            writer.write_pieces("w", [torch.ones(2), torch.ones(2)])
    assert not list((tmp_path / "a").iterdir())
    with pytest.raises(ValueError, match="declared 6 entries, got more"):
        with ShardedSafetensorsWriter(tmp_path / "b", [("w", (2, 3), torch.float32), ("v", (1,), torch.float32)]) as writer:
            writer.write_pieces("w", [torch.ones(4), torch.ones(4)])
    with ShardedSafetensorsWriter(tmp_path / "c", [("w", (2, 3), torch.float32)]) as writer:
        writer.write_pieces("w", [torch.arange(4.0), torch.arange(4.0, 6.0)])
    assert torch.equal(load_file(tmp_path / "c" / "model.safetensors")["w"], torch.arange(6.0).view(2, 3))
