"""Merge operators: invariants with exact expected values, mergekit parity, cache/out paths, errors."""

from __future__ import annotations

import math

import pytest
import torch

import evomerge.merge  # noqa: F401  (registers the operators)
from evomerge.errors import ConfigError
from evomerge.merge import OPERATORS, TensorInputs, get_operator
from evomerge.merge.layerwise import outer_fraction

NAMES = ["a", "b", "c"]
BUILT_IN = [
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "lines", "linear", "slerp", "model_stock", "passthrough", "layer_swap",
]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randn(*shape, generator=g)


def run(
    method: str,
    base: torch.Tensor | None,
    sources: list[torch.Tensor],
    shared: dict | None = None,
    per_source: list[dict] | dict | None = None,
    *,
    names: list[str] | None = None,
    cache: dict | None = None,
    out: torch.Tensor | None = None,
    tensor: str = "model.layers.0.mlp.up_proj.weight",
    layer: int | None = None,
    num_layers: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    spec = get_operator(method)
    if per_source is None or isinstance(per_source, dict):
        per_source = [dict(per_source or {}) for _ in sources]
    params = spec.resolve(shared or {}, per_source, "test")
    inputs = TensorInputs(
        name=tensor,
        base=base,
        sources=sources,
        source_names=names or NAMES[: len(sources)],
        layer=layer,
        num_layers=num_layers,
        seed=seed,
        cache=cache,
    )
    return spec.fn(inputs, params, out)


@pytest.fixture
def models() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = _randn(48, 40, seed=0)
    shared = _randn(1, 40, seed=9)  # a common direction, so task vectors correlate
    return base, [base + 0.1 * _randn(48, 40, seed=i + 1) + 0.05 * shared for i in range(3)]


class TestIdenticalInputs:
    @pytest.mark.parametrize(
        "method,shared,per_source",
        [
            ("linear", {}, {"weight": 0.7}),
            ("ties", {}, {"density": 1.0}),
            ("della", {}, {"density": 1.0}),
            ("model_stock", {}, {}),
        ],
    )
    def test_normalising_operators_return_the_model(self, models, method, shared, per_source):
        base, (theta, *_) = models
        out = run(method, base, [theta.clone() for _ in range(3)], shared, per_source)
        assert torch.allclose(out, theta, atol=1e-6, rtol=0)

    def test_slerp_of_identical_inputs(self, models):
        base, _ = models
        assert torch.allclose(run("slerp", base, [base.clone()], {"t": 0.37}), base, atol=1e-6, rtol=0)

    def test_ties_trimmed_identical_models_give_model_where_kept_base_elsewhere(self, models):
        base, (theta, *_) = models
        out = run("ties", base, [theta.clone() for _ in range(3)], {}, {"density": 0.3})
        tau = theta - base
        kept = tau.abs() >= tau.abs().flatten().kthvalue(tau.numel() - int(0.3 * tau.numel()) + 1).values
        assert int(kept.sum()) == int(0.3 * tau.numel())
        assert torch.allclose(out[kept], theta[kept], atol=1e-6, rtol=0)
        assert torch.equal(out[~kept], base[~kept])


class TestTaskArithmetic:
    @pytest.mark.parametrize(
        "method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "lines"]
    )
    def test_lambda_zero_gives_base_exactly(self, models, method):
        base, sources = models
        per = {"density": 0.5} if "density" in get_operator(method).per_source else {}
        assert torch.equal(run(method, base, sources, {"lambda": 0.0}, per), base)

    def test_one_model_lambda_one_gives_the_model(self, models):
        base, (theta, *_) = models
        assert torch.allclose(run("task_arithmetic", base, [theta]), theta, atol=1e-6, rtol=0)

    def test_weighted_sum_and_mean(self, models):
        base, sources = models
        taus = [s - base for s in sources]
        w = [0.5, 1.5, -0.25]
        expected = base + 0.8 * sum(wi * t for wi, t in zip(w, taus))
        got = run("task_arithmetic", base, sources, {"lambda": 0.8}, [{"weight": x} for x in w])
        assert torch.allclose(got, expected, atol=1e-6)
        got = run("task_arithmetic", base, sources, {"normalize": True}, [{"weight": x} for x in w])
        assert torch.allclose(got, base + sum(wi * t for wi, t in zip(w, taus)) / sum(w), atol=1e-6)

    def test_zero_weight_source_is_ignored(self, models):
        base, sources = models
        got = run("ties", base, sources, {}, [{"weight": 1.0}, {"weight": 0.0}, {"weight": 1.0}])
        assert torch.equal(got, run("ties", base, [sources[0], sources[2]], {}, [{}, {}], names=["a", "c"]))


class TestTies:
    base = torch.zeros(5)
    taus = [
        torch.tensor([1.0, -2.0, 3.0, 0.5, 0.5]),
        torch.tensor([-0.25, -1.0, 1.0, -1.0, -0.5]),
        torch.tensor([0.5, 4.0, -2.0, 0.25, 0.0]),
    ]

    def test_entries_against_the_elected_sign_never_contribute(self):
        # sums 1.25, 1, 2, -0.25, 0 -> elected +, +, +, -, + (0 counts as +)
        expected_sum = torch.tensor([1.5, 4.0, 4.0, -1.0, 0.5])
        expected_mean = torch.tensor([0.75, 4.0, 2.0, -1.0, 0.5])
        assert torch.equal(run("ties", self.base, self.taus, {"normalize": False}, {"density": 1.0}), expected_sum)
        assert torch.equal(run("ties", self.base, self.taus, {}, {"density": 1.0}), expected_mean)

    def test_weighted_election_and_divisor(self):
        w = [{"weight": 2.0}, {"weight": 1.0}, {"weight": 0.5}]
        # weighted: [2,-4,6,1,1], [-.25,-1,1,-1,-.5], [.25,2,-1,.125,0]; sums 2, -3, 6, .125, .5
        expected = torch.tensor([2.25 / 2.5, -5.0 / 3.0, 7.0 / 3.0, 1.125 / 2.5, 1.0 / 2.0])
        assert torch.allclose(run("ties", self.base, self.taus, {}, [{**x, "density": 1.0} for x in w]), expected)

    def test_negative_weight_flips_a_models_vote(self):
        per = [{"weight": 1.0, "density": 1.0}, {"weight": -1.0, "density": 1.0}]
        a, b = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -3.0])
        # weighted deltas [1, 1] and [-1, 3]: sums 0 (+) and 4 (+); Σ agreeing weights 1 and 0 -> 1
        got = run("ties", torch.zeros(2), [a, b], {}, per, names=["a", "b"])
        assert torch.equal(got, torch.tensor([1.0, 4.0]))

    def test_density_one_with_agreeing_signs_equals_task_arithmetic(self, models):
        base, sources = models
        agreeing = [base + (s - base).abs() for s in sources]
        per = [{"weight": w, "density": 1.0} for w in (0.5, 1.0, 2.0)]
        ta = [{"weight": w} for w in (0.5, 1.0, 2.0)]
        for normalize in (True, False):
            got = run("ties", base, agreeing, {"normalize": normalize}, per)
            expected = run("task_arithmetic", base, agreeing, {"normalize": normalize}, ta)
            assert torch.allclose(got, expected, atol=1e-6)

    def test_trim_is_per_tensor_with_exact_count(self, models):
        base, sources = models
        got = run("ties", base, sources[:1], {}, {"density": 0.25}, names=["a"])
        assert int((got != base).sum()) == int(0.25 * base.numel())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_consensus_combine_matches_elect_and_agree(normalize, seed):
    from evomerge.merge.consensus import combine

    def elect_sign(deltas):  # the textbook definitions, as the reference
        return torch.where(torch.stack(deltas).sum(dim=0) >= 0, 1.0, -1.0)

    def agreement(delta, sign):
        return delta * sign > 0

    g = torch.Generator()
    g.manual_seed(seed)
    n, k = 4096, 3
    # small dyadic values with many zeros and exact cancellations keep every sum exact
    values = [torch.randint(-3, 4, (n,), generator=g).float() / 4 for _ in range(k)]
    masks = [None, torch.randint(0, 2, (n,), generator=g).float(), torch.randint(0, 2, (n,), generator=g).float()]
    coefs = [1.0, -0.5, 2.0]
    weights = [1.0, -0.25, 0.5]
    base = torch.randint(-8, 8, (n,), generator=g).float()
    deltas = [c * v * (m if m is not None else 1.0) for v, m, c in zip(values, masks, coefs)]
    sign = elect_sign(deltas)
    agree = [agreement(d, sign).float() for d in deltas]
    mixed = sum(d * a for d, a in zip(deltas, agree))
    if normalize:
        divisor = sum(w * a for w, a in zip(weights, agree))
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    expected = base + 0.75 * mixed
    scalars = torch.tensor(coefs + weights + [0.75])
    got = combine(base, values, masks, scalars, True, normalize, out=torch.empty(n))
    if normalize:  # the quotient rounds differently from the reference's
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, expected)
    assert torch.equal(got, combine(base, values, masks, scalars, True, normalize))


