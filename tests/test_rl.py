"""Tests for rlhf_jax.rl against hand-computed cases, slow NumPy loops and invariances."""
import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from rlhf_jax import rl


def _lengths_mask(rng, b, t, min_len=0):
    lengths = rng.integers(min_len, t + 1, size=b)
    lengths[0] = t  # at least one full row and, below, one empty row when allowed
    if min_len == 0 and b > 1:
        lengths[1] = 0
    return lengths, np.arange(t)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------
X_HAND = np.array([[1., 2., 3.], [4., 5., 6.]], np.float32)
M_HAND = np.array([[1, 1, 0], [1, 0, 0]], bool)


def test_masked_stats_hand():
    # real values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    np.testing.assert_allclose(rl.masked_mean(X_HAND, M_HAND), 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(rl.masked_sum(X_HAND, M_HAND), 7.0, rtol=1e-6)
    np.testing.assert_allclose(rl.masked_var(X_HAND, M_HAND), 42 / 9 / 2, rtol=1e-6)
    np.testing.assert_allclose(rl.masked_var(X_HAND, M_HAND, unbiased=False), 42 / 9 / 3,
                               rtol=1e-6)
    np.testing.assert_allclose(rl.masked_mean(X_HAND, M_HAND, axis=1), [1.5, 4.0], rtol=1e-6)
    w = rl.masked_whiten(X_HAND, M_HAND)
    std = math.sqrt(42 / 9 / 2)
    expected = np.array([[1 - 7 / 3, 2 - 7 / 3, 0], [4 - 7 / 3, 0, 0]]) / std
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    w_noshift = rl.masked_whiten(X_HAND, M_HAND, shift_mean=False)
    np.testing.assert_allclose(w_noshift, np.where(M_HAND, expected + 7 / 3, 0), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_stats_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 7)).astype(np.float32) * 3 + 1
    _, m = _lengths_mask(rng, 4, 7)
    vals = x[m]
    np.testing.assert_allclose(rl.masked_mean(x, m), vals.mean(), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_sum(x, m), vals.sum(), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, m), vals.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, m, unbiased=False), vals.var(), rtol=1e-5)
    w = np.asarray(rl.masked_whiten(x, m))
    ref = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[m], ref[m], rtol=1e-4, atol=1e-5)
    assert np.all(w[~m] == 0)
    rows = [x[i][m[i]].mean() if m[i].any() else 0.0 for i in range(4)]
    np.testing.assert_allclose(rl.masked_mean(x, m, axis=1), rows, rtol=1e-5)


def test_masked_stats_padding_is_ignored():
    # masked == sliced, and garbage (NaN, inf) in padding cannot leak into the result
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 7)).astype(np.float32)
    xp = np.concatenate([x, np.full((4, 3), np.nan, np.float32)], axis=1)
    xp[0, 7] = np.inf
    mp = np.concatenate([np.ones((4, 7), bool), np.zeros((4, 3), bool)], axis=1)
    m = np.ones((4, 7), bool)
    for fn in (rl.masked_mean, rl.masked_var, rl.masked_sum):
        np.testing.assert_allclose(fn(xp, mp), fn(x, m), rtol=1e-6)
    # Whitened values are O(1): a few f32 ulps of absolute slack (the summation order differs
    # between the padded and the sliced arrays; one value near 0 differed by 1.2e-8 in a CI run).
    np.testing.assert_allclose(rl.masked_whiten(xp, mp)[:, :7], rl.masked_whiten(x, m), rtol=1e-6,
                               atol=1e-6)
    g = jax.grad(lambda a: rl.masked_var(a, mp) + rl.masked_whiten(a, mp).sum())(jnp.asarray(xp))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 7:] == 0)


@pytest.mark.parametrize("fn", [rl.masked_mean, rl.masked_var, rl.masked_sum, rl.masked_whiten,
                                lambda x, m: rl.explained_variance(x, x + 1, m)])
def test_fully_masked_gives_zero(fn):
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    m = jnp.zeros((2, 3), bool)
    out, grad = jax.value_and_grad(lambda a: jnp.sum(fn(a, m)))(x)
    assert out == 0 and np.all(np.asarray(grad) == 0)
    np.testing.assert_array_equal(fn(x, m), np.zeros_like(np.asarray(fn(x, m))))


