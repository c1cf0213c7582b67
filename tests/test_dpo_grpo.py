"""Tests for DPO / IPO (rlhf_jax.losses), the k3 KL loss term and the critic-free advantages of
RLOO and GRPO (rlhf_jax.rl): hand cases, NumPy loops, optax, jit, masking and gradients."""
import itertools
import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from rlhf_jax import losses, rl

# Jitted versions for the many small checks (eager dispatch compiles every op for every new shape,
# which dominates the runtime); each function is also compared with its eager self below.
_DPO = jax.jit(losses.dpo_loss, static_argnames="loss_type")
_KL = jax.jit(losses.kl_penalty_loss)
_RLOO = jax.jit(rl.rloo_advantages)
_GRPO = jax.jit(rl.grpo_advantages, static_argnames=("scale", "unbiased"))


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _finite_tree(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _dpo_inputs(seed, b=6):
    rng = np.random.default_rng(seed)
    return [(-rng.exponential(size=b) * 20).astype(np.float32) for _ in range(4)]


# ------------------------------------------------------------------------------------------
# DPO / IPO
# ------------------------------------------------------------------------------------------
def test_dpo_hand():
    # h = (−1 − −2) − (−3 − −2) = 2, β = 0.5: β·h = 1
    pc, pr, rc, rr = (jnp.array([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    loss, m = _DPO(pc, pr, rc, rr, 0.5)
    assert float(loss) == pytest.approx(_softplus(-1.0), rel=1e-6)  # −log σ(1) = log(1 + e^−1)
    assert float(m["dpo/loss"]) == pytest.approx(0.31326169, rel=1e-6)
    assert float(m["dpo/rewards_chosen"]) == pytest.approx(0.5)
    assert float(m["dpo/rewards_rejected"]) == pytest.approx(-0.5)
    assert float(m["dpo/margin"]) == pytest.approx(1.0)
    assert float(m["dpo/accuracy"]) == 1.0
    assert float(m["dpo/logps_chosen"]) == -1.0 and float(m["dpo/logps_rejected"]) == -3.0
    # conservative DPO, ε = 0.1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1))
    loss_s, _ = _DPO(pc, pr, rc, rr, 0.5, label_smoothing=0.1)
    assert float(loss_s) == pytest.approx(0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0), rel=1e-6)
    # the policy equal to the reference: loss log 2, rewards 0, accuracy ½ (a tie)
    loss0, m0 = _DPO(rc, rr, rc, rr, 0.5)
    assert float(loss0) == pytest.approx(math.log(2), rel=1e-6)
    assert float(m0["dpo/accuracy"]) == 0.5 and float(m0["dpo/margin"]) == 0.0


def test_ipo_hand():
    pc, pr, rc, rr = (jnp.array([v, v]) for v in (-1.0, -3.0, -2.0, -2.0))
    # h = 2; β = 0.5: target 1/(2β) = 1, (2 − 1)² = 1; β = 0.25: target 2, loss 0
    assert float(_DPO(pc, pr, rc, rr, 0.5, loss_type="ipo")[0]) == pytest.approx(1.0)
    assert float(_DPO(pc, pr, rc, rr, 0.25, loss_type="ipo")[0]) == pytest.approx(0.0)
    # β = 1, h = −2: (−2 − ½)² = 6.25
    assert float(_DPO(pr, pc, rc, rr, 1.0, loss_type="ipo")[0]) == pytest.approx(6.25)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_numpy_reference_jit_and_padding(loss_type, eps):
    pc, pr, rc, rr = _dpo_inputs(0)
    beta = 0.1
    loss, m = losses.dpo_loss(pc, pr, rc, rr, beta, eps, loss_type)
    per, rew_c, rew_r = [], [], []
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        if loss_type == "sigmoid":
            per.append((1 - eps) * _softplus(-beta * h) + eps * _softplus(beta * h))
        else:
            per.append((h - 1 / (2 * beta))**2)
        rew_c.append(beta * (float(pc[i]) - float(rc[i])))
        rew_r.append(beta * (float(pr[i]) - float(rr[i])))
    rew_c, rew_r = np.array(rew_c), np.array(rew_r)
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-5)
    np.testing.assert_allclose(m["dpo/rewards_chosen"], rew_c.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["dpo/rewards_rejected"], rew_r.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["dpo/margin"], (rew_c - rew_r).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["dpo/accuracy"], np.mean(rew_c > rew_r), rtol=1e-6)
    assert 0 < float(m["dpo/accuracy"]) < 1  # the case exercises both outcomes
    # jit (β and ε traced, the loss type static) == eager
    fn = jax.jit(losses.dpo_loss, static_argnames="loss_type")
    lj, mj = fn(pc, pr, rc, rr, jnp.float32(beta), jnp.float32(eps), loss_type=loss_type)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(mj[k], m[k], rtol=1e-6, atol=1e-7)
    # masked == sliced, and NaN in padding pairs cannot leak
    pad = lambda a: np.concatenate([a, np.array([np.nan, -np.inf], np.float32)])
    mask = np.array([True] * len(pc) + [False, False])
    lp, mp = losses.dpo_loss(pad(pc), pad(pr), pad(rc), pad(rr), beta, eps, loss_type, mask)
    np.testing.assert_allclose(lp, loss, rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(mp[k], m[k], rtol=1e-6, atol=1e-7)
    grad_fn = jax.jit(jax.grad(lambda a: losses.dpo_loss(a, pad(pr), pad(rc), pad(rr), beta, eps,
                                                         loss_type, mask)[0]))
    g = grad_fn(jnp.asarray(pad(pc)))
    assert _finite_tree(g) and np.all(np.asarray(g)[-2:] == 0)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_dpo_sigmoid_is_binary_cross_entropy(eps):
    # DPO is the logistic loss on the logit β·h with label 1 (label 1 − ε with smoothing)
    pc, pr, rc, rr = _dpo_inputs(1)
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    labels = np.full_like(h, 1.0 - eps)
    expected = optax.losses.sigmoid_binary_cross_entropy(beta * h, labels).mean()
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, beta, eps)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    if eps == 0:
        np.testing.assert_allclose(loss, jnp.mean(-jax.nn.log_sigmoid(beta * h)), rtol=1e-6)


def test_dpo_gradients():
    pc, pr, rc, rr = _dpo_inputs(2)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (pc, pr, rc, rr)]
        for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)):
            f = jax.jit(lambda a, b, lt=loss_type, e=eps: losses.dpo_loss(
                a, b, args[2], args[3], 0.1, e, lt)[0])
            check_grads(f, (args[0], args[1]), order=1, modes=("rev",))
        # the reference is a constant; more chosen log-prob lowers the loss, more rejected raises it
        g = jax.jit(jax.grad(lambda *a: losses.dpo_loss(*a, 0.1)[0], argnums=(0, 1, 2, 3)))(*args)
        assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)
        assert np.all(np.asarray(g[2]) == 0) and np.all(np.asarray(g[3]) == 0)
        # dL/dπ_c = −β·σ(−β·h)/B for plain DPO
        h = (args[0] - args[2]) - (args[1] - args[3])
        np.testing.assert_allclose(g[0], -0.1 * jax.nn.sigmoid(-0.1 * h) / h.shape[0], rtol=1e-9)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_extreme_inputs_finite(loss_type):
    big = jnp.array([-1e4, 0.0, -1e4, 0.0, -1e4])
    small = jnp.array([0.0, -1e4, -1e4, -1e4, 0.0])
    eps = 0.1 if loss_type == "sigmoid" else 0.0
    fn = lambda a, b, beta: losses.dpo_loss(a, b, small, big, beta, eps, loss_type)
    vg = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    for beta in (0.1, 1.0, 10.0):
        (loss, m), g = vg(big, small, beta)
        assert _finite_tree((loss, m, g)) and float(loss) > 0
    # a confidently right pair costs ≈ 0, a confidently wrong one ≈ β·|h| (softplus)
    right, _ = _DPO(jnp.array([0.0]), jnp.array([-1e4]), jnp.zeros(1), jnp.zeros(1), 1.0)
    wrong, _ = _DPO(jnp.array([-1e4]), jnp.array([0.0]), jnp.zeros(1), jnp.zeros(1), 1.0)
    assert float(right) == pytest.approx(0.0, abs=1e-6)
    assert float(wrong) == pytest.approx(1e4, rel=1e-6)


