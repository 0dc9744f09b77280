"""DARE-TIES, DARE-linear, DELLA and breadcrumbs-TIES against references written here, entry by entry.

Each reference is the textbook pipeline in plain Python floats on a 20-entry tensor: drop (the same
random draws the operator makes: one ``torch.rand`` uniform per entry in flat order from the
generator ``TensorInputs.generator`` seeds by (seed, model, tensor), kept iff u < p), rescale,
weight, elect the sign of the sum (0 counts as +), add the entries that agree with it (a zero never
agrees), divide by the agreeing weights when normalizing (0 → 1), scale by λ, add to the base.
"""

from __future__ import annotations

import pytest
import torch

import evomerge.merge  # noqa: F401  (registers the operators)
from evomerge.merge import TensorInputs, get_operator

TENSOR = "model.layers.1.self_attn.q_proj.weight"
NAMES = ["a", "b", "c"]
SHAPE = (4, 5)
N = SHAPE[0] * SHAPE[1]


def _models() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator()
    g.manual_seed(7)
    base = torch.randn(SHAPE, generator=g)
    sources = [base + torch.randn(SHAPE, generator=g) for _ in NAMES]
    sources[1].view(-1)[3] = base.view(-1)[3]  # a zero delta: dropped or kept, it never agrees
    sources[2].view(-1)[11] = sources[0].view(-1)[11]  # a tie in |τ| across sources is harmless
    return base, sources


def _inputs(base: torch.Tensor, sources: list[torch.Tensor], seed: int, cache: dict | None) -> TensorInputs:
    return TensorInputs(name=TENSOR, base=base, sources=sources, source_names=NAMES, seed=seed, cache=cache)


def _operator(method: str, shared: dict, per_source: list[dict], seed: int, cache: dict | None) -> list[float]:
    base, sources = _models()
    spec = get_operator(method)
    params = spec.resolve(shared, per_source, "test")
    return spec.fn(_inputs(base, sources, seed, cache), params, None).flatten().tolist()


def _uniforms(seed: int) -> list[list[float]]:
    """The uniform draw behind every entry's keep decision, per source (what the operator consumes)."""
    base, sources = _models()
    inputs = _inputs(base, sources, seed, None)
    return [torch.rand(N, generator=inputs.generator(i)).tolist() for i in range(len(NAMES))]


def _task_vectors() -> tuple[list[float], list[list[float]]]:
    base, sources = _models()
    flat_base = base.flatten().tolist()
    return flat_base, [[s - b for s, b in zip(src.flatten().tolist(), flat_base)] for src in sources]


def _ascending_ranks(tau: list[float]) -> list[int]:
    """Each entry's rank in ascending |τ| order, ties by flat index."""
    order = sorted(range(len(tau)), key=lambda j: (abs(tau[j]), j))
    ranks = [0] * len(tau)
    for rank, j in enumerate(order):
        ranks[j] = rank
    return ranks


def _combine(
    base: list[float], kept: list[list[float]], weights: list[float], lam: float, consensus: bool, normalize: bool
) -> list[float]:
    """θ₀ + λ·(agreeing or plain) sum of wᵢ·keptᵢ, entry by entry."""
    out = []
    for j in range(len(base)):
        deltas = [w * k[j] for w, k in zip(weights, kept)]
        if consensus:
            sign = 1.0 if sum(deltas) >= 0 else -1.0
            agree = [d * sign > 0 for d in deltas]
            total = sum(d for d, a in zip(deltas, agree) if a)
            divisor = sum(w for w, a in zip(weights, agree) if a) if normalize else 1.0
        else:
            total = sum(deltas)
            divisor = sum(weights) if normalize else 1.0
        out.append(base[j] + lam * total / (divisor if divisor != 0 else 1.0))
    return out


def _dare_reference(densities, weights, lam, seed, rescale, consensus, normalize) -> list[float]:
    base, taus = _task_vectors()
    kept = []
    for tau, u, p in zip(taus, _uniforms(seed), densities):
        kept.append([(t / p if rescale else t) if u[j] < p else 0.0 for j, t in enumerate(tau)])
    return _combine(base, kept, weights, lam, consensus, normalize)


def _della_reference(densities, epsilons, weights, lam, seed, rescale, normalize) -> list[float]:
    base, taus = _task_vectors()
    kept = []
    for tau, u, density, eps in zip(taus, _uniforms(seed), densities, epsilons):
        ranks = _ascending_ranks(tau)
        row = []
        for j, t in enumerate(tau):
            p = density - eps + 2 * eps * ranks[j] / (N - 1)  # the largest |τ| is kept most often
            row.append((t / p if rescale else t) if u[j] < p else 0.0)
        kept.append(row)
    return _combine(base, kept, weights, lam, True, normalize)


