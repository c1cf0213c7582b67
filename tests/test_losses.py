"""Tests for rlhf_jax.losses against hand-computed cases, NumPy loops and optax."""
import math

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from rlhf_jax import losses


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _log_softmax_np(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _finite_tree(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------
# token_logprobs, entropy
# ------------------------------------------------------------------------------------------
def test_token_logprobs_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    tokens = jnp.array([[1, 0]])
    np.testing.assert_allclose(losses.token_logprobs(logits, tokens),
                               [[math.log(0.75), math.log(0.5)]], rtol=1e-6)
    # τ = 2: logits/2 = [0, ln√3] -> p = √3 / (1 + √3)
    s3 = math.sqrt(3.0)
    np.testing.assert_allclose(losses.token_logprobs(logits, tokens, 2.0)[0, 0],
                               math.log(s3 / (1 + s3)), rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_reference_and_optax(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 13)).astype(np.float32) * 3
    tokens = rng.integers(0, 13, size=(3, 7))
    got = losses.token_logprobs(logits, tokens, temperature)
    lsm = _log_softmax_np(logits.astype(np.float64) / temperature)
    ref = np.array([[lsm[b, t, tokens[b, t]] for t in range(7)] for b in range(3)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits / temperature, tokens)
    np.testing.assert_allclose(got, -ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(losses.token_logprobs)(logits, tokens, temperature), got,
                               rtol=1e-6, atol=1e-6)


def test_token_entropy_hand_and_reference():
    logits = jnp.array([[[0., 0., 0., 0.], [0., math.log(3.), -jnp.inf, -1e4]]])
    h = losses.token_entropy(logits)
    np.testing.assert_allclose(h, [[math.log(4), -(.25 * math.log(.25) + .75 * math.log(.75))]],
                               rtol=1e-5)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 7, 13)).astype(np.float32)
    mask = np.arange(7)[None] < np.array([[7], [3], [1]])
    p = np.exp(_log_softmax_np(z.astype(np.float64) / 1.3))
    h_ref = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(losses.token_entropy(z, 1.3), h_ref, rtol=1e-5)
    np.testing.assert_allclose(losses.entropy(z, mask, 1.3), h_ref[mask].mean(), rtol=1e-5)
    zp = np.concatenate([z, np.full((3, 3, 13), 1e4, np.float32)], axis=1)
    mp = np.concatenate([mask, np.zeros((3, 3), bool)], axis=1)
    np.testing.assert_allclose(losses.entropy(zp, mp, 1.3), losses.entropy(z, mask, 1.3),
                               rtol=1e-6)
    assert losses.entropy(z, np.zeros_like(mask)) == 0
    np.testing.assert_allclose(jax.jit(losses.entropy)(z, mask, 1.3),
                               losses.entropy(z, mask, 1.3), rtol=1e-6)
    # logits of ±1e4: uniform over the +1e4 entries, so H = log(#positive); finite gradient
    h, g = jax.value_and_grad(losses.entropy)(jnp.asarray(np.sign(z) * 1e4), mask)
    assert _finite_tree((h, g))
    np.testing.assert_allclose(h, np.log((z > 0).sum(-1))[mask].mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# lm_loss
# ------------------------------------------------------------------------------------------
def test_lm_loss_hand_and_shift_convention():
    logits = jnp.array([[[0., math.log(3.)], [0., 0.], [5., -5.]]])
    tokens = jnp.array([[0, 1, 0]])
    # logits[0] predicts tokens[1] = 1 (p = .75); logits[1] predicts tokens[2] = 0 (p = .5)
    loss, met = losses.lm_loss(logits, tokens, jnp.array([[0, 1, 1]]))
    np.testing.assert_allclose(loss, -(math.log(.75) + math.log(.5)) / 2, rtol=1e-6)
    # argmax of logits[0] is 1 (right), of logits[1] is 0 (ties -> first; target 0: right)
    np.testing.assert_allclose(met["lm/accuracy"], 1.0)
    assert met["lm/num_tokens"] == 2
    # loss_mask[:, 0] is ignored: nothing predicts the first token
    loss2, _ = losses.lm_loss(logits, tokens, jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(loss2, -math.log(.75), rtol=1e-6)


def _lm_data(seed, b=3, t=8, v=13):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    tokens = rng.integers(0, v, size=(b, t))
    starts = rng.integers(1, t // 2, size=b)          # prompt tokens [0, start)
    ends = rng.integers(t // 2 + 1, t + 1, size=b)    # response tokens [start, end), then padding
    pos = np.arange(t)[None]
    loss_mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    return logits, tokens, loss_mask, starts, ends


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_lm_loss_reference_optax_jit_and_padding(temperature):
    logits, tokens, mask, starts, ends = _lm_data(0)
    loss, met = losses.lm_loss(logits, tokens, mask, temperature)
    # slow loop
    total, n = 0.0, 0
    for b in range(3):
        for t in range(1, 8):
            if mask[b, t]:
                total -= _log_softmax_np(logits[b, t - 1].astype(np.float64) / temperature)[
                    tokens[b, t]]
                n += 1
    np.testing.assert_allclose(loss, total / n, rtol=1e-5)
    # optax CE on the response tokens sliced out of each row, concatenated
    pred = np.concatenate([logits[b, starts[b] - 1:ends[b] - 1] for b in range(3)])
    targ = np.concatenate([tokens[b, starts[b]:ends[b]] for b in range(3)])
    ce = optax.softmax_cross_entropy_with_integer_labels(pred / temperature, targ)
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-5)
    assert met["lm/num_tokens"] == n
    # jit == eager
    lj, mj = jax.jit(losses.lm_loss)(logits, tokens, mask, temperature)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    np.testing.assert_allclose(mj["lm/accuracy"], met["lm/accuracy"], rtol=1e-6)
    # extra right padding (with garbage logits/tokens) does not change the loss
    pad_l = np.concatenate([logits, np.full((3, 4, 13), 1e4, np.float32)], axis=1)
    pad_t = np.concatenate([tokens, np.zeros((3, 4), tokens.dtype)], axis=1)
    pad_m = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
    np.testing.assert_allclose(losses.lm_loss(pad_l, pad_t, pad_m, temperature)[0], loss,
                               rtol=1e-6)


def test_lm_loss_extreme_and_empty():
    logits, tokens, mask, _, _ = _lm_data(1)
    big = np.sign(logits) * 1e4
    (loss, met), g = jax.value_and_grad(losses.lm_loss, has_aux=True)(jnp.asarray(big), tokens,
                                                                      mask)
    assert _finite_tree((loss, met, g))
    (loss0, _), g0 = jax.value_and_grad(losses.lm_loss, has_aux=True)(
        jnp.asarray(logits), tokens, np.zeros_like(mask))
    assert loss0 == 0 and np.all(np.asarray(g0) == 0)


# ------------------------------------------------------------------------------------------
# Reward-model losses
# ------------------------------------------------------------------------------------------
def test_bradley_terry_hand():
    loss, met = losses.bradley_terry_loss(jnp.array([1., 0.]), jnp.array([0., 0.]))
    np.testing.assert_allclose(loss, (_softplus(-1.) + math.log(2.)) / 2, rtol=1e-6)
    np.testing.assert_allclose(met["rm/accuracy"], 0.75)  # a tie counts half
    loss_m, _ = losses.bradley_terry_loss(jnp.array([1.]), jnp.array([0.]), margin=1.0)
    np.testing.assert_allclose(loss_m, math.log(2.), rtol=1e-6)


@pytest.mark.parametrize("per_example_margin", [False, True])
def test_bradley_terry_reference_optax_padding(per_example_margin):
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=(2, 9)).astype(np.float32) * 2
    margin = rng.uniform(0, 1, size=9).astype(np.float32) if per_example_margin else 0.3
    loss, met = losses.bradley_terry_loss(rc, rr, margin)
    mg = np.broadcast_to(margin, (9,))
    ref = np.mean([_softplus(-(float(rc[i]) - float(rr[i]) - float(mg[i]))) for i in range(9)])
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # == softmax CE over the two logits (r_c - margin, r_r) with label 0
    ce = optax.softmax_cross_entropy_with_integer_labels(np.stack([rc - mg, rr], axis=1),
                                                         np.zeros(9, np.int32))
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(met["rm/accuracy"], np.mean(rc > rr), rtol=1e-6)
    lj, _ = jax.jit(losses.bradley_terry_loss)(rc, rr, margin)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    # padded pairs with a mask == sliced
    pad = lambda a, v: np.concatenate([a, np.array(v, np.float32)])
    mp = np.concatenate([np.ones(9, bool), np.zeros(3, bool)])
    margin_p = pad(mg, [0., 0., 1e4]) if per_example_margin else margin
    lp, mtp = losses.bradley_terry_loss(pad(rc, [1e4, -1e4, 0.]), pad(rr, [-1e4, 1e4, 0.]),
                                        margin_p, mask=mp)
    np.testing.assert_allclose(lp, loss, rtol=1e-6)
    np.testing.assert_allclose(mtp["rm/accuracy"], met["rm/accuracy"], rtol=1e-6)


def _ranking_numpy(rewards, ranks, valid):
    per_prompt_loss, per_prompt_acc = [], []
    b, k = rewards.shape
    for i in range(b):
        ls, acc = [], []
        for a in range(k):
            for c in range(a + 1, k):
                if not (valid[i, a] and valid[i, c]) or ranks[i, a] == ranks[i, c]:
                    continue
                w, l_ = (a, c) if ranks[i, a] < ranks[i, c] else (c, a)
                d = float(rewards[i, w]) - float(rewards[i, l_])
                ls.append(_softplus(-d))
                acc.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        if ls:
            per_prompt_loss.append(np.mean(ls))
            per_prompt_acc.append(np.mean(acc))
    if not per_prompt_loss:
        return 0.0, 0.0
    return np.mean(per_prompt_loss), np.mean(per_prompt_acc)


def test_ranking_loss_hand():
    rewards = jnp.array([[3., 2., 1.], [0., 1., 2.]])
    ranks = jnp.array([[0, 1, 2], [0, 0, 1]])
    loss, met = losses.ranking_loss(rewards, ranks)
    # prompt 0: winner-loser differences 1, 2, 1; prompt 1: the (0, 1) tie is dropped, -2 and -1
    p0 = (_softplus(-1.) + _softplus(-2.) + _softplus(-1.)) / 3
    p1 = (_softplus(2.) + _softplus(1.)) / 2
    np.testing.assert_allclose(loss, (p0 + p1) / 2, rtol=1e-6)  # each prompt weighted once
    np.testing.assert_allclose(met["rm/accuracy"], 0.5)
    assert met["rm/num_pairs"] == 5


@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_loss_reference_and_padding(seed):
    rng = np.random.default_rng(seed)
    b, k = 6, 4
    rewards = rng.normal(size=(b, k)).astype(np.float32)
    ranks = rng.integers(0, 3, size=(b, k)).astype(np.int32)  # ties happen
    valid = rng.uniform(size=(b, k)) < 0.8
    valid[0] = True
    ranks[1] = 0  # all tied: this prompt carries no pairs and no weight
    loss, met = losses.ranking_loss(rewards, ranks, valid)
    ref_loss, ref_acc = _ranking_numpy(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(met["rm/accuracy"], ref_acc, rtol=1e-5)
    lj, _ = jax.jit(losses.ranking_loss)(rewards, ranks, valid)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    # two extra invalid responses with garbage rewards and ranks change nothing
    rp = np.concatenate([rewards, np.array([[1e4, -1e4]] * b, np.float32)], axis=1)
    kp = np.concatenate([ranks, np.zeros((b, 2), np.int32)], axis=1)
    vp = np.concatenate([valid, np.zeros((b, 2), bool)], axis=1)
    np.testing.assert_allclose(losses.ranking_loss(rp, kp, vp)[0], loss, rtol=1e-6)


def test_ranking_loss_k2_is_bradley_terry_and_all_ties_zero():
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(6, 2)).astype(np.float32)
    ranks = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]], np.int32)
    chosen = rewards[np.arange(6), ranks.argmin(1)]
    rejected = rewards[np.arange(6), ranks.argmax(1)]
    np.testing.assert_allclose(losses.ranking_loss(rewards, ranks)[0],
                               losses.bradley_terry_loss(chosen, rejected)[0], rtol=1e-6)
    loss, met = losses.ranking_loss(rewards, np.zeros((6, 2), np.int32))
    assert loss == 0 and met["rm/num_pairs"] == 0