class TestDare:
    def test_density_one_is_task_arithmetic(self, models):
        base, sources = models
        assert torch.equal(
            run("dare_linear", base, sources, {}, {"density": 1.0}), run("task_arithmetic", base, sources)
        )

    def test_kept_entries_are_tau_over_density(self, models):
        base, (theta, *_) = models
        d = 0.3
        delta = run("dare_linear", base, [theta], {}, {"density": d}, names=["a"]) - base
        kept = delta != 0
        assert torch.allclose(delta[kept], (theta - base)[kept] / d, atol=1e-5)
        n = base.numel()
        assert abs(int(kept.sum()) - n * d) < 5 * math.sqrt(n * d * (1 - d))

    def test_mean_over_seeds_is_task_arithmetic(self):
        base = torch.zeros(32)
        tau = _randn(32, seed=5)
        seeds, d = 1500, 0.5
        mean = sum(run("dare_linear", base, [tau], {}, {"density": d}, names=["a"], seed=s) for s in range(seeds)) / seeds
        sigma = tau.abs() * math.sqrt((1 - d) / d) / math.sqrt(seeds)
        assert bool(((mean - tau).abs() <= 5 * sigma + 1e-6).all())

    def test_same_seed_same_result_in_any_tensor_order(self, models):
        base, sources = models
        names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
        first = {n: run("dare_ties", base, sources, {}, {"density": 0.4}, tensor=n, seed=3) for n in names}
        second = {n: run("dare_ties", base, sources, {}, {"density": 0.4}, tensor=n, seed=3) for n in reversed(names)}
        assert all(torch.equal(first[n], second[n]) for n in names)
        assert not torch.equal(first[names[0]], first[names[1]])
        other_seed = run("dare_ties", base, sources, {}, {"density": 0.4}, tensor=names[0], seed=4)
        assert not torch.equal(first[names[0]], other_seed)