def _breadcrumbs_reference(densities, gammas, weights, lam, rescale, normalize) -> list[float]:
    base, taus = _task_vectors()
    kept = []
    for tau, density, gamma in zip(taus, densities, gammas):
        keep = int(density * N)
        outliers = int(gamma * N)
        bottom = max(0, N - keep - outliers)  # the smallest entries dropped below the kept band
        ranks = _ascending_ranks(tau)
        row = [t if bottom <= ranks[j] < bottom + keep else 0.0 for j, t in enumerate(tau)]
        if rescale:  # mergekit's: the kept entries carry the whole tensor's L1 norm
            factor = sum(abs(t) for t in tau) / sum(abs(t) for t in row)
            row = [t * factor for t in row]
        kept.append(row)
    return _combine(base, kept, weights, lam, True, normalize)


def _check(got: list[float], expected: list[float], base: list[float]) -> None:
    assert len(got) == len(expected) == N
    for j, (g, e) in enumerate(zip(got, expected)):
        assert g == pytest.approx(e, rel=2e-6, abs=2e-6), f"entry {j}: operator {g}, reference {e}"
    assert sum(g != b for g, b in zip(got, base)) >= N // 4, "too few entries changed to tell anything"


WEIGHTS = [1.0, 0.6, -0.8]


@pytest.mark.parametrize("cache", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize(
    "method,consensus,shared",
    [
        ("dare_ties", True, {}),  # mergekit's defaults: rescale, a sum of the agreeing entries
        ("dare_ties", True, {"normalize": True, "lambda": 0.7}),
        ("dare_ties", True, {"rescale": False}),
        ("dare_linear", False, {}),
        ("dare_linear", False, {"normalize": True, "lambda": 1.3}),
        ("dare_linear", False, {"rescale": False}),
    ],
)
def test_dare_matches_the_reference(method, consensus, shared, seed, cache):
    densities = [0.3, 0.55, 0.8]
    per_source = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, densities)]
    got = _operator(method, shared, per_source, seed, cache)
    expected = _dare_reference(
        densities, WEIGHTS, shared.get("lambda", 1.0), seed, shared.get("rescale", True), consensus,
        shared.get("normalize", False),
    )
    _check(got, expected, _task_vectors()[0])


@pytest.mark.parametrize("cache", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("shared", [{}, {"normalize": False, "lambda": 0.9}, {"rescale": False}])
def test_della_matches_the_reference(shared, seed, cache):
    densities, epsilons = [0.4, 0.5, 0.7], [0.2, 0.1, 0.25]
    per_source = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(WEIGHTS, densities, epsilons)]
    got = _operator("della", shared, per_source, seed, cache)
    expected = _della_reference(
        densities, epsilons, WEIGHTS, shared.get("lambda", 1.0), seed, shared.get("rescale", True),
        shared.get("normalize", True),
    )
    _check(got, expected, _task_vectors()[0])


@pytest.mark.parametrize("cache", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("shared", [{}, {"normalize": True, "lambda": 0.8}, {"rescale": True}])
def test_breadcrumbs_ties_matches_the_reference(shared, cache):
    densities, gammas = [0.5, 0.35, 0.6], [0.1, 0.15, 0.05]  # 2, 3 and 1 outliers dropped of 20
    per_source = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(WEIGHTS, densities, gammas)]
    got = _operator("breadcrumbs_ties", shared, per_source, 0, cache)
    expected = _breadcrumbs_reference(
        densities, gammas, WEIGHTS, shared.get("lambda", 1.0), shared.get("rescale", False), shared.get("normalize", False)
    )
    _check(got, expected, _task_vectors()[0])


def test_the_reference_draws_are_the_operators():
    """The masks the references use are the operator's: DARE at density d keeps exactly the entries
    whose uniform is below d, scaled by 1/d (a single source, weight 1, so no election mixes in)."""
    base, sources = _models()
    spec = get_operator("dare_linear")
    inputs = TensorInputs(name=TENSOR, base=base, sources=sources[:1], source_names=NAMES[:1], seed=3)
    got = spec.fn(inputs, spec.resolve({}, [{"density": 0.5}], "test"), None).flatten().tolist()
    u = torch.rand(N, generator=inputs.generator(0)).tolist()
    flat_base, (tau, *_) = _task_vectors()
    assert [g != b for g, b in zip(got, flat_base)] == [x < 0.5 and t != 0 for x, t in zip(u, tau)]
    assert 5 <= sum(x < 0.5 for x in u) <= 15