def test_best_of_k_hand_optax_and_padding():
    loss, met = losses.best_of_k_loss(jnp.array([[0., math.log(3.)]]), jnp.array([1]))
    np.testing.assert_allclose(loss, -math.log(.75), rtol=1e-6)
    assert met["rm/accuracy"] == 1
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(6, 4)).astype(np.float32)
    best = rng.integers(0, 4, size=6)
    loss, met = losses.best_of_k_loss(rewards, best)
    ce = optax.softmax_cross_entropy_with_integer_labels(rewards, best)
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(met["rm/accuracy"], np.mean(rewards.argmax(1) == best))
    np.testing.assert_allclose(jax.jit(losses.best_of_k_loss)(rewards, best)[0], loss, rtol=1e-6)
    # K = 2 is Bradley–Terry
    r2, b2 = rewards[:, :2], best % 2
    np.testing.assert_allclose(
        losses.best_of_k_loss(r2, b2)[0],
        losses.bradley_terry_loss(r2[np.arange(6), b2], r2[np.arange(6), 1 - b2])[0], rtol=1e-6)
    # invalid responses (with huge rewards) are excluded from the softmax == sliced
    rp = np.concatenate([rewards, np.full((6, 2), 1e4, np.float32)], axis=1)
    vp = np.concatenate([np.ones((6, 4), bool), np.zeros((6, 2), bool)], axis=1)
    lp, mp = losses.best_of_k_loss(rp, best, vp)
    np.testing.assert_allclose(lp, loss, rtol=1e-6)
    np.testing.assert_allclose(mp["rm/accuracy"], met["rm/accuracy"])


