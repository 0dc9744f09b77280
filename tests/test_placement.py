"""Placements of a worker's sources: every placement and cache budget merges to the same bits; a
tensor whose merge did not change is not merged again; the merger admits caches as the plan does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.materialize import ResidentMerger, export_merge
from evomerge.plan import Capacity, operators_of, plan_worker, pool_shape
from evomerge.pool import ModelPool
from evomerge.recipe import Blend, Segment, recipe_from_dict
from evomerge.recipe.blend import order_digest

PLACEMENTS = ("resident", "compact", "streamed")


@pytest.fixture(scope="module")
def family(make_pico_family) -> dict[str, str]:
    """bfloat16 on disk, as most checkpoints: compact placements keep half the bytes. The embedding
    and head (1.28 M entries) exceed one block, so an uncached TIES window is found by streamed selection."""
    built = make_pico_family("llama", 2, dtype=torch.bfloat16, hidden=64, layers=3, vocab_size=20000)
    return {name: str(path) for name, path in built.items()}


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """Fused kernels (bit-identical to eager, tests/test_fused.py) would compile for a minute here."""
    monkeypatch.setenv("EVOMERGE_FUSED_KERNELS", "off")


def recipe(models: dict[str, str], method: str, weights=(0.7, 0.4), seed: int = 0, rules=()):
    dense = method in ("linear", "task_arithmetic")
    per_source = [{"weight": w} if dense else {"weight": w, "density": d} for w, d in zip(weights, (0.5, 0.6))]
    if method == "della":
        per_source = [{**p, "epsilon": 0.1} for p in per_source]
    return recipe_from_dict({"models": models, "base": "base", "method": method, "seed": seed, "rules": list(rules),
                             "model_parameters": dict(zip(("expert_1", "expert_2"), per_source))})


def live(merger: ResidentMerger) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in merger.model.state_dict().items()}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "linear"])
def test_every_placement_and_cache_budget_merges_the_same_bits(family, method):
    first, second = recipe(family, method), recipe(family, method, (0.5, 0.9), seed=3)
    results = {}
    with ModelPool.open(family, "base") as pool:
        skeleton = ResidentMerger.load(pool, dtype=torch.bfloat16).model  # one live model, rewritten by each merger
    # every placement; caches unbounded, none (a large tensor's TIES window by streamed selection), bounded
    for placement, cache in (("resident", None), ("compact", 0), ("streamed", 6_000_000), ("compact", None)):
        with ModelPool.open(family, "base") as pool:
            merger = ResidentMerger(pool, skeleton, placement=placement, cache_bytes=cache)
            merger.apply(second)  # caches and buffers filled by another candidate first
            merger.apply(first)
            results[placement, cache] = live(merger)
            assert merger.placement == placement
            if cache is not None:
                assert merger.cache_nbytes <= cache
    reference = results["resident", None]
    for key, tensors in results.items():
        assert all(torch.equal(reference[name], tensors[name]) for name in reference), key


def test_compact_and_streamed_hold_the_stored_dtype(family):
    with ModelPool.open(family, "base") as pool:
        numel = sum(t.numel() for name, t in ResidentMerger.load(pool).model.named_parameters())
        sizes = {p: ResidentMerger.load(pool, placement=p).sources.nbytes for p in PLACEMENTS}
    assert sizes["resident"] == 3 * 4 * numel and sizes["compact"] == sizes["streamed"] == 3 * 2 * numel


def test_the_search_scores_what_export_writes_from_a_compact_worker(family, tmp_path):
    candidate = recipe(family, "ties").model_copy(update={"dtype": "bfloat16"})
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool, dtype=torch.bfloat16, placement="compact", cache_bytes=0)
        merger.apply(candidate)
        scored = live(merger)
    from safetensors.torch import load_file

    exported = load_file(export_merge(candidate, tmp_path / "out", progress=False) / "model.safetensors")
    assert all(torch.equal(scored[name], exported[name]) for name in exported)


def test_unchanged_tensors_are_not_merged_again(family):
    only_mlp = [{"kinds": ["mlp"], "layers": [1, 1], "model_parameters": {"expert_1": {"weight": 0.2}}}]
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool, placement="compact")
        total = len(merger._targets)
        merger.apply(recipe(family, "ties"))
        assert merger.last_apply == {"merged": total, "unchanged": 0}
        merger.apply(recipe(family, "ties"))
        assert merger.last_apply == {"merged": 0, "unchanged": total}
        merger.apply(recipe(family, "ties", rules=only_mlp))  # one layer's MLP changes
        mlp = len([n for n in pool.tensor_names if pool.layer_map.info(n).layer == 1 and pool.layer_map.info(n).kind.value == "mlp"])
        assert merger.last_apply == {"merged": mlp, "unchanged": total - mlp}
        after_rule = live(merger)
        merger.apply(recipe(family, "ties", seed=1))  # a seed changes every tensor's signature
        assert merger.last_apply["merged"] == total
        merger.apply(recipe(family, "ties", rules=only_mlp))
        assert all(torch.equal(after_rule[n], t) for n, t in live(merger).items())
    with ModelPool.open(family, "base") as pool:
        fresh = ResidentMerger.load(pool, placement="compact")
        fresh.apply(recipe(family, "ties", rules=only_mlp))
        assert all(torch.equal(after_rule[n], t) for n, t in live(fresh).items())


def test_a_failed_merge_leaves_no_tensor_marked_as_merged(family):
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool)
        good = recipe(family, "linear")
        merger.apply(good)
        with pytest.raises(Exception, match="sum to 0"):
            merger.apply(recipe(family, "linear", weights=(1.0, -1.0)))
        merger.apply(good)
        assert merger.last_apply["merged"] > 0  # what the failed candidate touched is merged again
        expected = live(merger)
    with ModelPool.open(family, "base") as pool:
        fresh = ResidentMerger.load(pool)
        fresh.apply(good)
        assert all(torch.equal(expected[n], t) for n, t in live(fresh).items())


def test_blends_skip_unchanged_tensors_too(family):
    with ModelPool.open(family, "base") as pool:
        merger = ResidentMerger.load(pool, placement="streamed")
        order = pool.parameter_order()
        size = sum(n for _, n in order)
        models = {k: family[k] for k in ("expert_1", "expert_2")}
        half = Blend(models=models, reference="expert_1", order=order_digest(order), size=size,
                     segments=[Segment(start=0, weights={"expert_1": 0.5, "expert_2": 0.5})])
        split = half.model_copy(update={"segments": [*half.segments, Segment(start=size - order[-1][1], weights={"expert_1": 1.0})]})
        merger.apply(half)
        merger.apply(split)  # only the last tensor of the canonical order changes
        assert merger.last_apply == {"merged": 1, "unchanged": len(order) - 1}


def test_the_merger_admits_caches_as_its_plan_counts_them(family):
    for budget in (0, 6_000_000, 10**9):
        with ModelPool.open(family, "base") as pool:
            shape = pool_shape(pool)
            candidate = recipe(family, "ties")
            operators, sources = operators_of(candidate.model_dump(mode="json"), shape)
            plan = plan_worker(shape, device="cpu", dtype="float32", placement="compact", cache_memory=budget,
                               operators=operators, sources=sources, workloads=[], capacity=Capacity(None, None, "", ""))
            merger = ResidentMerger.load(pool, placement="compact", cache_bytes=plan.cache_budget)
            merger.apply(candidate)
            assert merger.cache_reserved == plan.part("caches").bytes
            assert len(merger._caches) == plan.cached_tensors
            assert merger.cache_nbytes == plan.part("caches").bytes  # density < 1 everywhere: every byte declared is used


def test_placements_keep_a_lora_source_in_float32(family, tmp_path):
    """An adapted tensor exists only in float32 (as export reads it): compact keeps it so, and merges the same bits."""
    pytest.importorskip("peft")
    from tests.test_lora import make_adapter

    make_adapter(Path(family["expert_1"]), tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    models = {**family, "expert_2": f"{family['expert_1']}+{tmp_path / 'adapter'}"}
    results = {}
    for placement in PLACEMENTS:
        with ModelPool.open(models, "base") as pool:
            merger = ResidentMerger.load(pool, placement=placement)
            merger.apply(recipe(models, "ties"))
            results[placement] = live(merger)
            if placement == "compact":
                dtypes = {merger.sources._tensors["expert_2"][n].dtype for n in merger._targets}
                assert dtypes == {torch.float32} and pool_shape(pool).stored_bytes("expert_2") == 2 * pool_shape(pool).stored_bytes("base")
    assert all(torch.equal(results["resident"][n], results[p][n]) for p in PLACEMENTS for n in results["resident"])