def test_dpo_bad_arguments():
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"loss_type.*'hinge'.*\('sigmoid', 'ipo'\)"):
        losses.dpo_loss(z, z, z, z, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(z, z, z, z, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(z, z, z, z, 0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing.*ipo"):
        losses.dpo_loss(z, z, z, z, 0.1, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        losses.dpo_loss(z, z, z, z[:, None], 0.1)


# ------------------------------------------------------------------------------------------
# k3 KL loss term
# ------------------------------------------------------------------------------------------
def test_kl_penalty_loss_hand_reference_and_padding():
    logp = jnp.array([[-1.0, -3.0, -2.0]])
    ref = jnp.array([[-2.0, -3.0, 5.0]])
    mask = jnp.array([[True, True, False]])
    # k3 = e^{-1} − (−1) − 1 = e^{-1} and 0; mean over the two real tokens
    loss, m = losses.kl_penalty_loss(logp, ref, mask)
    assert float(loss) == pytest.approx(math.exp(-1) / 2, rel=1e-6)
    assert float(m["kl/k1"]) == pytest.approx(0.5, rel=1e-6)

    rng = np.random.default_rng(0)
    lengths = np.array([7, 0, 3, 5])
    mask = np.arange(7)[None] < lengths[:, None]
    logp = -rng.exponential(size=(4, 7)).astype(np.float32)
    ref = -rng.exponential(size=(4, 7)).astype(np.float32)
    loss, m = losses.kl_penalty_loss(logp, ref, mask)
    vals = [math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            for i in range(4) for t in range(lengths[i])]
    np.testing.assert_allclose(loss, np.mean(vals), rtol=1e-5)
    # the same per-token estimate as rl.kl_estimate
    np.testing.assert_allclose(loss, rl.masked_mean(rl.kl_estimate(logp, ref, "k3"), mask),
                               rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.kl_penalty_loss)(logp, ref, mask)[0], loss,
                               rtol=1e-6)
    # masked == sliced: inf/NaN padding changes neither the loss nor the gradient
    pad = lambda a, v: np.concatenate([a, np.full((4, 2), v, a.dtype)], axis=1)
    fn = lambda a, r, mk: losses.kl_penalty_loss(a, r, mk)[0]
    lp, gp = jax.jit(jax.value_and_grad(fn))(pad(logp, np.inf), pad(ref, np.nan), pad(mask, False))
    l0, g0 = jax.jit(jax.value_and_grad(fn))(logp, ref, mask)
    np.testing.assert_allclose(lp, l0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gp)[:, :7], g0, rtol=1e-6)
    assert np.all(np.asarray(gp)[:, 7:] == 0)
    # the gradient per token is (1 − π_ref/π)/n_tokens, and 0 for the reference
    np.testing.assert_allclose(g0, np.where(mask, 1 - np.exp(ref - logp), 0) / mask.sum(),
                               rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(jax.jit(jax.grad(lambda r: fn(logp, r, mask)))(ref)) == 0)
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda a: fn(a, jnp.asarray(ref, jnp.float64), mask)),
                    (jnp.asarray(logp, jnp.float64),), order=1, modes=("rev",))


