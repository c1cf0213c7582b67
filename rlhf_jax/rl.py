"""RL math for RLHF as pure array functions: GAE, KL estimators and shaping, KL-coefficient
controllers, reward normalisation and response truncation (masked statistics: ``rlhf_jax.masked``).

Conventions: ``B`` batch, ``T`` tokens, ``K`` responses per prompt. A ``mask`` is True/nonzero on
real tokens and False/zero on padding; responses are right-padded (real tokens first). Every
reduction over tokens is masked, and a fully masked input reduces to 0, never NaN. Shapes are
checked at every public function: an array of the wrong rank (e.g. values ``[B, T, 1]`` against a
``[B, T]`` mask) raises ``ValueError`` instead of broadcasting.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# The masked statistics live in rlhf_jax.masked; they are re-exported here for convenience.
from rlhf_jax.masked import (as_bool, check_same_shape, check_shapes, explained_variance,
                             masked_mean, masked_sum, masked_var, masked_whiten)

Array = jax.Array

__all__ = [
    "check_shapes",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
    "gae",
    "KL_ESTIMATORS",
    "kl_estimate",
    "kl_shaped_rewards",
    "KLControllerState",
    "fixed_kl_controller",
    "adaptive_kl_controller",
    "kl_controller_update",
    "normalization_gain_bias",
    "truncate_after_eos",
    "apply_missing_eos_penalty",
]


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------
def gae(rewards: Array, values: Array, mask: Array, gamma: float | Array,
        lam: float | Array) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    With ``V_t`` set to 0 at and after the first padding position (the episode ends at the last real
    token, no bootstrap past it)::

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
        A_t = δ_t + γ·λ·m_{t+1}·A_{t+1}
        R_t = A_t + V_t                      (the value target, "returns")

    computed by ``lax.scan(reverse=True)`` over T. Responses must be right-padded (a row's real
    tokens form a prefix); a mask with holes truncates the episode at the first hole.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from :func:`kl_shaped_rewards`).
      values: ``[B, T]`` value predictions (squeeze a ``[B, T, 1]`` head output first).
      mask: ``[B, T]`` True on real response tokens.
      gamma: discount γ (scalar).
      lam: GAE λ (scalar).

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` and 0 on padding.
    """
    check_shapes("gae", [("rewards", rewards, "BT"), ("values", values, "BT"),
                         ("mask", mask, "BT"), ("gamma", gamma, ""), ("lam", lam, "")])
    dtype = jnp.result_type(rewards, values, jnp.float32)
    m = as_bool(mask)
    r = jnp.where(m, rewards, 0).astype(dtype)
    v = jnp.where(m, values, 0).astype(dtype)

    def step(carry, xs):
        next_value, next_adv = carry  # both already 0 past the end of the episode
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0)
        return (v_t, adv), adv

    zeros = jnp.zeros(r.shape[:1], dtype)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv_tb.T
    returns = jnp.where(m, adv + v, 0)
    return adv, returns


