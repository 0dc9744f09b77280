"""Sparsification: exact kept counts, tie handling, DARE/DELLA statistics, cached order statistics."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.sparsify import (
    bernoulli,
    breadcrumbs,
    della,
    keep_count,
    keep_mask,
    magnitude,
    random_keys,
    sort_magnitudes,
    window_from_sorted,
    window_from_values,
)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(128, 64, generator=_gen(0))


class TestMagnitude:
    @pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 0.999])
    def test_keeps_exactly_int_density_n_largest(self, x, density):
        out = magnitude(x, density)
        k = int(density * x.numel())
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], x[kept])
        assert x[kept].abs().min() >= x[~kept].abs().max()

    def test_density_one_is_identity_and_zero_keeps_nothing(self, x):
        assert torch.equal(magnitude(x, 1.0), x)
        assert int((magnitude(x, 0.0) != 0).sum()) == 0

    def test_tiny_positive_density_keeps_one_like_mergekit(self):
        t = torch.tensor([0.5, -3.0, 1.0])
        assert torch.equal(magnitude(t, 0.1), torch.tensor([0.0, -3.0, 0.0]))

    def test_ties_keep_exact_count_dropping_earliest_equal_entries(self):
        t = torch.tensor([1.0, -2.0, 2.0, 3.0, -2.0, 2.0, 0.5, 2.0])
        # 3 largest: 3.0 plus two of the four |2.0|; stable ranks put later indices higher.
        assert torch.equal(magnitude(t, 3 / 8), torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 2.0]))

    def test_matches_mergekit_without_ties(self, x):
        mk = pytest.importorskip("mergekit.sparsify")
        for density in (0.2, 0.7):
            assert torch.equal(magnitude(x, density), mk.magnitude(x, density))

    def test_l1_rescale_matches_norm(self, x):
        out = magnitude(x, 0.3, rescale=True)
        assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)

    def test_out_of_range_density(self, x):
        with pytest.raises(ConfigError, match="density"):
            magnitude(x, 1.5)


class TestBreadcrumbs:
    @pytest.mark.parametrize("gamma", [0.0, 0.01, 0.1, 0.3])
    @pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
    def test_nnz_is_int_density_n(self, x, gamma, density):
        assert int((breadcrumbs(x, density, gamma) != 0).sum()) == int(density * x.numel())

    def test_removes_the_largest_gamma_n(self, x):
        n, gamma, density = x.numel(), 0.05, 0.5
        out = breadcrumbs(x, density, gamma)
        order = x.abs().flatten().argsort(descending=True)
        n_top = int(gamma * n)
        assert int((out.flatten()[order[:n_top]] != 0).sum()) == 0
        kept = order[n_top : n_top + int(density * n)]
        assert torch.equal(out.flatten()[kept], x.flatten()[kept])

    def test_tiny_tensor_with_gamma_n_below_one_is_not_zeroed(self):
        t = torch.tensor([0.1, -0.5, 0.3, 2.0, -1.0, 0.2, 0.05, 0.7, -0.4, 0.6])
        out = breadcrumbs(t, 0.5, 0.01)
        assert torch.equal(out, torch.tensor([0.0, -0.5, 0.0, 2.0, -1.0, 0.0, 0.0, 0.7, 0.0, 0.6]))

    def test_outlier_cut_shrinks_when_both_do_not_fit(self):
        t = torch.arange(1.0, 11.0)
        # density 0.8 + gamma 0.5 > 1: keep the 8 smallest, i.e. drop only the 2 largest.
        assert torch.equal(breadcrumbs(t, 0.8, 0.5), torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 0, 0]))

    def test_matches_mergekit(self, x):
        mk = pytest.importorskip("mergekit.sparsify")
        assert torch.equal(breadcrumbs(x, 0.4, 0.02), mk.magnitude_outliers(x, 0.4, gamma=0.02))


class TestBernoulli:
    def test_density_one_is_identity(self, x):
        assert torch.equal(bernoulli(x, 1.0, _gen(1)), x)

    def test_kept_entries_are_rescaled_by_exactly_one_over_density(self, x):
        d = 0.3
        out = bernoulli(x, d, _gen(1))
        kept = out != 0
        assert torch.equal(out[kept], x[kept] * (1 / d))
        plain = bernoulli(x, d, _gen(1), rescale=False)
        assert torch.equal(plain[kept], x[kept])
        assert torch.equal(plain != 0, kept)

    def test_kept_fraction_within_binomial_ci(self):
        n, d = 200_000, 0.3
        kept = int((bernoulli(torch.ones(n), d, _gen(2)) != 0).sum())
        assert abs(kept - n * d) < 5 * math.sqrt(n * d * (1 - d))

    def test_unbiased_over_seeds(self):
        t = torch.randn(64, generator=_gen(3))
        seeds, d = 2000, 0.4
        mean = sum(bernoulli(t, d, _gen(s)) for s in range(seeds)) / seeds
        sigma = t.abs() * math.sqrt((1 - d) / d) / math.sqrt(seeds)
        assert bool(((mean - t).abs() <= 5 * sigma + 1e-6).all())

    def test_same_generator_seed_same_mask_other_seed_differs(self, x):
        assert torch.equal(bernoulli(x, 0.5, _gen(7)), bernoulli(x, 0.5, _gen(7)))
        assert not torch.equal(bernoulli(x, 0.5, _gen(7)) != 0, bernoulli(x, 0.5, _gen(8)) != 0)


class TestKeys:
    @pytest.mark.parametrize("p", [0.0, 1e-7, 0.3, 0.5, 0.999999, 1.0])
    def test_keep_mask_is_exactly_u_below_p(self, p):
        n = 100_000  # several chunks: the key stream is torch.rand's, in order
        u = torch.rand(n, generator=_gen(5))
        keys = random_keys(_gen(5), n, torch.device("cpu"))
        mask = keep_mask(keys, p, torch.empty(n))
        assert torch.equal(mask, (u < p).float())

    def test_per_entry_probabilities(self):
        n = 10_000
        u = torch.rand(n, generator=_gen(6))
        p = torch.rand(n, generator=_gen(9))
        mask = keep_mask(random_keys(_gen(6), n, torch.device("cpu")), p, torch.empty(n))
        assert torch.equal(mask, (u < p).float())


class TestDella:
    @pytest.mark.parametrize("density,epsilon", [(0.2, 0.2), (0.2, 0.3), (0.9, 0.15)])
    def test_invalid_epsilon(self, x, density, epsilon):
        with pytest.raises(ConfigError, match="epsilon"):
            della(x, density, epsilon, _gen(0))

    def test_larger_magnitudes_are_kept_more_often(self):
        t = torch.randn(100_000, generator=_gen(4))
        out = della(t, 0.5, 0.4, _gen(1))
        big = t.abs() > t.abs().median()
        kept = out != 0
        # keep probability runs from 0.1 to 0.9 with the rank: halves average 0.3 and 0.7
        assert float(kept[big].float().mean()) == pytest.approx(0.7, abs=0.01)
        assert float(kept[~big].float().mean()) == pytest.approx(0.3, abs=0.01)

    def test_rescale_divides_by_each_entrys_probability(self):
        t = torch.tensor([0.1, -4.0, 2.0, 0.5, -1.0])
        d, eps = 0.5, 0.25
        for seed in range(20):
            out = della(t, d, eps, _gen(seed))
            # p = d - eps + 2·eps·r/4 for ascending ranks r = [0, 4, 3, 1, 2]
            probs = torch.tensor([0.25, 0.75, 0.625, 0.375, 0.5])
            kept = out != 0
            assert torch.allclose(out[kept], t[kept] / probs[kept])

    def test_unbiased_over_seeds(self):
        t = torch.randn(32, generator=_gen(8))
        seeds = 3000
        mean = sum(della(t, 0.5, 0.3, _gen(s)) for s in range(seeds)) / seeds
        # worst-case keep probability 0.2 bounds the per-entry standard deviation
        sigma = t.abs() * math.sqrt(0.8 / 0.2) / math.sqrt(seeds)
        assert bool(((mean - t).abs() <= 5 * sigma + 1e-6).all())

    def test_no_nan(self, x):
        assert bool(torch.isfinite(della(x, 0.3, 0.1, _gen(2))).all())


@pytest.mark.parametrize("case", range(200))
def test_cached_and_uncached_windows_are_identical(case):
    g = _gen(case)
    n = int(torch.randint(1, 60, (1,), generator=g))
    # few distinct magnitudes, so boundary runs of equal values are the rule
    t = torch.randint(-4, 5, (n,), generator=g).float() * 0.5
    lo = int(torch.randint(0, n + 1, (1,), generator=g))
    hi = int(torch.randint(lo, n + 1, (1,), generator=g))
    sorted_abs, order = sort_magnitudes(t)
    a = window_from_sorted(sorted_abs, order, lo, hi)
    b = window_from_values(t.abs(), lo, hi)
    assert (a.low_value, a.high_value) == (b.low_value, b.high_value)
    assert (a.drop is None) == (b.drop is None)
    if a.drop is not None:
        assert torch.equal(a.drop, b.drop)
    # and the window keeps exactly the ranks [lo, hi) of the stable order
    ranks = torch.empty(n, dtype=torch.long)
    ranks[order.long()] = torch.arange(n)
    expected = (ranks >= lo) & (ranks < hi) & (t != 0)
    kept = torch.zeros(n, dtype=torch.bool)
    if a.keeps_all:
        kept = t != 0
    elif not a.keeps_none:
        kept = (t.abs() >= a.low_value) & (t.abs() <= a.high_value) & (t != 0)
        if a.drop is not None:
            kept[a.drop] = False
    assert torch.equal(kept, expected)


def test_keep_count_follows_mergekit():
    assert keep_count(100, 0.5) == 50
    assert keep_count(100, 0.001) == 1
    assert keep_count(100, 0.0) == 0
    assert keep_count(100, 1.0) == 100