def test_masked_stats_single_element_and_float_mask():
    x = jnp.array([[2.0, 5.0]])
    m = jnp.array([[1.0, 0.0]])  # float masks are accepted (nonzero = real)
    assert rl.masked_var(x, m) == 0 and rl.masked_mean(x, m) == 2.0
    assert rl.masked_whiten(x, m)[0, 0] == 0


def test_masked_stats_grads():
    rng = np.random.default_rng(4)
    _, m = _lengths_mask(rng, 4, 7, min_len=2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(4, 7)))
        check_grads(jax.jit(lambda a: rl.masked_mean(a, m)), (x,), order=1, modes=("rev", "fwd"))
        check_grads(jax.jit(lambda a: rl.masked_var(a, m)), (x,), order=1, modes=("rev",))
        check_grads(jax.jit(lambda a: rl.masked_whiten(a, m)), (x,), order=1, modes=("rev",))


def test_explained_variance():
    rng = np.random.default_rng(5)
    target = rng.normal(size=(4, 7)).astype(np.float32)
    pred = target + 0.3 * rng.normal(size=(4, 7)).astype(np.float32)
    _, m = _lengths_mask(rng, 4, 7)
    t, p = target[m], pred[m]
    np.testing.assert_allclose(rl.explained_variance(pred, target, m),
                               1 - np.var(t - p) / np.var(t), rtol=1e-5)
    assert rl.explained_variance(target, target, m) == pytest.approx(1.0)
    assert rl.explained_variance(np.zeros_like(target), target, m) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------