class TestModelStock:
    def test_orthogonal_task_vectors_give_base(self):
        base = _randn(4, 4, seed=1)
        e1, e2 = torch.zeros(4, 4), torch.zeros(4, 4)
        e1[0, 0], e2[1, 1] = 0.3, -0.7
        assert torch.equal(run("model_stock", base, [base + e1, base + e2]), base)

    def test_known_factor(self):
        base = torch.zeros(2)
        a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
        c = 1 / math.sqrt(2)
        t = 2 * c / (1 + c)
        assert torch.allclose(run("model_stock", base, [a, b]), t * (a + b) / 2)

    def test_clamp_keeps_anticorrelated_models_at_base(self):
        base = torch.zeros(2)
        a, b = torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 0.1])
        assert torch.equal(run("model_stock", base, [a, b], {"clamp": True}), base)
        c = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        t = 2 * c / (1 + c)
        assert t < -1  # mergekit's default extrapolates
        assert torch.allclose(run("model_stock", base, [a, b]), t * (a + b) / 2)

    def test_fewer_than_two_models_is_an_error(self, models):
        base, sources = models
        with pytest.raises(ConfigError, match="at least 2"):
            run("model_stock", base, sources[:1], names=["a"])
        with pytest.raises(ConfigError, match="at least 2"):
            get_operator("model_stock").check_arity(1, True, "recipe")


class TestLinear:
    def test_weights_one_zero_give_first_model_exactly(self, models):
        _, (a, b, _) = models
        assert torch.equal(run("linear", None, [a, b], {}, [{"weight": 1.0}, {"weight": 0.0}], names=["a", "b"]), a)

    def test_normalised_weights_are_scale_invariant(self, models):
        _, sources = models
        w = [0.2, 0.5, 0.3]
        one = run("linear", None, sources, {}, [{"weight": x} for x in w])
        three = run("linear", None, sources, {}, [{"weight": 3 * x} for x in w])
        assert torch.allclose(one, three, atol=1e-6)
        assert torch.allclose(one, sum(x * s for x, s in zip(w, sources)), atol=1e-6)

    def test_weights_summing_to_zero_are_an_error_naming_the_tensor(self, models):
        _, (a, b, _) = models
        with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj.weight.*sum to 0"):
            run("linear", None, [a, b], {}, [{"weight": 0.5}, {"weight": -0.5}], names=["a", "b"])
        got = run("linear", None, [a, b], {"normalize": False}, [{"weight": 0.5}, {"weight": -0.5}], names=["a", "b"])
        assert torch.allclose(got, 0.5 * (a - b))