def test_kl_penalty_loss_extreme_and_zero():
    logp = jnp.array([[-1e4, 0.0, -1e4, -5.0]])
    ref = jnp.array([[0.0, -1e4, -1e4, -5.0]])
    mask = jnp.ones((1, 4), bool)
    vg = jax.jit(jax.value_and_grad(losses.kl_penalty_loss, has_aux=True))
    (loss, m), g = vg(logp, ref, mask)
    assert _finite_tree((loss, m, g)) and float(loss) > 0
    loss0, _ = _KL(logp, logp, mask)  # π = π_ref
    assert float(loss0) == 0.0
    assert float(_KL(logp, ref, jnp.zeros((1, 4), bool))[0]) == 0.0


# ------------------------------------------------------------------------------------------
# RLOO
# ------------------------------------------------------------------------------------------
def _rloo_loop(scores, valid):
    b, k = scores.shape
    out = np.zeros((b, k))
    for i in range(b):
        idx = [j for j in range(k) if valid[i, j]]
        if len(idx) < 2:
            continue
        for j in idx:
            others = [scores[i, o] for o in idx if o != j]
            out[i, j] = scores[i, j] - sum(others) / len(others)
    return out


def test_rloo_hand():
    adv = _RLOO(jnp.array([[1.0, 2.0, 3.0], [5.0, -1.0, 2.0]]))
    # [1, 2, 3]: 1 − 2.5, 2 − 2, 3 − 1.5; [5, −1, 2]: 5 − 0.5, −1 − 3.5, 2 − 2
    np.testing.assert_allclose(adv, [[-1.5, 0.0, 1.5], [4.5, -4.5, 0.0]], rtol=1e-6)
    # K = 2: each response is baselined by the other one
    np.testing.assert_allclose(_RLOO(jnp.array([[0.25, 1.0]])), [[-0.75, 0.75]])


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_loop_sum_and_padding(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(5, 6)).astype(np.float32) * 3 + 1
    ones = np.ones((5, 6), bool)
    adv = rl.rloo_advantages(scores)
    np.testing.assert_allclose(adv, _rloo_loop(scores.astype(np.float64), ones), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.sum(adv, axis=1), 0, atol=1e-5)
    # the closed form K/(K−1)·(r − mean)
    np.testing.assert_allclose(adv, 6 / 5 * (scores - scores.mean(1, keepdims=True)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(jax.jit(rl.rloo_advantages)(scores), adv, rtol=1e-6, atol=1e-6)
    # missing responses (one row with a single valid one, one with none) == the loop, == sliced
    valid = rng.random((5, 6)) < 0.7
    valid[0] = True
    valid[1] = [True] + [False] * 5
    valid[2] = False
    garbage = np.where(valid, scores, np.nan)
    adv_v = np.asarray(rl.rloo_advantages(garbage, valid))
    np.testing.assert_allclose(adv_v, _rloo_loop(scores.astype(np.float64), valid), rtol=1e-5,
                               atol=1e-5)
    assert np.all(adv_v[~valid] == 0) and np.all(adv_v[1:3] == 0)
    for i in range(5):
        if valid[i].sum() >= 2:
            sliced = rl.rloo_advantages(scores[i:i + 1, valid[i]])
            np.testing.assert_allclose(adv_v[i, valid[i]], sliced[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(adv_v[i].sum(), 0, atol=1e-5)
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda s: rl.rloo_advantages(s, valid)),
                    (jnp.asarray(scores, jnp.float64),), order=1, modes=("rev",))


def test_rloo_leave_one_out_baseline_keeps_reinforce_unbiased():
    # Exact expectation over all K-tuples from a 3-outcome policy: E[Σ_i A_i ∇log p(y_i)] equals
    # K·∇E[r] (the baseline of sample i does not depend on y_i); with the plain group mean as
    # the baseline it is shrunk by (K−1)/K.
    logits = np.array([0.3, -0.2, 0.5])
    p = np.exp(logits) / np.exp(logits).sum()
    r = np.array([1.0, -2.0, 0.5])
    grad_logp = np.eye(3) - p[None, :]  # ∇_logits log p(y) for each outcome y
    true_grad = p @ (r[:, None] * grad_logp)
    k = 3
    est_rloo, est_mean = np.zeros(3), np.zeros(3)
    for ys in itertools.product(range(3), repeat=k):
        prob = np.prod(p[list(ys)])
        s = r[list(ys)][None]
        a = np.asarray(_RLOO(jnp.asarray(s)), np.float64)[0]
        a_mean = np.asarray(_GRPO(jnp.asarray(s), scale=False), np.float64)[0]
        est_rloo += prob * sum(a[i] * grad_logp[ys[i]] for i in range(k))
        est_mean += prob * sum(a_mean[i] * grad_logp[ys[i]] for i in range(k))
    np.testing.assert_allclose(est_rloo, k * true_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est_mean, (k - 1) * true_grad, rtol=1e-5, atol=1e-7)


def test_kl_penalized_scores():
    rng = np.random.default_rng(3)
    lengths = np.array([4, 2, 0, 3])
    mask = np.arange(4)[None] < lengths[:, None]
    logp = -rng.exponential(size=(4, 4)).astype(np.float32)
    ref = -rng.exponential(size=(4, 4)).astype(np.float32)
    score = rng.normal(size=4).astype(np.float32)
    for est in rl.KL_ESTIMATORS:
        pen, seq_kl = rl.kl_penalized_scores(score, logp, ref, mask, 0.2, est)
        shaped, _ = rl.kl_shaped_rewards(score, logp, ref, mask, 0.2, est)
        # the sequence sum of the per-token shaped rewards, except an empty row keeps its score
        np.testing.assert_allclose(pen, np.where(lengths > 0, np.sum(shaped, 1), score),
                                   rtol=1e-5, atol=1e-6)
        exp_kl = [sum({"k1": lambda x: -x, "k2": lambda x: x * x / 2,
                       "k3": lambda x: math.exp(x) - x - 1}[est](float(ref[i, t] - logp[i, t]))
                      for t in range(lengths[i])) for i in range(4)]
        np.testing.assert_allclose(seq_kl, exp_kl, rtol=1e-5, atol=1e-6)
    rl_pen = rl.kl_penalized_scores(score, logp, ref, mask, 0.2)[0].reshape(2, 2)
    assert _RLOO(rl_pen).shape == (2, 2)


# ------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------
def _grpo_numpy(scores, eps, scale, ddof=0):
    mean = scores.mean(axis=1, keepdims=True)
    if not scale:
        return scores - mean
    return (scores - mean) / (scores.std(axis=1, ddof=ddof, keepdims=True) + eps)


def test_grpo_hand():
    # [1, 2, 3]: mean 2, population std √(2/3)
    s = jnp.array([[1.0, 2.0, 3.0]])
    sd = math.sqrt(2 / 3)
    np.testing.assert_allclose(_GRPO(s, eps=0.0), [[-1 / sd, 0, 1 / sd]], rtol=1e-6)
    np.testing.assert_allclose(_GRPO(s, eps=0.0, unbiased=True), [[-1, 0, 1]],
                               rtol=1e-6)
    np.testing.assert_allclose(_GRPO(s, scale=False), [[-1, 0, 1]], rtol=1e-6)
    # binary rewards 1, 0, 0, 0: mean ¼, std √3/4
    a = _GRPO(jnp.array([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    np.testing.assert_allclose(a, [[3 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3),
                                    -1 / math.sqrt(3)]], rtol=1e-6)


@pytest.mark.parametrize("scale,eps,unbiased", [(True, 1e-4, False), (True, 0.0, True),
                                                (False, 1e-4, False)])
def test_grpo_numpy_jit_and_padding(scale, eps, unbiased):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 8)).astype(np.float32) * 2 - 1
    adv = rl.grpo_advantages(scores, eps, scale, unbiased=unbiased)
    ref = _grpo_numpy(scores.astype(np.float64), eps, scale, int(unbiased))
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sum(adv, axis=1), 0, atol=1e-5)
    fn = jax.jit(rl.grpo_advantages, static_argnames=("scale", "unbiased"))
    np.testing.assert_allclose(fn(scores, eps, scale=scale, unbiased=unbiased), adv, rtol=1e-6,
                               atol=1e-6)
    valid = rng.random((5, 8)) < 0.6
    valid[0] = True
    valid[1] = [True] + [False] * 7
    adv_v = np.asarray(rl.grpo_advantages(np.where(valid, scores, np.inf), eps, scale, valid,
                                          unbiased))
    assert np.all(adv_v[~valid] == 0) and np.all(adv_v[1] == 0)
    for i in range(5):
        if valid[i].sum() >= 2:
            sliced = _grpo_numpy(scores[i:i + 1, valid[i]].astype(np.float64), eps, scale,
                                 int(unbiased))
            np.testing.assert_allclose(adv_v[i, valid[i]], sliced[0], rtol=1e-5, atol=1e-5)


def test_grpo_affine_invariance():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        s = jnp.asarray(rng.normal(size=(4, 6)))
        base = _GRPO(s, eps=0.0)
        for a, b in ((3.0, -7.0), (0.01, 100.0), (250.0, 0.5)):
            np.testing.assert_allclose(_GRPO(a * s + b, eps=0.0), base, rtol=1e-9,
                                       atol=1e-9)
            # mean-centring alone is shift-invariant and scales with a
            np.testing.assert_allclose(_GRPO(a * s + b, scale=False),
                                       a * _GRPO(s, scale=False), rtol=1e-9,
                                       atol=1e-9)
        # a negative scale flips the ranking
        np.testing.assert_allclose(_GRPO(-2 * s + 1, eps=0.0), -base, rtol=1e-9)
        # with eps > 0 invariance holds once the spread dwarfs eps
        np.testing.assert_allclose(_GRPO(1e3 * s, eps=1e-4), base, rtol=1e-5)


def test_grpo_constant_groups_and_grads():
    s = jnp.array([[0.1, 0.1, 0.1], [2.0, 2.0, 2.0], [1.0, 0.0, 0.0]])
    for eps in (0.0, 1e-4):
        adv, vjp = jax.vjp(lambda x: _GRPO(x, eps), s)
        assert np.all(np.asarray(adv)[:2] == 0) and np.all(np.asarray(adv)[2] != 0)
        assert _finite_tree(vjp(jnp.ones_like(s)))
    big = jnp.array([[1e4, -1e4, 0.0, 1e4]])
    assert _finite_tree(_GRPO(big)) and _finite_tree(_RLOO(big))
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 5)))
        check_grads(jax.jit(rl.grpo_advantages), (x,), order=1, modes=("rev",))
        check_grads(jax.jit(lambda a: _GRPO(a, scale=False)), (x,), order=1,
                    modes=("rev",))


def test_group_size_checked():
    for fn in (rl.rloo_advantages, rl.grpo_advantages):
        with pytest.raises(ValueError, match="K ≥ 2"):
            fn(jnp.ones((4, 1)))
        with pytest.raises(ValueError, match="scores"):
            fn(jnp.ones(4))
        with pytest.raises(ValueError, match="valid"):
            fn(jnp.ones((4, 3)), valid=jnp.ones((4, 2), bool))