def _gae_numpy(rewards, values, lengths, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for s in reversed(range(lengths[i])):
            next_v = values[i, s + 1] if s + 1 < lengths[i] else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    ret = np.where(np.arange(t)[None] < lengths[:, None], adv + values, 0.0)
    return adv, ret


def test_gae_hand():
    g, lam = 0.9, 0.8
    rewards = np.array([[1., 0., 2.], [1., 3., 99.]], np.float32)
    values = np.array([[.5, 1., 1.5], [.5, 1., 7.]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    # row 0: d2 = 2 - 1.5; d1 = 0 + .9*1.5 - 1; d0 = 1 + .9*1 - .5; A_t = d_t + .72 A_{t+1}
    a2 = 0.5
    a1 = 0.35 + 0.72 * a2
    a0 = 1.4 + 0.72 * a1
    # row 1 ends at t=1: no bootstrap from the padded value 7 or reward 99
    b1 = 3.0 - 1.0
    b0 = 1.4 + 0.72 * b1
    adv, ret = rl.gae(rewards, values, mask, g, lam)
    np.testing.assert_allclose(adv, [[a0, a1, a2], [b0, b1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[a0 + .5, a1 + 1, a2 + 1.5], [b0 + .5, b1 + 1, 0.0]],
                               rtol=1e-6)


def test_gae_lambda_one_is_discounted_return():
    r = np.array([[1., 2., 3., 4.]], np.float32)
    v = np.array([[.3, -.2, .7, 1.1]], np.float32)
    m = np.ones((1, 4), bool)
    _, ret = rl.gae(r, v, m, 0.5, 1.0)
    np.testing.assert_allclose(ret, [[1 + .5 * 2 + .25 * 3 + .125 * 4, 2 + .5 * 3 + .25 * 4,
                                      3 + .5 * 4, 4]], rtol=1e-6)
    adv0, _ = rl.gae(r, v, m, 0.5, 0.0)  # λ = 0: one-step TD errors
    np.testing.assert_allclose(adv0, [[1 + .5 * -.2 - .3, 2 + .5 * .7 + .2, 3 + .5 * 1.1 - .7,
                                       4 - 1.1]], rtol=1e-5)


@pytest.mark.parametrize("seed,gamma,lam", [(0, 0.99, 0.95)])
def test_gae_numpy_reference_and_sliced(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    b, t = 4, 7
    lengths, m = _lengths_mask(rng, b, t)
    r = rng.normal(size=(b, t)).astype(np.float32)
    v = rng.normal(size=(b, t)).astype(np.float32)
    adv, ret = rl.gae(r, v, m, gamma, lam)
    adv_ref, ret_ref = _gae_numpy(r.astype(np.float64), v.astype(np.float64), lengths, gamma, lam)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
    for i in range(b):  # each row alone, sliced to its length, gives the same numbers
        n = lengths[i]
        if n == 0:
            continue
        a_i, r_i = rl.gae(r[i:i + 1, :n], v[i:i + 1, :n], np.ones((1, n), bool), gamma, lam)
        np.testing.assert_allclose(a_i[0], np.asarray(adv)[i, :n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r_i[0], np.asarray(ret)[i, :n], rtol=1e-5, atol=1e-6)
    adv_j, ret_j = jax.jit(rl.gae)(r, v, m, jnp.float32(gamma), jnp.float32(lam))
    np.testing.assert_allclose(adv_j, adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret_j, ret, rtol=1e-6, atol=1e-6)


def test_gae_grads():
    rng = np.random.default_rng(2)
    _, m = _lengths_mask(rng, 4, 7)
    with jax.enable_x64(True):
        r = jnp.asarray(rng.normal(size=(4, 7)))
        v = jnp.asarray(rng.normal(size=(4, 7)))
        check_grads(jax.jit(lambda a, b: rl.gae(a, b, m, 0.9, 0.8)), (r, v), order=1,
                    modes=("rev",))


# ------------------------------------------------------------------------------------------
# KL estimators and shaping
# ------------------------------------------------------------------------------------------
def test_kl_estimate_hand():
    logp, ref = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -3.0])
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k1"), [1.0, 0.0])
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k2"), [0.5, 0.0])
    # k3 = e^{-1} - (-1) - 1 = e^{-1}
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k3"), [math.exp(-1), 0.0], rtol=1e-6)


def test_kl_estimate_numpy_reference():
    rng = np.random.default_rng(0)
    logp = -rng.exponential(size=(4, 7)).astype(np.float32)
    ref = -rng.exponential(size=(4, 7)).astype(np.float32)
    lr = ref.astype(np.float64) - logp
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k1"), -lr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k2"), lr**2 / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k3"), np.exp(lr) - lr - 1, rtol=1e-4,
                               atol=1e-6)
    for est in rl.KL_ESTIMATORS:
        np.testing.assert_allclose(jax.jit(rl.kl_estimate, static_argnums=2)(logp, ref, est),
                                   rl.kl_estimate(logp, ref, est), rtol=1e-6, atol=1e-7)
    with jax.enable_x64(True):
        for est in rl.KL_ESTIMATORS:
            check_grads(lambda a, b: rl.kl_estimate(a, b, est), (jnp.asarray(logp, jnp.float64),
                        jnp.asarray(ref, jnp.float64)), order=1, modes=("rev",))


@pytest.mark.parametrize("estimator", rl.KL_ESTIMATORS)
def test_kl_estimators_expectation(estimator):
    # Monte Carlo oracle: k1 and k3 are unbiased for the exact KL(p || q); k2 is biased, its
    # expectation is E_p[½ log²(p/q)], which is close to the KL when p ≈ q
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.4, 0.3, 0.2, 0.1])
    exact_kl = float(np.sum(p * np.log(p / q)))
    exact = exact_kl if estimator != "k2" else float(np.sum(p * 0.5 * np.log(p / q)**2))
    if estimator == "k2":
        assert abs(exact - exact_kl) < 0.15 * exact_kl
    x = np.random.default_rng(0).choice(4, size=200_000, p=p)
    est = rl.kl_estimate(np.log(p).astype(np.float32)[x], np.log(q).astype(np.float32)[x],
                         estimator)
    est = np.asarray(est, np.float64)
    stderr = est.std() / math.sqrt(est.size)
    assert abs(est.mean() - exact) < 4 * stderr
    assert stderr < 0.05 * exact  # the check above is tight enough to mean something
    if estimator != "k1":
        assert float(jnp.min(est)) >= 0


@pytest.mark.parametrize("estimator", rl.KL_ESTIMATORS)
def test_kl_estimate_extreme_is_finite(estimator):
    logp = jnp.array([-1e4, 0.0, -1e4, -5.0])
    ref = jnp.array([0.0, -1e4, -1e4, -5.0])
    val, grad = jax.value_and_grad(lambda a: jnp.sum(rl.kl_estimate(a, ref, estimator)))(logp)
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(grad))


def test_kl_estimate_bad_name():
    with pytest.raises(ValueError, match="estimator.*'k4'"):
        rl.kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