@pytest.mark.parametrize("name", ["bt", "ranking", "best_of_k"])
def test_rm_losses_extreme_inputs_finite(name):
    r = jnp.array([[1e4, -1e4, 0.], [-1e4, 1e4, 3.]])
    fn = {
        "bt": lambda x: losses.bradley_terry_loss(x[:, 0], x[:, 1]),
        "ranking": lambda x: losses.ranking_loss(x, jnp.array([[0, 1, 2], [0, 1, 1]])),
        "best_of_k": lambda x: losses.best_of_k_loss(x, jnp.array([0, 0])),
    }[name]
    (loss, met), g = jax.value_and_grad(fn, has_aux=True)(r)
    assert _finite_tree((loss, met, g))
    assert float(loss) > 1e3  # a -1e4 difference costs about 1e4 / (number of terms)


# ------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------
def test_ppo_policy_loss_hand():
    ratio = np.array([[1.5, 0.5, 0.5, 1.5, 4.0, 1.0]])
    adv = jnp.array([[1., 1., -1., -1., -1., 2.]])
    logp = jnp.log(jnp.asarray(ratio, jnp.float32))
    old = jnp.zeros_like(logp)
    mask = jnp.ones_like(logp, bool)
    # per token max(-A ρ, -A clip(ρ, .8, 1.2)):
    #   -1.2 (clipped), -0.5, 0.8 (clipped), 1.5, 4.0, -2.0
    loss, met = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, (-1.2 - .5 + .8 + 1.5 + 4. - 2.) / 6, rtol=1e-5)
    np.testing.assert_allclose(met["ppo/clipfrac"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(met["ppo/ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(met["ppo/approxkl"], 0.5 * np.mean(np.log(ratio)**2), rtol=1e-5)
    # dual clip c = 3 bounds the A = -1, ρ = 4 token at 3·|A| = 3
    loss_d, met_d = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, dual_clip=3.0)
    np.testing.assert_allclose(loss_d, (-1.2 - .5 + .8 + 1.5 + 3. - 2.) / 6, rtol=1e-5)
    np.testing.assert_allclose(met_d["ppo/dual_clipfrac"], 1 / 6, rtol=1e-6)


def _ppo_numpy(logp, old, adv, mask, eps, dual):
    tot, n, clipped = 0.0, 0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            lt = max(l1, l2)
            if dual is not None and a < 0:
                lt = min(lt, dual * abs(a))
            tot, n, clipped = tot + lt, n + 1, clipped + (l2 > l1)
    return tot / n, clipped / n


def _ppo_data(seed, b=4, t=7):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(b, t)).astype(np.float32)
    logp = old + 0.4 * rng.normal(size=(b, t)).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None] < lengths[:, None]
    return logp, old, adv, mask


@pytest.mark.parametrize("dual", [None, 2.0])
def test_ppo_policy_loss_reference_jit_padding(dual):
    logp, old, adv, mask = _ppo_data(0)
    loss, met = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, dual)
    ref, ref_clip = _ppo_numpy(logp, old, adv, mask, 0.2, dual)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(met["ppo/clipfrac"], ref_clip, rtol=1e-6)
    fn = jax.jit(losses.ppo_policy_loss, static_argnums=5)
    lj, mj = fn(logp, old, adv, mask, jnp.float32(0.2), dual)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    for key in met:
        np.testing.assert_allclose(mj[key], met[key], rtol=1e-5, atol=1e-7)
    pad = lambda a, v: np.concatenate([a, np.full((4, 3), v, a.dtype)], axis=1)
    lp, mp = losses.ppo_policy_loss(pad(logp, 50.), pad(old, -50.), pad(adv, 1e4), pad(mask, 0),
                                    0.2, dual)
    np.testing.assert_allclose(lp, loss, rtol=1e-6)
    np.testing.assert_allclose(mp["ppo/ratio_mean"], met["ppo/ratio_mean"], rtol=1e-6)


