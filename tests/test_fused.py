"""Fused (compiled) task-vector kernels give exactly the eager chunked result, and fall back cleanly."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from evomerge.materialize import ResidentMerger, export_merge
from evomerge.merge import TensorInputs, chunking, fused, get_operator
from evomerge.merge import task_arithmetic as task_arithmetic_module
from evomerge.pool import ModelPool
from evomerge.recipe import recipe_from_dict

N = 3001  # not a multiple of the vector width: the kernel's tail loop runs too
NAMES = ["a", "b", "c"]

# method -> (shared, per-source); each row is one kernel structure (or shares one)
CASES = {
    "task_arithmetic": ({"lambda": 0.9}, [{"weight": 0.7}, {"weight": -0.4}, {"weight": 0.0}]),
    "lines": ({"alpha": 0.5, "beta": 1.0}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.0}]),
    "ties": ({}, [{"density": 0.4}, {"weight": -0.5, "density": 0.7}, {"density": 1.0}]),
    "ties_rescaled": ({"rescale": True, "lambda": 0.8}, [{"density": 0.4}, {"density": 0.7}, {"density": 0.2}]),
    "breadcrumbs": ({}, [{"density": 0.5, "gamma": 0.1}, {"density": 0.8}, {"density": 0.0}]),
    "breadcrumbs_ties": ({}, [{"density": 0.5}, {"weight": 0.3, "density": 1.0}, {"density": 0.6}]),
    "dare_ties": ({}, [{"weight": 0.9, "density": 0.6}, {"density": 0.3}, {"weight": 0.5, "density": 1.0}]),
    "dare_linear": ({"normalize": True}, [{"density": 0.6}, {"weight": -0.2, "density": 0.3}, {"density": 0.9}]),
}


def _tensors(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three sources on a coarse grid (tied magnitudes, exact cancellations, signed zeros)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(N, generator=g) * 4) / 4
    base[torch.rand(N, generator=g) < 0.1] = -0.0
    sources = []
    for _ in NAMES:
        tau = torch.round(torch.randn(N, generator=g) * 8) / 64
        tau[torch.rand(N, generator=g) < 0.2] = 0.0
        sources.append(base + tau)
    return base, sources


def _merge(method: str, seed: int, *, fused_on: bool, monkeypatch: pytest.MonkeyPatch, cache: dict | None = None):
    shared, per_source = CASES[method]
    name = method.removesuffix("_rescaled")
    spec = get_operator(name)
    params = spec.resolve(shared, per_source, "test")
    base, sources = _tensors(seed)
    inputs = TensorInputs(
        name="model.layers.1.mlp.up_proj.weight",
        base=base,
        sources=sources,
        source_names=NAMES,
        layer=1,
        num_layers=3,
        seed=seed,
        cache=cache,
    )
    calls: list[bool] = []
    original = task_arithmetic_module.fused_merge

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    with monkeypatch.context() as patch, fused.repeated_merges():
        patch.setattr(fused, "MIN_NUMEL", 1 if fused_on else 1 << 62)
        patch.setattr(task_arithmetic_module, "fused_merge", spy)
        result = spec.fn(inputs, params, None)
    return result, calls


CONSENSUS = ["ties", "ties_rescaled", "breadcrumbs_ties", "dare_ties"]


@pytest.mark.parametrize("method", sorted(set(CASES) - set(CONSENSUS)))
def test_plain_sums_stay_eager(method, monkeypatch):
    _, calls = _merge(method, 0, fused_on=True, monkeypatch=monkeypatch)
    assert calls == [False]


@pytest.mark.parametrize("method", CONSENSUS)
def test_fused_kernel_equals_the_eager_chunks_bit_for_bit(method, monkeypatch):
    for seed in (0, 1):
        eager, eager_calls = _merge(method, seed, fused_on=False, monkeypatch=monkeypatch)
        got, calls = _merge(method, seed, fused_on=True, monkeypatch=monkeypatch)
        assert eager_calls == [False] and calls == [True]
        assert torch.equal(got.view(torch.int32), eager.view(torch.int32))  # signed zeros included
        assert not torch.equal(got, _tensors(seed)[0])


def test_window_ties_are_recomputed_exactly(monkeypatch):
    """The coarse grid ties magnitudes at the trim boundary: the gathered fix-up pass has work."""
    base, sources = _tensors(0)
    from evomerge.merge.sparsify import magnitude_ranks, window_from_values

    window = window_from_values((sources[0] - base).abs(), *magnitude_ranks(N, 0.4))
    assert window.drop is not None and window.drop.numel() > 10
    eager, _ = _merge("ties", 0, fused_on=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(fused, "_recompute_dropped", lambda *args: None)
    unfixed, _ = _merge("ties", 0, fused_on=True, monkeypatch=monkeypatch)
    assert not torch.equal(unfixed, eager)  # without the fix-up the kernel keeps the tied entries


def test_cached_candidates_reuse_one_compiled_kernel(monkeypatch):
    cache: dict = {}
    first, _ = _merge("dare_ties", 0, fused_on=True, monkeypatch=monkeypatch, cache=cache)
    before = fused._kernel.cache_info().currsize
    again, calls = _merge("dare_ties", 0, fused_on=True, monkeypatch=monkeypatch, cache=cache)
    assert calls == [True] and torch.equal(first, again)
    assert fused._kernel.cache_info().currsize == before


def test_della_is_not_fused(monkeypatch):
    base, sources = _tensors(0)
    spec = get_operator("della")
    params = spec.resolve({}, [{"density": 0.5}] * 3, "test")
    inputs = TensorInputs(name="t", base=base, sources=sources, source_names=NAMES)
    monkeypatch.setattr(fused, "MIN_NUMEL", 1)
    calls = []
    original = task_arithmetic_module.fused_merge
    monkeypatch.setattr(task_arithmetic_module, "fused_merge", lambda *a: calls.append(original(*a)) or calls[-1])
    with fused.repeated_merges():
        spec.fn(inputs, params, None)
    assert calls == [False]


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    eager, _ = _merge("dare_ties", 3, fused_on=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(fused, "_broken", [])

    def broken_kernel(*args):
        def kernel(*tensors):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return kernel

    monkeypatch.setattr(fused, "_kernel", broken_kernel)
    with caplog.at_level(logging.WARNING, logger="evomerge.merge.fused"):
        got, calls = _merge("dare_ties", 3, fused_on=True, monkeypatch=monkeypatch)
    assert calls == [False] and torch.equal(got, eager)
    assert "merging eagerly (RuntimeError: no C++ compiler found)" in caplog.text
    assert not fused.enabled(torch.device("cpu"))


def test_only_repeated_cpu_merges_are_fused_unless_switched_off(monkeypatch):
    monkeypatch.setattr(fused, "_broken", [])
    cpu = torch.device("cpu")
    assert not fused.enabled(cpu)  # a one-off merge (an export) stays eager
    with fused.repeated_merges():
        assert fused.enabled(cpu)
        assert not fused.enabled(torch.device("meta"))
        monkeypatch.setenv(fused.ENV, "off")
        assert not fused.enabled(cpu)
    assert not fused.enabled(cpu)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_the_eager_export_writes_what_the_fused_resident_merger_computes(method, make_pico_family, monkeypatch, tmp_path):
    monkeypatch.setattr(chunking, "CHUNK", 16)  # pico tensors span many blocks of 128
    family = make_pico_family("llama", 3, dtype=torch.bfloat16, hidden=32, vocab_size=96)
    per_model = {"expert_1": {"weight": 1.0, "density": 0.4}, "expert_2": {"weight": 0.5, "density": 0.7}}
    recipe = recipe_from_dict(
        {
            "models": {k: str(v) for k, v in family.items()},
            "base": "base",
            "method": method,
            "model_parameters": per_model,
            "seed": 5,
        }
    )
    monkeypatch.setattr(fused, "MIN_NUMEL", 2)
    calls: list[bool] = []
    original = task_arithmetic_module.fused_merge
    monkeypatch.setattr(task_arithmetic_module, "fused_merge", lambda *a: calls.append(original(*a)) or calls[-1])
    out = export_merge(recipe, tmp_path / "merged", progress=False)
    assert calls and not any(calls)  # blockwise and eager
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    calls.clear()
    with ModelPool.open(recipe.models, recipe.base) as pool:
        merger = ResidentMerger.load(pool, dtype=torch.float32)
        merger.apply(recipe)
        whole = merger.model.state_dict()
    assert calls and all(calls)
    for name, tensor in exported.items():
        assert torch.equal(tensor, whole[name].to(tensor.dtype)), name