def test_kl_shaped_rewards_hand():
    logp = np.array([[-1., -2., -3.], [-.5, -.5, -1.]], np.float32)
    ref = np.array([[-1.5, -1., -9.], [-.5, -1., -2.]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    score = np.array([2., 3.], np.float32)
    rewards, kl = rl.kl_shaped_rewards(score, logp, ref, mask, 0.1, "k1")
    np.testing.assert_allclose(kl, [[.5, -1., 0.], [0., .5, 1.]], rtol=1e-6)
    np.testing.assert_allclose(rewards, [[-.05, .1 + 2., 0.], [0., -.05, -.1 + 3.]], rtol=1e-6)


@pytest.mark.parametrize("estimator", rl.KL_ESTIMATORS)
def test_kl_shaped_rewards_numpy_reference(estimator):
    rng = np.random.default_rng(1)
    b, t = 4, 7
    lengths, m = _lengths_mask(rng, b, t)
    logp = -rng.exponential(size=(b, t)).astype(np.float32)
    ref = -rng.exponential(size=(b, t)).astype(np.float32)
    score = rng.normal(size=b).astype(np.float32)
    beta = 0.07
    rewards, kl = rl.kl_shaped_rewards(score, logp, ref, m, beta, estimator)
    exp_r, exp_kl = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for s in range(lengths[i]):
            lr = float(ref[i, s]) - float(logp[i, s])
            k = {"k1": -lr, "k2": lr * lr / 2, "k3": math.exp(lr) - lr - 1}[estimator]
            exp_kl[i, s] = k
            exp_r[i, s] = -beta * k + (score[i] if s == lengths[i] - 1 else 0.0)
    np.testing.assert_allclose(kl, exp_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards, exp_r, rtol=1e-5, atol=1e-6)
    # padding more columns changes nothing; a traced β under jit gives the same numbers
    pad = lambda a, v: np.concatenate([a, np.full((b, 3), v, a.dtype)], axis=1)
    rp, kp = rl.kl_shaped_rewards(score, pad(logp, -50.), pad(ref, 0.), pad(m, False), beta,
                                  estimator)
    np.testing.assert_allclose(rp[:, :t], rewards, rtol=1e-6)
    assert np.all(np.asarray(rp)[:, t:] == 0) and np.all(np.asarray(kp)[:, t:] == 0)
    fn = jax.jit(rl.kl_shaped_rewards, static_argnums=5)
    rj, kj = fn(score, logp, ref, m, jnp.float32(beta), estimator)
    np.testing.assert_allclose(rj, rewards, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kj, kl, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------
def test_adaptive_controller_hand_sequence():
    state = rl.adaptive_kl_controller(0.2, target=6.0, horizon=10000)
    kls = [3.0, 6.0, 12.0, 100.0, 5.7]
    n = 512
    # clip(KL/6 - 1, ±0.2) = -0.2, 0, +0.2, +0.2, -0.05; β *= 1 + e·512/10000
    expected, beta = [], 0.2
    for e in (-0.2, 0.0, 0.2, 0.2, -0.05):
        beta = beta * (1 + e * n / 10000)
        expected.append(beta)
    got = []
    for kl in kls:
        state = rl.kl_controller_update(state, jnp.float32(kl), n)
        got.append(float(state.value))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(expected[0], 0.2 * (1 - 0.01024), rtol=1e-12)

    # the same sequence inside jit + lax.scan (the state is a pytree with a static flag)
    def body(s, kl):
        s = rl.kl_controller_update(s, kl, jnp.int32(n))
        return s, s.value

    init = rl.adaptive_kl_controller(0.2, target=6.0, horizon=10000)
    final, values = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(init, jnp.asarray(kls))
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert final.adaptive and len(jax.tree.leaves(final)) == 3


def test_fixed_controller_never_changes():
    state = rl.fixed_kl_controller(0.05)
    for kl in (0.0, 10.0, 1e6):
        state = jax.jit(rl.kl_controller_update)(state, jnp.float32(kl), jnp.int32(64))
    assert float(state.value) == pytest.approx(0.05) and not state.adaptive


def test_adaptive_controller_bad_target():
    with pytest.raises(ValueError, match="target"):
        rl.adaptive_kl_controller(0.1, target=0.0, horizon=100)


# ------------------------------------------------------------------------------------------
# Reward normalisation
# ------------------------------------------------------------------------------------------
def test_normalization_gain_bias_hand():
    # scores 1, 3 (mean 2, population std 1) from gain 2, bias 1: raw = 0, 1
    gain, bias = rl.normalization_gain_bias(jnp.array([1.0, 3.0]), 2.0, 1.0)
    np.testing.assert_allclose([gain, bias], [2.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(gain * jnp.array([0.0, 1.0]) + bias, [-1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("target_mean,target_std", [(0.0, 1.0), (0.5, 2.0)])
def test_normalization_gain_bias_reaches_target(target_mean, target_std):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=256).astype(np.float32) * 0.3 + 4.0
    g0, b0 = 1.7, -0.4
    gain, bias = rl.normalization_gain_bias(jnp.asarray(g0 * raw + b0), g0, b0, target_mean,
                                            target_std)
    new = float(gain) * raw.astype(np.float64) + float(bias)
    np.testing.assert_allclose([new.mean(), new.std()], [target_mean, target_std], atol=1e-4)
    gj, bj = jax.jit(rl.normalization_gain_bias)(jnp.asarray(g0 * raw + b0), g0, b0,
                                                 target_mean, target_std)
    np.testing.assert_allclose([gj, bj], [gain, bias], rtol=1e-6)


def test_normalization_constant_scores_finite():
    gain, bias = rl.normalization_gain_bias(jnp.ones(8), 1.0, 0.0)
    assert np.isfinite(gain) and np.isfinite(bias)


# ------------------------------------------------------------------------------------------
# Truncation and missing-EOS penalty
# ------------------------------------------------------------------------------------------
def test_truncate_after_eos_hand():
    tokens = jnp.array([[5, 2, 7, 2], [5, 6, 7, 8], [2, 1, 1, 1]], jnp.int32)
    out, mask = rl.truncate_after_eos(tokens, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(out, [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    contains = jnp.any((out == 2) & mask, axis=1)
    scores = rl.apply_missing_eos_penalty(jnp.array([0.3, 0.9, -0.2]), contains, -1.0)
    np.testing.assert_allclose(scores, [0.3, -1.0, -0.2])


def test_truncate_after_eos_numpy_reference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(8, 10)).astype(np.int32)
    out, mask = rl.truncate_after_eos(tokens, eos_id=3, pad_id=-1)
    out_j, mask_j = jax.jit(rl.truncate_after_eos, static_argnums=(1, 2))(tokens, 3, -1)
    exp_out, exp_mask = tokens.copy(), np.ones_like(tokens, bool)
    for i in range(8):
        hits = np.flatnonzero(tokens[i] == 3)
        if hits.size:
            exp_out[i, hits[0] + 1:] = -1
            exp_mask[i, hits[0] + 1:] = False
    np.testing.assert_array_equal(out, exp_out)
    np.testing.assert_array_equal(mask, exp_mask)
    np.testing.assert_array_equal(out_j, exp_out)
    np.testing.assert_array_equal(mask_j, exp_mask)
    scores = rng.normal(size=8).astype(np.float32)
    contains = np.array([bool(np.any(tokens[i] == 3)) for i in range(8)])
    assert 0 < contains.sum() < 8
    np.testing.assert_array_equal(
        rl.apply_missing_eos_penalty(scores, contains, -2.5),
        [scores[i] if contains[i] else np.float32(-2.5) for i in range(8)])


# ------------------------------------------------------------------------------------------
# Shape checks
# ------------------------------------------------------------------------------------------
B, T = 2, 3
Z = jnp.zeros((B, T))
Z1 = jnp.zeros((B, T, 1))
M = jnp.ones((B, T), bool)


@pytest.mark.parametrize("call,arg", [
    (lambda: rl.masked_mean(Z1, M), "mask"),
    (lambda: rl.masked_whiten(Z, M[:, :2]), "mask"),
    (lambda: rl.gae(Z, Z1, M, 0.9, 0.9), "values"),
    (lambda: rl.gae(Z, Z, M[0], 0.9, 0.9), "mask"),
    (lambda: rl.kl_estimate(Z, Z1, "k1"), "ref_logp"),
    (lambda: rl.kl_shaped_rewards(jnp.zeros((B, 1)), Z, Z, M, 0.1), "score"),
    (lambda: rl.kl_shaped_rewards(jnp.zeros(B + 1), Z, Z, M, 0.1), "logp"),
    (lambda: rl.truncate_after_eos(jnp.zeros(3, jnp.int32), 1, 0), "tokens"),
    (lambda: rl.apply_missing_eos_penalty(jnp.zeros(B), jnp.ones((B, 1), bool), -1.0),
     "contains_eos"),
    (lambda: rl.normalization_gain_bias(Z, 1.0, 0.0), "scores"),
])
def test_rank_errors_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"`{arg}` has shape"):
        call()