def test_ppo_policy_loss_gradient_and_extremes():
    logp, old, adv, mask = _ppo_data(1)
    g = np.asarray(jax.grad(lambda a: losses.ppo_policy_loss(a, old, adv, mask, 0.2)[0])(
        jnp.asarray(logp)))
    # oracle: d/dlogp of -A·ρ/N where the unclipped term is active, 0 where the clip is
    r = np.exp(logp.astype(np.float64) - old)
    active = (-adv * r) >= (-adv * np.clip(r, 0.8, 1.2))
    expected = np.where(mask & active, -adv * r / mask.sum(), 0.0)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
    with jax.enable_x64(True):
        # away from the kinks (all ratios inside the clip range) the loss is smooth
        lp = jnp.asarray(old, jnp.float64) + 0.05 * jnp.asarray(np.sign(adv), jnp.float64)
        check_grads(jax.jit(lambda a: losses.ppo_policy_loss(a, jnp.asarray(old, jnp.float64),
                                                             jnp.asarray(adv, jnp.float64),
                                                             mask, 0.2)[0]),
                    (lp,), order=1, modes=("rev",), eps=1e-4)
    # log-prob differences of ±1e4 with advantages of both signs
    huge = jnp.asarray(np.where((np.arange(28) % 3 == 0).reshape(4, 7), 1e4, -1e4), jnp.float32)
    for dual in (None, 3.0):
        (loss, met), g = jax.value_and_grad(losses.ppo_policy_loss, has_aux=True)(
            huge, old, adv, np.ones_like(mask), 0.2, dual)
        assert _finite_tree((loss, met, g))
    (loss, met), g = jax.value_and_grad(losses.ppo_policy_loss, has_aux=True)(
        jnp.asarray(logp), old, adv, np.zeros_like(mask), 0.2)
    assert loss == 0 and np.all(np.asarray(g) == 0) and _finite_tree(met)