class TestSlerp:
    def test_endpoints_are_exact(self, models):
        base, (theta, *_) = models
        assert torch.equal(run("slerp", base, [theta], {"t": 0.0}, names=["a"]), base)
        assert torch.equal(run("slerp", base, [theta], {"t": 1.0}, names=["a"]), theta)

    def test_swapping_models_mirrors_t(self, models):
        base, (theta, *_) = models
        forward = run("slerp", base, [theta], {"t": 0.3}, names=["a"])
        backward = run("slerp", theta, [base], {"t": 0.7}, names=["a"])
        assert torch.allclose(forward, backward, atol=1e-6)

    def test_collinear_inputs_interpolate_linearly(self):
        a = _randn(10, seed=2)
        assert torch.allclose(run("slerp", a, [2.5 * a], {"t": 0.4}, names=["x"]), 0.6 * a + 0.4 * 2.5 * a)

    def test_equal_norms_are_preserved_on_the_great_circle(self):
        a = torch.tensor([1.0, 0.0, 0.0])
        b = torch.tensor([0.0, 1.0, 0.0])
        got = run("slerp", a, [b], {"t": 1 / 3}, names=["x"])
        expected = torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0])
        assert torch.allclose(got, expected, atol=1e-6)
        assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)

    def test_t_is_required(self, models):
        with pytest.raises(ConfigError, match="parameters.t: required"):
            get_operator("slerp").resolve({}, [{}], "recipe")


class TestLayerwise:
    def test_lines_identity_scaling_is_task_arithmetic(self, models):
        base, sources = models
        got = run("lines", base, sources, {"alpha": 1.0, "beta": 0.0}, layer=3, num_layers=6)
        assert torch.equal(got, run("task_arithmetic", base, sources))

    def test_lines_scale_grows_with_depth_and_is_alpha_outside_blocks(self, models):
        base, sources = models
        params = {"alpha": 0.2, "beta": 0.6, "lambda": 0.5}
        for layer, scale in ((None, 0.2), (0, 0.2), (2, 0.2 + 0.6 * 2 / 4), (4, 0.8)):
            got = run("lines", base, sources, params, layer=layer, num_layers=5)
            expected = run("task_arithmetic", base, sources, {"lambda": 0.5 * scale})
            assert torch.allclose(got, expected, atol=1e-6)

    def test_layer_swap_assignment(self):
        # 6 blocks, bottom 1, top 2, width 1: ω = 1, 0.5, 0, 0.5, 1, 1
        assert [outer_fraction(l, 6, 1, 2, 1) for l in range(6)] == [1.0, 0.5, 0.0, 0.5, 1.0, 1.0]
        assert [outer_fraction(l, 6, 0, 0, 2) for l in range(6)] == [0.0] * 6
        assert [outer_fraction(l, 5, 2, 0, 2) for l in range(5)] == pytest.approx([1, 1, 2 / 3, 1 / 3, 0])
        # overlapping transitions: the larger share wins
        assert [outer_fraction(l, 4, 1, 1, 3) for l in range(4)] == pytest.approx([1, 0.75, 0.75, 1])

    def test_layer_swap_tensors(self):
        outer, inner, base = torch.full((3,), 2.0), torch.full((3,), 10.0), torch.zeros(3)
        shared = {"outer": "a", "inner": "b", "bottom": 1, "top": 2, "width": 1}
        got = [run("layer_swap", base, [outer, inner], shared, layer=l, num_layers=6, names=["a", "b"]) for l in range(6)]
        assert [float(g[0]) for g in got] == [2.0, 6.0, 10.0, 6.0, 2.0, 2.0]
        swap0 = {"outer": "a", "inner": "b"}
        assert torch.equal(run("layer_swap", base, [outer, inner], swap0, layer=2, num_layers=6, names=["a", "b"]), inner)
        assert torch.equal(run("layer_swap", base, [outer, inner], swap0, layer=None, names=["a", "b"]), outer)
        rest = {**swap0, "rest": "base"}
        assert torch.equal(run("layer_swap", base, [outer, inner], rest, layer=None, names=["a", "b"]), base)

    def test_passthrough_with_scale(self, models):
        base, (a, b, _) = models
        assert torch.equal(run("passthrough", base, [a, b], {"source": "b", "scale": 0.5}, names=["a", "b"]), b * 0.5)
        assert torch.equal(run("passthrough", base, [a, b], {"source": "base"}, names=["a", "b"]), base)

    def test_unknown_source_name(self, models):
        base, (a, b, _) = models
        with pytest.raises(ConfigError, match="unknown model 'z'; expected one of: a, b, base"):
            run("passthrough", base, [a, b], {"source": "z"}, names=["a", "b"])