# --------------------------------------------------------------------------------------------
# KL estimators and shaping
# --------------------------------------------------------------------------------------------
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Array, ref_logp: Array, estimator: str = "k1",
                log_ratio_clip: float | None = 20.0) -> Array:
    """Per-token estimators of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL
    Divergence", 2020, http://joschu.net/blog/kl-approx.html). With ``log r = ref_logp − logp``::

        k1 = −log r           = logp − ref_logp       (unbiased, high variance, can be < 0)
        k2 = ½·(log r)²                                (biased, low variance, ≥ 0)
        k3 = (r − 1) − log r  = exp(ref − logp) − (ref − logp) − 1   (unbiased, ≥ 0)

    Args:
      logp: ``[...]`` log-probabilities of the sampled tokens under the policy.
      ref_logp: same shape, under the reference (SFT) policy.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      log_ratio_clip: k3 only: ``log r`` is clipped to ``[−c, c]`` before ``exp`` so that extreme
        log-probabilities (e.g. −1e4) give a large finite value instead of inf/NaN gradients
        (``exp(20) ≈ 4.9e8``). ``None`` disables the clip.

    Returns:
      Per-token KL estimates shaped like ``logp``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: `estimator` is {estimator!r}; expected one of "
                         f"{KL_ESTIMATORS}")
    check_same_shape("kl_estimate", logp, ref_logp, "logp", "ref_logp")
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    if log_ratio_clip is not None:
        log_r = jnp.clip(log_r, -log_ratio_clip, log_ratio_clip)
    return jnp.expm1(log_r) - log_r


def kl_shaped_rewards(score: Array, logp: Array, ref_logp: Array, mask: Array,
                      kl_coef: float | Array, estimator: str = "k1") -> tuple[Array, Array]:
    """Per-token RLHF rewards with a KL penalty to the reference policy (Ziegler et al. 2019,
    arXiv:1909.08593; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022)::

        r_t = −β·KL_t + [t = last real token]·score

    where ``KL_t`` is :func:`kl_estimate` on real tokens (0 on padding). A fully masked row gets no
    score and all-zero rewards.

    Args:
      score: ``[B]`` reward-model score of each response (after any missing-EOS penalty).
      logp: ``[B, T]`` policy log-probs of the response tokens (same temperature as sampling).
      ref_logp: ``[B, T]`` reference-policy log-probs.
      mask: ``[B, T]`` True on real response tokens (right-padded).
      kl_coef: β, scalar (a traced value from :class:`KLControllerState` is fine).
      estimator: ``"k1"`` (the papers'), ``"k2"`` or ``"k3"``.

    Returns:
      ``(rewards, kl)``, both ``[B, T]`` and 0 on padding; ``kl`` is the unscaled per-token
      estimate (sum over T for the per-sequence KL metric, e.g. ``masked_sum(kl, mask, 1)``).
    """
    check_shapes("kl_shaped_rewards", [("score", score, "B"), ("logp", logp, "BT"),
                                       ("ref_logp", ref_logp, "BT"), ("mask", mask, "BT"),
                                       ("kl_coef", kl_coef, "")])
    m = as_bool(mask)
    kl = jnp.where(m, kl_estimate(logp, ref_logp, estimator), 0)
    t = jnp.arange(m.shape[1])
    last = jnp.max(jnp.where(m, t[None, :], -1), axis=1)  # -1 for an empty row
    is_last = t[None, :] == last[:, None]
    rewards = -kl_coef * kl + jnp.where(is_last, score[:, None], 0)
    return rewards, kl


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class KLControllerState:
    """State of the KL coefficient β, a pytree usable inside ``jit``/``scan``.

    Attributes:
      value: current β (float32 scalar).
      target: adaptive only: the KL target (nats per sequence).
      horizon: adaptive only: the horizon H in samples.
      adaptive: static; False keeps β fixed.
    """
    value: Array
    target: Array
    horizon: Array
    adaptive: bool = flax.struct.field(pytree_node=False, default=False)


def fixed_kl_controller(value: float) -> KLControllerState:
    """A controller whose β never changes."""
    f = jnp.float32
    return KLControllerState(jnp.asarray(value, f), jnp.asarray(0.0, f), jnp.asarray(1.0, f),
                             adaptive=False)


def adaptive_kl_controller(init_value: float, target: float, horizon: float) -> KLControllerState:
    """The adaptive controller of Ziegler et al. 2019 (see :func:`kl_controller_update`)."""
    if not target > 0 or not horizon > 0:
        raise ValueError(f"adaptive_kl_controller: `target` ({target}) and `horizon` ({horizon}) "
                         "must be > 0")
    f = jnp.float32
    return KLControllerState(jnp.asarray(init_value, f), jnp.asarray(target, f),
                             jnp.asarray(horizon, f), adaptive=True)


def kl_controller_update(state: KLControllerState, current_kl: Array,
                         n_steps: int | Array) -> KLControllerState:
    """One controller update (Ziegler et al. 2019, arXiv:1909.08593, §2.2)::

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β·(1 + e·n / H)

    A fixed controller returns ``state`` unchanged.

    Args:
      state: the controller.
      current_kl: scalar, the mean per-sequence KL of the last batch.
      n_steps: scalar, the number of samples (episodes) in that batch.

    Returns:
      The updated state.
    """
    check_shapes("kl_controller_update", [("current_kl", current_kl, ""),
                                          ("n_steps", n_steps, "")])
    if not state.adaptive:
        return state
    err = jnp.clip(current_kl / state.target - 1.0, -0.2, 0.2)
    mult = 1.0 + err * n_steps / state.horizon
    return state.replace(value=(state.value * mult).astype(state.value.dtype))


# --------------------------------------------------------------------------------------------
# Reward normalisation
# --------------------------------------------------------------------------------------------
def normalization_gain_bias(scores: Array, current_gain: float | Array, current_bias: float | Array,
                            target_mean: float = 0.0, target_std: float = 1.0,
                            eps: float = 1e-8) -> tuple[Array, Array]:
    """New ``(gain, bias)`` of a head ``gain·raw + bias`` so its scores get a target mean and std
    on a reference set of samples (lm-human-preferences ``normalize_before/after``; Ziegler et al.
    2019). With μ, σ the mean and (population) std of the current ``scores``::

        gain' = gain·s / σ,    bias' = (bias − μ)·s / σ + m      (s = target_std, m = target_mean)

    so that ``gain'·raw + bias' = s·(score − μ)/σ + m``. σ is floored at ``eps``.

    Args:
      scores: ``[N]`` current head outputs on reference samples (policy samples of reference
        prompts).
      current_gain: scalar, the head's current gain.
      current_bias: scalar, the head's current bias.
      target_mean: desired mean m.
      target_std: desired std s.

    Returns:
      ``(gain, bias)`` scalars.
    """
    check_shapes("normalization_gain_bias", [("scores", scores, "N"),
                                             ("current_gain", current_gain, ""),
                                             ("current_bias", current_bias, "")])
    mean = jnp.mean(scores)
    std = jnp.maximum(jnp.std(scores), eps)
    scale = target_std / std
    return current_gain * scale, (current_bias - mean) * scale + target_mean


# --------------------------------------------------------------------------------------------
# Truncation and missing-EOS penalty
# --------------------------------------------------------------------------------------------
def truncate_after_eos(tokens: Array, eos_id: int, pad_id: int) -> tuple[Array, Array]:
    """Masks every token after the first ``eos_id`` of each row; the EOS itself is kept.

    ``mask_t = (no EOS at any s < t)``; masked tokens are replaced with ``pad_id``. This is also
    lm-human-preferences' ``truncate_token`` post-processing when called with that token.

    Args:
      tokens: ``[B, T]`` int sampled response tokens.
      eos_id: stop token id.
      pad_id: token written on masked positions.

    Returns:
      ``(tokens, mask)``, ``[B, T]`` int and ``[B, T]`` bool.
    """
    check_shapes("truncate_after_eos", [("tokens", tokens, "BT")])
    is_eos = (tokens == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    mask = eos_before == 0
    return jnp.where(mask, tokens, jnp.asarray(pad_id, tokens.dtype)), mask


def apply_missing_eos_penalty(scores: Array, contains_eos: Array,
                              penalty: float | Array) -> Array:
    """Replaces the score of responses that never emitted the stop token with ``penalty``.

    lm-human-preferences / Stiennon et al. 2020 give such truncated samples a fixed score
    (``penalty_reward_value``, e.g. −1) so the policy learns to finish its answers.

    Args:
      scores: ``[B]`` reward-model scores.
      contains_eos: ``[B]`` bool, whether the response contains the stop token.
      penalty: scalar score for responses without it.

    Returns:
      ``[B]`` scores.
    """
    check_shapes("apply_missing_eos_penalty", [("scores", scores, "B"),
                                               ("contains_eos", contains_eos, "B"),
                                               ("penalty", penalty, "")])
    return jnp.where(as_bool(contains_eos), scores, jnp.asarray(penalty, scores.dtype))


# --------------------------------------------------------------------------------------------
# Critic-free advantages: RLOO and GRPO
# --------------------------------------------------------------------------------------------
__all__ += ["kl_penalized_scores", "rloo_advantages", "grpo_advantages"]


def kl_penalized_scores(score: Array, logp: Array, ref_logp: Array, mask: Array,
                        kl_coef: float | Array, estimator: str = "k1") -> tuple[Array, Array]:
    """Sequence-level rewards with the KL penalty inside, as RLOO uses them (Ahmadian et al. 2024,
    arXiv:2402.14740, §3; the sequence-level form of :func:`kl_shaped_rewards`)::

        R = score − β·Σ_t m_t·KL_t

    Pass these (reshaped to ``[B, K]``) to :func:`rloo_advantages`. GRPO (Shao et al. 2024) instead
    keeps the KL out of the reward and adds ``β·losses.kl_penalty_loss`` to the loss.

    Args:
      score: ``[N]`` reward-model scores of N responses (e.g. ``N = B·K``, prompt-major).
      logp: ``[N, T]`` policy log-probs of the response tokens.
      ref_logp: ``[N, T]`` reference-policy log-probs.
      mask: ``[N, T]`` True on real response tokens.
      kl_coef: β, scalar.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`kl_estimate`).

    Returns:
      ``(scores, seq_kl)``, both ``[N]``: the penalised scores and the unscaled per-sequence KL.
    """
    check_shapes("kl_penalized_scores", [("score", score, "N"), ("logp", logp, "NT"),
                                         ("ref_logp", ref_logp, "NT"), ("mask", mask, "NT"),
                                         ("kl_coef", kl_coef, "")])
    m = as_bool(mask)
    seq_kl = masked_sum(kl_estimate(jnp.where(m, logp, 0), jnp.where(m, ref_logp, 0), estimator),
                        m, axis=1)
    return score - kl_coef * seq_kl, seq_kl


def _group_valid(fn: str, scores: Array, valid: Array | None) -> Array:
    dims = check_shapes(fn, [("scores", scores, "BK")] +
                        ([] if valid is None else [("valid", valid, "BK")]))
    if dims["K"] < 2:
        raise ValueError(f"{fn}: `scores` has shape {tuple(jnp.shape(scores))}; expected K ≥ 2 "
                         "responses per prompt (a group of one has no baseline)")
    return jnp.ones(jnp.shape(scores), bool) if valid is None else as_bool(valid)


def rloo_advantages(scores: Array, valid: Array | None = None) -> Array:
    """REINFORCE leave-one-out advantages (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
    baseline for free!"; RLOO, Ahmadian et al. 2024, arXiv:2402.14740, eq. 7). With K responses to
    a prompt, each is baselined by the mean score of the other K − 1::

        A_i = r_i − 1/(K−1)·Σ_{j≠i} r_j  =  K/(K−1)·(r_i − mean_k r_k)

    so the advantages of a group sum to 0 and the baseline never depends on the sample it
    baselines (the REINFORCE gradient stays unbiased). The KL enters through the scores, as in the
    RLOO paper: pass ``kl_penalized_scores(...)`` reshaped to ``[B, K]``. Each response's
    advantage is then used for all its tokens, e.g. ``jnp.where(mask, adv.reshape(-1, 1), 0)``
    for ``losses.ppo_policy_loss`` (or a plain REINFORCE loss).

    Args:
      scores: ``[B, K]`` sequence rewards of K ≥ 2 responses per prompt.
      valid: optional ``[B, K]``, False for missing responses: only the ``n_b`` valid responses of
        a prompt form its group (``K`` becomes ``n_b``); invalid entries, and groups with fewer
        than two valid responses, get advantage 0.

    Returns:
      ``[B, K]`` advantages.
    """
    v = _group_valid("rloo_advantages", scores, valid)
    r = jnp.where(v, scores, 0)
    n = jnp.sum(v, axis=1, keepdims=True)
    total = jnp.sum(r, axis=1, keepdims=True)
    baseline = (total - r) / jnp.maximum(n - 1, 1).astype(r.dtype)
    return jnp.where(v & (n >= 2), r - baseline, 0)


def grpo_advantages(scores: Array, eps: float = 1e-4, scale: bool = True,
                    valid: Array | None = None, unbiased: bool = False) -> Array:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2,
    outcome supervision): each response's score normalised within its prompt's group ::

        A_i = (r_i − mean_k r_k) / (std_k r_k + eps)        (scale=True, GRPO)
        A_i =  r_i − mean_k r_k                              (scale=False, Dr. GRPO: Liu et al.
                                                              2025, arXiv:2503.20783)

    ``std`` is the population std (``ddof=0``) by default; ``unbiased=True`` uses ``ddof=1`` as
    TRL's ``GRPOTrainer`` does (``torch.std``). A group whose scores are all equal gets advantage 0
    (no signal, and no 0/0 with ``eps=0``). In GRPO the KL is not in the reward but a separate
    loss term, ``β·losses.kl_penalty_loss`` (k3 estimator); broadcast the advantages over tokens as
    for :func:`rloo_advantages`.

    Args:
      scores: ``[B, K]`` sequence rewards of K ≥ 2 responses per prompt.
      eps: added to the std (scale=True only).
      scale: divide by the group std (GRPO) or only centre (Dr. GRPO).
      valid: optional ``[B, K]``, False for missing responses: the statistics use the valid
        responses of each group; invalid entries, and groups with fewer than two valid responses,
        get advantage 0.
      unbiased: Bessel-corrected group std.

    Returns:
      ``[B, K]`` advantages.
    """
    v = _group_valid("grpo_advantages", scores, valid)
    r = jnp.where(v, scores, 0)
    n = jnp.sum(v, axis=1, keepdims=True)
    mean = jnp.sum(r, axis=1, keepdims=True) / jnp.maximum(n, 1).astype(r.dtype)
    centred = jnp.where(v, r - mean, 0)
    hi = jnp.max(jnp.where(v, r, -jnp.inf), axis=1, keepdims=True)
    lo = jnp.min(jnp.where(v, r, jnp.inf), axis=1, keepdims=True)
    live = v & (n >= 2) & (hi > lo)  # all-equal groups carry no signal
    if not scale:
        return jnp.where(live, centred, 0)
    ddof = 1 if unbiased else 0
    var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / jnp.maximum(n - ddof, 1)
    var = jnp.where(live, var, 1.0)  # keeps the sqrt's gradient finite on dead groups
    return jnp.where(live, centred / (jnp.sqrt(var) + eps), 0)