def test_ppo_policy_loss_bad_dual_clip():
    z = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        losses.ppo_policy_loss(z, z, z, z, 0.2, dual_clip=0.5)


def test_ppo_value_loss_hand():
    values = jnp.array([[1.0, 0.1, -0.5]])
    old = jnp.array([[0.0, 0.0, 0.0]])
    returns = jnp.array([[2.0, 1.0, 0.0]])
    mask = jnp.array([[1, 1, 0]])
    # token 0: V_clip = 0.2, errors 1 and 3.24 -> 3.24 (clipped); token 1: V_clip = V, .81
    loss, met = losses.ppo_value_loss(values, old, returns, mask, 0.2)
    np.testing.assert_allclose(loss, 0.5 * (3.24 + 0.81) / 2, rtol=1e-6)
    np.testing.assert_allclose(met["ppo/val/clipfrac"], 0.5)
    np.testing.assert_allclose(met["ppo/val/vpred"], 0.55, rtol=1e-6)
    np.testing.assert_allclose(met["ppo/val/error"], (1.0 + 0.81) / 2, rtol=1e-6)


def test_ppo_value_loss_reference_jit_padding_grads():
    rng = np.random.default_rng(0)
    b, t = 4, 7
    old = rng.normal(size=(b, t)).astype(np.float32)
    values = old + 0.3 * rng.normal(size=(b, t)).astype(np.float32)
    returns = rng.normal(size=(b, t)).astype(np.float32)
    mask = np.arange(t)[None] < rng.integers(1, t + 1, size=b)[:, None]
    loss, met = losses.ppo_value_loss(values, old, returns, mask, 0.2)
    tot, clip, n = 0.0, 0, 0
    for i in range(b):
        for s in range(t):
            if mask[i, s]:
                v, o, r = float(values[i, s]), float(old[i, s]), float(returns[i, s])
                vc = o + min(max(v - o, -0.2), 0.2)
                tot += 0.5 * max((v - r)**2, (vc - r)**2)
                clip += (vc - r)**2 > (v - r)**2
                n += 1
    np.testing.assert_allclose(loss, tot / n, rtol=1e-5)
    np.testing.assert_allclose(met["ppo/val/clipfrac"], clip / n, rtol=1e-6)
    ev = 1 - np.var(returns[mask] - values[mask]) / np.var(returns[mask])
    np.testing.assert_allclose(met["ppo/val/explained_var"], ev, rtol=1e-4)
    lj, _ = jax.jit(losses.ppo_value_loss)(values, old, returns, mask, 0.2)
    np.testing.assert_allclose(lj, loss, rtol=1e-6)
    pad = lambda a, v: np.concatenate([a, np.full((b, 3), v, a.dtype)], axis=1)
    lp, _ = losses.ppo_value_loss(pad(values, 1e4), pad(old, -1e4), pad(returns, 5.),
                                  pad(mask, 0), 0.2)
    np.testing.assert_allclose(lp, loss, rtol=1e-6)
    with jax.enable_x64(True):
        # inside the clip range the loss is ½·mean((V − R)²): smooth
        v64 = jnp.asarray(old, jnp.float64) + 0.05
        check_grads(jax.jit(lambda v: losses.ppo_value_loss(
            v, jnp.asarray(old, jnp.float64), jnp.asarray(returns, jnp.float64), mask, 0.2)[0]),
            (v64,), order=1, modes=("rev",), eps=1e-4)
    big = jnp.asarray(np.sign(values) * 1e4)
    (loss, met), g = jax.value_and_grad(losses.ppo_value_loss, has_aux=True)(
        big, -big, returns, np.ones_like(mask), 0.2)
    assert _finite_tree((loss, met, g))