CACHED_CASES = [
    ("ties", {}, {"density": 0.3}),
    ("ties", {"rescale": True}, {"density": 0.6}),
    ("breadcrumbs_ties", {}, {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs", {}, {"density": 0.5, "gamma": 0.1}),
    ("dare_ties", {}, {"density": 0.4}),
    ("dare_linear", {}, {"density": 0.7}),
    ("della", {}, {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {}, {"density": 0.3, "epsilon": 0.1}),
]


class TestPaths:
    @pytest.fixture
    def tied(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Task vectors with few distinct magnitudes (like bf16 deltas), larger than one chunk."""
        base = _randn(300, 500, seed=3)
        deltas = [torch.round(_randn(300, 500, seed=10 + i) * 4) / 64 for i in range(3)]
        return base, [base + d for d in deltas]

    @pytest.mark.parametrize("method,shared,per_source", CACHED_CASES)
    def test_cached_path_is_bitwise_identical_to_uncached(self, tied, method, shared, per_source):
        base, sources = tied
        uncached = run(method, base, sources, shared, per_source, seed=5)
        cache: dict = {}
        first = run(method, base, sources, shared, per_source, cache=cache, seed=5)
        again = run(method, base, sources, shared, per_source, cache=cache, seed=5)
        assert cache
        assert torch.equal(uncached, first)
        assert torch.equal(uncached, again)

    @pytest.mark.parametrize("method,shared,per_source", CACHED_CASES[:6])
    def test_results_do_not_depend_on_the_thread_count(self, tied, method, shared, per_source):
        base, sources = tied
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            sequential = run(method, base, sources, shared, per_source, seed=5)
            torch.set_num_threads(3)
            threaded = run(method, base, sources, shared, per_source, seed=5)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(sequential, threaded)

    def test_cache_keeps_task_vectors_and_order_statistics_across_densities(self, tied):
        base, sources = tied
        cache: dict = {}
        for density in (0.2, 0.6):
            got = run("ties", base, sources, {}, {"density": density}, cache=cache)
            assert torch.equal(got, run("ties", base, sources, {}, {"density": density}))
        assert {"tv0", "sorted_abs0"} <= set(cache)

    def test_ties_trim_keeps_exact_count_with_ties(self, tied):
        base, (theta, *_) = tied
        got = run("ties", base, [theta], {}, {"density": 0.37}, names=["a"], cache={})
        tau = theta - base
        assert int((got != base).sum()) == int(0.37 * tau.numel())

    @pytest.mark.parametrize("method", BUILT_IN)
    def test_out_buffer_path_equals_allocating_path(self, models, method):
        base, sources = models
        spec = get_operator(method)
        shared = {"t": 0.4} if method == "slerp" else {}
        if method in ("passthrough",):
            shared = {"source": "b", "scale": 2.0}
        if method == "layer_swap":
            shared = {"outer": "a", "inner": "b", "bottom": 1, "width": 1}
        srcs = sources[:1] if method == "slerp" else sources
        per = {"density": 0.5} if "density" in spec.per_source else {}
        allocated = run(method, base, srcs, shared, per, layer=1, num_layers=4, seed=2)
        buffer = torch.full_like(base, float("nan"))
        written = run(method, base, srcs, shared, per, out=buffer, layer=1, num_layers=4, seed=2)
        assert written is buffer
        assert torch.equal(written, allocated)


class TestMergekitParity:
    @pytest.fixture
    def group(self, models):
        pytest.importorskip("mergekit")
        from mergekit.merge_methods.base import TensorGroup

        base, sources = models
        return TensorGroup.from_tensors([base, *sources], base_index=0)

    @pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
    @pytest.mark.parametrize("rescale", [False, True])
    def test_task_vector_family(self, models, group, method, rescale):
        from mergekit.merge_methods import registry

        base, sources = models
        weights, densities = [0.7, -0.4, 1.1], [0.5, 0.3, 0.8]
        mk = registry.get(method)
        normalize = next(p.default for p in mk.spec.parameters if p.name == "normalize")
        kwargs = {
            "weight": dict(enumerate(weights, 1)),
            "density": dict(enumerate(densities, 1)),
            "normalize": normalize,
            "rescale": rescale,
            "int8_mask": False,
            "lambda": 0.9,
        }
        spec = get_operator(method)
        per = [{"weight": w} for w in weights]
        shared = {"lambda": 0.9}
        if "density" in spec.per_source:
            per = [{**p, "density": d} for p, d in zip(per, densities)]
            shared["rescale"] = rescale
        if "gamma" in spec.per_source:
            kwargs["gamma"] = {i: 0.02 for i in (1, 2, 3)}
            per = [{**p, "gamma": 0.02} for p in per]
        expected = mk.merge_group(group, **kwargs)
        assert torch.allclose(run(method, base, sources, shared, per), expected, atol=1e-6, rtol=0)

    def test_slerp(self, models):
        from mergekit.merge_methods.slerp import slerp

        base, (theta, *_) = models
        for t in (0.0, 0.3, 0.8, 1.0):
            expected = slerp(torch.tensor([t]), base.unsqueeze(0), theta.unsqueeze(0))[0]
            assert torch.allclose(run("slerp", base, [theta], {"t": t}, names=["a"]), expected, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("filter_wise", [False, True])
    def test_model_stock(self, models, group, filter_wise):
        from mergekit.merge_methods import registry

        base, sources = models
        expected = registry.get("model_stock").merge_group(group, filter_wise=filter_wise)
        got = run("model_stock", base, sources, {"filter_wise": filter_wise})
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(got, base)


class TestErrors:
    def test_unknown_parameter_suggests_the_right_one(self):
        with pytest.raises(ConfigError, match="lamda: unknown parameter for 'ties' \\(did you mean 'lambda'\\?\\)"):
            get_operator("ties").resolve({"lamda": 0.5}, [], "recipe")

    def test_out_of_range_density(self):
        with pytest.raises(ConfigError, match=r"model_parameters\[0\]\.density: expected a value <= 1.0, got 1.5"):
            get_operator("dare_ties").resolve({}, [{"density": 1.5}], "recipe")

    def test_unknown_method(self):
        with pytest.raises(ConfigError, match="unknown merge method 'tie' \\(did you mean 'ties'\\?\\)"):
            get_operator("tie")

    def test_bad_epsilon_names_tensor_and_model(self, models):
        base, sources = models
        with pytest.raises(ConfigError, match="up_proj.weight: model 'a': epsilon 0.3 with density 0.2"):
            run("della", base, sources, {}, {"density": 0.2, "epsilon": 0.3})

    def test_missing_required_source(self):
        with pytest.raises(ConfigError, match="parameters.outer: required"):
            get_operator("layer_swap").resolve({"inner": "a"}, [{}], "recipe")

    def test_task_vector_methods_need_a_base(self, models):
        _, sources = models
        with pytest.raises(ConfigError, match="needs a base model"):
            run("ties", None, sources, {}, {"density": 0.5})


def test_every_built_in_operator_is_registered():
    assert set(BUILT_IN) <= set(OPERATORS)


def test_mergekit_defaults_per_method():
    def default(method: str, key: str):
        return get_operator(method).shared[key].default

    assert [default(m, "normalize") for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear")] == [
        False,
        True,
        False,
        False,
    ]
    assert [default(m, "normalize") for m in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")] == [
        False,
        False,
        True,
        False,
    ]
    assert default("linear", "normalize") is True
    assert [default(m, "rescale") for m in ("ties", "dare_ties", "della", "breadcrumbs")] == [False, True, True, False]
    assert get_operator("breadcrumbs").per_source["gamma"].default == 0.01
    assert get_operator("della").per_source["epsilon"].default == 0.15
