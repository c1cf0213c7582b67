"""Tests for rlhf_jax.stats: Student-t intervals over seeds, best-of-n (analytic KL, the
order-statistics estimator) and the Gao et al. 2022 over-optimisation fits."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from rlhf_jax import stats


# ------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------
def test_mean_ci_hand():
    out = stats.mean_ci([1, 2, 3, 4])
    # mean 2.5, sample variance (2.25 + .25 + .25 + 2.25)/3 = 5/3, t_{0.975, 3} = 3.182446
    std = math.sqrt(5 / 3)
    half = 3.182446 * std / 2
    assert out["mean"] == pytest.approx(2.5)
    assert out["std"] == pytest.approx(std, rel=1e-12)
    assert out["half_width"] == pytest.approx(half, rel=1e-6)
    assert out["ci_low"] == pytest.approx(2.5 - half, rel=1e-6)
    assert out["ci_high"] == pytest.approx(2.5 + half, rel=1e-6)
    assert out["n"] == 4 and out["values"] == [1.0, 2.0, 3.0, 4.0]
    # the same interval from scipy, and a wider one at 99%
    low, high = sps.t.interval(0.95, 3, loc=2.5, scale=sps.sem([1, 2, 3, 4]))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert stats.mean_ci([1, 2, 3, 4], 0.99)["half_width"] > 1.5 * half
    # two values: t_{0.975, 1} = 12.7062
    two = stats.mean_ci(np.array([0.5, 1.5]))
    assert two["half_width"] == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), rel=1e-5)


def test_mean_ci_single_value_and_errors():
    one = stats.mean_ci([0.7])
    assert one["mean"] == 0.7 and one["n"] == 1
    for k in ("std", "half_width", "ci_low", "ci_high"):
        assert math.isnan(one[k])
    with pytest.raises(ValueError, match="empty"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([1, 2], confidence=95)


def test_mean_ci_coverage():
    # the t interval of n = 4 normal draws covers the true mean 95% of the time (a z interval,
    # with 1.96 instead of 3.18, would cover only ≈ 82%)
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 2.0, size=(4000, 4))
    cover = [(r["ci_low"] <= 3.0 <= r["ci_high"]) for r in map(stats.mean_ci, draws)]
    assert abs(np.mean(cover) - 0.95) < 0.015  # ±4.4 binomial standard errors


def test_summarize_seeds():
    runs = [
        {"gold": 0.8, "eval": {"kl": 3.0, "rm": {"acc": 0.7}}, "name": "a", "done": True,
         "curve": [1, 2], "steps": 100, "x": np.float32(1.5)},
        {"gold": 0.9, "eval": {"kl": 5.0, "rm": {"acc": 0.75}}, "name": "b", "done": True,
         "curve": [3], "steps": 100, "x": np.array(2.5)},
        {"gold": 0.7, "eval": {"kl": 4.0}, "name": "c", "done": False, "steps": 100, "x": 2.0},
    ]
    out = stats.summarize_seeds(runs)
    assert list(out) == ["gold", "eval/kl", "eval/rm/acc", "steps", "x"]
    assert out["gold"]["values"] == pytest.approx([0.8, 0.9, 0.7])
    assert out["gold"]["mean"] == pytest.approx(0.8)
    assert out["gold"] == stats.mean_ci([0.8, 0.9, 0.7])
    assert out["eval/kl"]["mean"] == pytest.approx(4.0) and out["eval/kl"]["n"] == 3
    assert out["eval/rm/acc"]["n"] == 2 and out["eval/rm/acc"]["mean"] == pytest.approx(0.725)
    assert out["steps"]["half_width"] == 0.0
    assert out["x"]["values"] == [1.5, 2.5, 2.0]
    assert stats.summarize_seeds(runs, 0.5)["gold"]["half_width"] < out["gold"]["half_width"]
    with pytest.raises(TypeError, match="list"):
        stats.summarize_seeds(runs[0])


# ------------------------------------------------------------------------------------------
# Best-of-n
# ------------------------------------------------------------------------------------------
def test_best_of_n_kl_hand():
    assert stats.best_of_n_kl(1) == 0.0
    assert stats.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    np.testing.assert_allclose(stats.best_of_n_kl(np.array([4, 16])),
                               [math.log(4) - 0.75, math.log(16) - 15 / 16])
    with pytest.raises(ValueError, match="n ≥ 1"):
        stats.best_of_n_kl(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_monte_carlo(n):
    # Continuous scores (here standard normal): the best of n has density n·Φ(x)^{n−1}·φ(x), so
    # KL = E_{x ~ max of n draws}[log n + (n−1)·log Φ(x)]. Estimated from simulated maxima.
    rng = np.random.default_rng(n)
    x = rng.standard_normal(size=(100_000, n)).max(axis=1)
    log_ratio = math.log(n) + (n - 1) * sps.norm.logcdf(x)
    est, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(x.size)
    assert abs(est - stats.best_of_n_kl(n)) < 4 * stderr
    assert stderr < 0.02 * stats.best_of_n_kl(n)
    # Maxima of uniforms: the density ratio is n·u^{n−1}
    u = rng.random(size=(100_000, n)).max(axis=1)
    lr_u = math.log(n) + (n - 1) * np.log(u)
    assert abs(lr_u.mean() - stats.best_of_n_kl(n)) < 4 * lr_u.std() / math.sqrt(u.size)
    # Exact KL for N equally likely distinct scores: P(best = k-th smallest) = (k/N)^n −
    # ((k−1)/N)^n; it tends to the formula from below as N grows (ties are impossible there)
    for big_n, tol in ((100, 0.05), (100_000, 1e-4)):
        k = np.arange(1, big_n + 1)
        q = (k / big_n)**n - ((k - 1) / big_n)**n
        kl = np.sum(q * np.log(q * big_n))
        assert kl <= stats.best_of_n_kl(n) + 1e-12
        assert kl == pytest.approx(stats.best_of_n_kl(n), abs=tol)


def _brute_force_best_of_n(proxy, gold, n):
    # average over every n-subset of the gold score of the proxy's pick, ties split evenly
    m = proxy.shape[0]
    vals = []
    for sub in itertools.combinations(range(m), n):
        sub = np.array(sub)
        best = sub[proxy[sub] == proxy[sub].max()]
        vals.append((proxy[best[0]], gold[best].mean()))
    vals = np.array(vals)
    return vals[:, 0].mean(), vals[:, 1].mean()


def test_best_of_n_weights():
    # m = 4, n = 2: C(i, 1)/C(4, 2) = 0, 1/6, 2/6, 3/6
    np.testing.assert_allclose(stats.best_of_n_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(stats.best_of_n_weights(5, 1), np.full(5, 0.2))
    np.testing.assert_allclose(stats.best_of_n_weights(5, 5), [0, 0, 0, 0, 1])
    for m, n in ((10, 3), (5000, 64), (5000, 4999)):
        w = stats.best_of_n_weights(m, n)
        exact = [math.comb(i, n - 1) / math.comb(m, n) for i in range(m)]
        np.testing.assert_allclose(w, exact, rtol=1e-9, atol=1e-300)
        assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1 ≤ n ≤ m"):
        stats.best_of_n_weights(3, 4)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_expectation_brute_force(ties):
    rng = np.random.default_rng(int(ties))
    p, m = 3, 8
    proxy = rng.normal(size=(p, m))
    if ties:
        proxy = np.round(proxy * 1.5)  # a few distinct values, many ties
        assert len(np.unique(proxy[0])) < m
    gold = proxy + rng.normal(size=(p, m))
    for n in range(1, m + 1):
        out = stats.best_of_n_expectation(proxy, n, gold)
        ref = np.array([_brute_force_best_of_n(proxy[i], gold[i], n) for i in range(p)])
        np.testing.assert_allclose(out["proxy_per_prompt"], ref[:, 0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out["gold_per_prompt"], ref[:, 1], rtol=1e-10, atol=1e-12)
        assert out["gold"] == pytest.approx(ref[:, 1].mean())
        assert out["kl"] == stats.best_of_n_kl(n) and out["n"] == n
    # n = 1 is the plain mean, n = M the proxy's favourite
    one = stats.best_of_n_expectation(proxy, 1, gold)
    np.testing.assert_allclose(one["gold_per_prompt"], gold.mean(1), rtol=1e-12)
    assert "gold" not in stats.best_of_n_expectation(proxy, 2)
    with pytest.raises(ValueError, match="gold_scores"):
        stats.best_of_n_expectation(proxy, 2, gold[:, :3])


def test_best_of_n_expectation_unbiased():
    # for continuous i.i.d. scores the expected proxy score of best-of-n is E[max of n draws];
    # for uniforms that is n/(n+1); the estimate from M = 32 samples per prompt matches it
    rng = np.random.default_rng(7)
    u = rng.random(size=(4000, 32))
    for n in (1, 4, 16):
        out = stats.best_of_n_expectation(u, n, gold_scores=2 * u)
        se = out["proxy_per_prompt"].std() / math.sqrt(4000)
        assert abs(out["proxy"] - n / (n + 1)) < 4 * se
        assert out["gold"] == pytest.approx(2 * out["proxy"])


# ------------------------------------------------------------------------------------------
# Gao et al. 2022 functional forms
# ------------------------------------------------------------------------------------------
def test_gao_forms_hand():
    np.testing.assert_allclose(stats.gao_bon([0.0, 1.0, 2.0], 1.0, 0.25), [0.0, 0.75, 1.0])
    np.testing.assert_allclose(stats.gao_rl([0.0, 1.0, math.e], 1.0, 0.5),
                               [0.0, 1.0, math.e * 0.5])


@pytest.mark.parametrize("alpha,beta", [(1.2, 0.3), (0.5, 0.04)])
def test_fits_recover_coefficients(alpha, beta):
    d = np.linspace(0.0, 6.0, 25)  # includes d = 0
    exact = pytest.approx((alpha, beta), rel=1e-9)
    assert stats.fit_bon(d, stats.gao_bon(d, alpha, beta)) == exact
    assert stats.fit_rl(d, stats.gao_rl(d, alpha, beta)) == exact
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.01, size=d.shape)
    a, b = stats.fit_bon(d, stats.gao_bon(d, alpha, beta) + noise)
    assert abs(a - alpha) < 0.02 and abs(b - beta) < 0.01
    a, b = stats.fit_rl(d, stats.gao_rl(d, alpha, beta) + noise)
    assert abs(a - alpha) < 0.02 and abs(b - beta) < 0.01
    # the fits are least squares: no (α, β) nearby has a smaller squared error
    r = stats.gao_rl(d, alpha, beta) + noise
    sse = lambda a, b: np.sum((stats.gao_rl(d, a, b) - r)**2)
    a, b = stats.fit_rl(d, r)
    for da, db in itertools.product((-1e-3, 0.0, 1e-3), repeat=2):
        assert sse(a + da, b + db) >= sse(a, b)


def test_fit_errors():
    with pytest.raises(ValueError, match="two points"):
        stats.fit_bon([0.0, 1.0], [0.0, 0.5])
    with pytest.raises(ValueError, match="two points"):
        stats.fit_rl([1.0, 1.0, 0.0], [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="≥ 0"):
        stats.fit_bon([-1.0, 1.0, 2.0], [0.0, 0.5, 0.6])


def test_peaks():
    assert stats.peak_bon(1.0, 0.25) == pytest.approx(2.0)
    assert stats.peak_rl(1.0, 0.5) == pytest.approx(math.e)
    assert stats.peak_bon(1.0, 0.0) == math.inf and stats.peak_rl(1.0, -0.1) == math.inf
    assert stats.peak_bon(-1.0, 0.5) == 0.0
    assert stats.peak_rl(1e6, 1e-3) == math.inf
    # the formulas agree with a grid argmax of the functional forms
    d = np.linspace(1e-6, 40.0, 400_001)
    for alpha, beta in ((1.2, 0.3), (0.5, 0.04), (0.3, 0.2)):  # d* = 2, 6.25, 0.75
        grid_peak = d[np.argmax(stats.gao_bon(d, alpha, beta))]
        assert stats.peak_bon(alpha, beta) == pytest.approx(grid_peak, abs=2e-4)
    for alpha, beta in ((1.2, 0.4), (0.5, 0.25), (0.3, 0.2)):  # d* = e², e, √e
        grid_peak = d[np.argmax(stats.gao_rl(d, alpha, beta))]
        assert stats.peak_rl(alpha, beta) == pytest.approx(grid_peak, abs=2e-4)
        # and the RL peak reward is β·d*
        dstar = stats.peak_rl(alpha, beta)
        assert stats.gao_rl(dstar, alpha, beta) == pytest.approx(beta * dstar)


def test_overoptimization_point():
    kl = [0.0, 1.0, 2.0, 4.0, 8.0]
    proxy = [0.0, 0.5, 0.9, 1.3, 1.8]
    assert stats.overoptimization_point(kl, [0.0, 0.4, 0.6, 0.5, 0.2], proxy) == 2.0
    # unsorted input gives the same answer
    perm = [3, 0, 4, 2, 1]
    gold = [0.0, 0.4, 0.6, 0.5, 0.2]
    assert stats.overoptimization_point(np.take(kl, perm), np.take(gold, perm),
                                        np.take(proxy, perm)) == 2.0
    # gold monotone, or flat at its top: no over-optimisation
    assert stats.overoptimization_point(kl, [0.0, 0.4, 0.6, 0.7, 0.9], proxy) is None
    assert stats.overoptimization_point(kl, [0.0, 0.4, 0.6, 0.6, 0.6], proxy) is None
    # gold and proxy both fall after the peak: a degraded run, not reward hacking
    assert stats.overoptimization_point(kl, [0.0, 0.4, 0.6, 0.5, 0.2],
                                        [0.0, 0.5, 0.9, 0.8, 0.7]) is None
    # from a fitted Gao RL curve the empirical peak sits near the analytic one
    d = np.sqrt(np.linspace(0.0, 100.0, 201))
    gold = stats.gao_rl(d, 1.0, 0.4)
    peak_kl = stats.overoptimization_point(d**2, gold, 2 * d)
    assert peak_kl == pytest.approx(stats.peak_rl(1.0, 0.4)**2, abs=0.5)
    with pytest.raises(ValueError, match="shapes"):
        stats.overoptimization_point(kl, proxy[:3], proxy)