# ------------------------------------------------------------------------------------------
# Gradients of the smooth losses (float64)
# ------------------------------------------------------------------------------------------
def test_check_grads_smooth_losses():
    rng = np.random.default_rng(0)
    logits, tokens, mask, _, _ = _lm_data(2, b=2, t=5, v=6)
    with jax.enable_x64(True):
        z = jnp.asarray(logits, jnp.float64)
        check_grads(jax.jit(lambda a: losses.lm_loss(a, tokens, mask, 0.8)[0]), (z,), order=1,
                    modes=("rev",))
        check_grads(jax.jit(lambda a: losses.entropy(a, mask, 0.8)), (z,), order=1,
                    modes=("rev",))
        r = jnp.asarray(rng.normal(size=(3, 4)))
        ranks = jnp.array([[0, 1, 2, 2], [1, 0, 0, 3], [3, 2, 1, 0]])
        check_grads(jax.jit(lambda x: losses.ranking_loss(x, ranks)[0]), (r,), order=1,
                    modes=("rev",))
        check_grads(jax.jit(lambda x: losses.best_of_k_loss(x, jnp.array([0, 3, 1]))[0]), (r,),
                    order=1, modes=("rev",))
        check_grads(jax.jit(lambda a, b: losses.bradley_terry_loss(a, b, 0.5)[0]),
                    (r[:, 0], r[:, 1]), order=1, modes=("rev",))


# ------------------------------------------------------------------------------------------
# Shape checks
# ------------------------------------------------------------------------------------------
B, T, V = 2, 3, 5
Z = jnp.zeros((B, T))
Z1 = jnp.zeros((B, T, 1))
M = jnp.ones((B, T), bool)
TOK = jnp.zeros((B, T), jnp.int32)


@pytest.mark.parametrize("call,arg", [
    (lambda: losses.token_logprobs(Z, TOK), "logits"),
    (lambda: losses.token_logprobs(jnp.zeros((B, T, V)), TOK[:, :2]), "tokens"),
    (lambda: losses.lm_loss(jnp.zeros((B, T, V)), TOK, M[:1]), "loss_mask"),
    (lambda: losses.entropy(jnp.zeros((B, T, V)), M[:, :, None]), "mask"),
    (lambda: losses.bradley_terry_loss(jnp.zeros((B, 1)), jnp.zeros(B)), "r_chosen"),
    (lambda: losses.bradley_terry_loss(jnp.zeros(B), jnp.zeros(B + 1)), "r_rejected"),
    (lambda: losses.ranking_loss(Z, TOK[:, :2]), "ranks"),
    (lambda: losses.ranking_loss(Z, TOK, M[:, :, None]), "valid"),
    (lambda: losses.best_of_k_loss(Z, jnp.zeros((B, 1), jnp.int32)), "best"),
    (lambda: losses.ppo_policy_loss(Z, Z, Z1, M, 0.2), "adv"),
    (lambda: losses.ppo_policy_loss(Z, Z, Z, M, jnp.ones(B)), "clip_eps"),
    (lambda: losses.ppo_value_loss(Z1, Z, Z, M, 0.2), "values"),
    (lambda: losses.ppo_value_loss(Z, Z, Z, M[:, :2], 0.2), "mask"),
])
def test_rank_errors_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"`{arg}` has shape"):
        call()


def test_public_reexports():
    import rlhf_jax
    assert rlhf_jax.ppo_policy_loss is losses.ppo_policy_loss
    assert rlhf_jax.gae is rlhf_jax.rl.gae and rlhf_jax.__version__
