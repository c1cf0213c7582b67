"""RLHF losses as pure array functions: LM (SFT), reward model (Bradley–Terry, rankings, best-of-K)
and PPO (clipped policy and value losses), plus token log-probs and entropy from logits.

Every loss takes arrays (never a model) and returns ``(loss, metrics)`` where ``metrics`` is a flat
dict of scalars with namespaced keys (``lm/…``, ``rm/…``, ``ppo/…``, ``ppo/val/…``). Dimension
names: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``K`` responses per prompt. Masks are True on
real entries; all token reductions are masked and fully masked inputs give 0, not NaN. Ranks are
checked: e.g. values ``[B, T, 1]`` against a ``[B, T]`` mask raise ``ValueError``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.masked import as_bool, check_shapes, explained_variance, masked_mean, masked_var

Array = jax.Array
Metrics = dict[str, Array]

__all__ = [
    "token_logprobs",
    "token_entropy",
    "entropy",
    "lm_loss",
    "bradley_terry_loss",
    "ranking_pairs",
    "ranking_loss",
    "best_of_k_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]


# --------------------------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------------------------
def token_logprobs(logits: Array, tokens: Array, temperature: float | Array = 1.0) -> Array:
    """Log-probability of each token under its own position's logits::

        logp[b, t] = log_softmax(logits[b, t] / τ)[tokens[b, t]]
                   = z[tokens] − logsumexp(z),   z = logits[b, t] / τ

    No shift is applied: to score the tokens a causal LM *predicts*, pass
    ``token_logprobs(logits[:, :-1], tokens[:, 1:])`` (logits at t predict the token at t+1).
    lm-human-preferences divides by the sampling temperature τ for both the policy and the
    reference model, so the PPO ratio and the KL use the distribution that was sampled.

    Args:
      logits: ``[B, T, V]`` float.
      tokens: ``[B, T]`` int token ids in ``[0, V)``.
      temperature: τ > 0, scalar.

    Returns:
      ``[B, T]`` float32 log-probs.
    """
    check_shapes("token_logprobs", [("logits", logits, "BTV"), ("tokens", tokens, "BT"),
                                    ("temperature", temperature, "")])
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits: Array, temperature: float | Array = 1.0) -> Array:
    """Entropy of each position's categorical ``H = −Σ_v p_v log p_v``, ``p = softmax(logits/τ)``.

    Terms with ``p_v = 0`` (e.g. ``−inf`` or hugely negative logits) contribute 0.

    Args:
      logits: ``[B, T, V]``.
      temperature: τ > 0, scalar.

    Returns:
      ``[B, T]`` entropies in nats.
    """
    check_shapes("token_entropy", [("logits", logits, "BTV"), ("temperature", temperature, "")])
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(p * jnp.where(p > 0, logp, 0), axis=-1)


def entropy(logits: Array, mask: Array, temperature: float | Array = 1.0) -> Array:
    """Masked mean of :func:`token_entropy` over real tokens (a scalar, not a ``(loss, metrics)``
    pair: use it as a metric or an entropy bonus, e.g. ``loss − c·entropy(...)``).

    Args:
      logits: ``[B, T, V]``.
      mask: ``[B, T]`` True on tokens whose predictive distribution counts.
      temperature: τ > 0, scalar.

    Returns:
      Scalar mean entropy in nats (0 if ``mask`` is all False).
    """
    check_shapes("entropy", [("logits", logits, "BTV"), ("mask", mask, "BT")])
    return masked_mean(token_entropy(logits, temperature), mask)


def lm_loss(logits: Array, tokens: Array, loss_mask: Array,
            temperature: float | Array = 1.0) -> tuple[Array, Metrics]:
    """Masked next-token cross-entropy (SFT on demonstrations, InstructGPT §3.5).

    Shift convention: ``logits[:, t]`` predicts ``tokens[:, t+1]``, and ``loss_mask[:, t]`` marks
    ``tokens[:, t]`` as a *target* (aligned with ``tokens``, e.g. 1 on response tokens and 0 on the
    prompt and padding). ``loss_mask[:, 0]`` is ignored since nothing predicts the first token::

        loss = − Σ_{t≥1} m_t · log softmax(logits[:, t−1] / τ)[tokens[:, t]]  /  Σ_{t≥1} m_t

    i.e. the mean over all target tokens of the batch (0 if there are none).

    Args:
      logits: ``[B, T, V]`` logits of the model run on ``tokens``.
      tokens: ``[B, T]`` int input/target ids.
      loss_mask: ``[B, T]`` True on target tokens.
      temperature: τ > 0 (1 for SFT).

    Returns:
      ``(loss, metrics)`` with ``lm/loss``, ``lm/accuracy`` (argmax == target, over targets) and
      ``lm/num_tokens``.
    """
    check_shapes("lm_loss", [("logits", logits, "BTV"), ("tokens", tokens, "BT"),
                             ("loss_mask", loss_mask, "BT"), ("temperature", temperature, "")])
    logp = token_logprobs(logits[:, :-1], tokens[:, 1:], temperature)
    m = as_bool(loss_mask)[:, 1:]
    loss = -masked_mean(logp, m)
    correct = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    metrics = {
        "lm/loss": loss,
        "lm/accuracy": masked_mean(correct.astype(jnp.float32), m),
        "lm/num_tokens": jnp.sum(m).astype(jnp.float32),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------------
def _pair_accuracy(diff: Array) -> Array:
    # A tie counts as half right: a constant reward model scores 0.5, not 0 or 1.
    return jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(jnp.float32)


def bradley_terry_loss(r_chosen: Array, r_rejected: Array, margin: float | Array = 0.0,
                       mask: Array | None = None) -> tuple[Array, Metrics]:
    """Bradley–Terry pairwise reward-model loss (Stiennon et al. 2020; InstructGPT, Ouyang et al.
    2022; the margin variant of Llama 2, Touvron et al. 2023)::

        loss = mean_b −log σ(r_chosen − r_rejected − margin)

    computed with ``jax.nn.log_sigmoid`` (finite for differences of ±1e4).

    Args:
      r_chosen: ``[B]`` rewards of the preferred responses.
      r_rejected: ``[B]`` rewards of the other responses.
      margin: scalar or ``[B]`` required margin.
      mask: optional ``[B]``, True on real pairs (padding pairs are ignored).

    Returns:
      ``(loss, metrics)`` with ``rm/loss``, ``rm/accuracy`` (fraction with
      ``r_chosen > r_rejected``, ties 0.5), ``rm/reward_margin`` (mean ``r_chosen − r_rejected``),
      ``rm/chosen_mean``, ``rm/rejected_mean``.
    """
    specs = [("r_chosen", r_chosen, "B"), ("r_rejected", r_rejected, "B"),
             ("margin", margin, "B" if jnp.ndim(margin) else "")]
    if mask is not None:
        specs.append(("mask", mask, "B"))
    check_shapes("bradley_terry_loss", specs)
    m = jnp.ones(jnp.shape(r_chosen), bool) if mask is None else as_bool(mask)
    diff = r_chosen - r_rejected
    loss = masked_mean(-jax.nn.log_sigmoid(diff - margin), m)
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": masked_mean(_pair_accuracy(diff), m),
        "rm/reward_margin": masked_mean(diff, m),
        "rm/chosen_mean": masked_mean(r_chosen, m),
        "rm/rejected_mean": masked_mean(r_rejected, m),
    }
    return loss, metrics


def ranking_pairs(ranks: Array,
                  valid: Array | None = None) -> tuple[np.ndarray, np.ndarray, Array, Array]:
    """All K·(K−1)/2 pairs implied by per-prompt rankings (InstructGPT §3.5).

    Args:
      ranks: ``[B, K]`` int, the labeler's rank of each response (0 = best, equal = tie).
      valid: optional ``[B, K]`` bool, False for missing responses (prompts with fewer than K).

    Returns:
      ``(i, j, i_wins, pair_mask)``: ``i``, ``j`` are static ``[P]`` index arrays with ``i < j``
      (``P = K(K−1)/2``); ``i_wins`` ``[B, P]`` is True where response ``i`` ranks better than
      ``j``; ``pair_mask`` ``[B, P]`` is True where both responses are valid and not tied.
    """
    dims = check_shapes("ranking_pairs", [("ranks", ranks, "BK")] +
                        ([] if valid is None else [("valid", valid, "BK")]))
    i, j = np.triu_indices(dims["K"], k=1)
    ri, rj = ranks[:, i], ranks[:, j]
    pair_mask = ri != rj
    if valid is not None:
        v = as_bool(valid)
        pair_mask = pair_mask & v[:, i] & v[:, j]
    return i, j, ri < rj, pair_mask


def ranking_loss(rewards: Array, ranks: Array, valid: Array | None = None) -> tuple[Array, Metrics]:
    """Bradley–Terry loss over every pair a ranking of K responses implies (InstructGPT, Ouyang et
    al. 2022, eq. 1)::

        loss = mean_{prompts with ≥1 pair}  mean_{(w, l) ranked pairs of the prompt}
               −log σ(r_w − r_l)

    Each prompt is weighted once regardless of how many pairs it yields (InstructGPT trains on all
    pairs of a prompt as one batch element to avoid overfitting to correlated pairs). Tied pairs and
    pairs involving an invalid response are ignored.

    Args:
      rewards: ``[B, K]`` reward-model scores of the K responses to each prompt.
      ranks: ``[B, K]`` int ranks (0 = best, equal = tie).
      valid: optional ``[B, K]`` bool, False for padding responses.

    Returns:
      ``(loss, metrics)`` with ``rm/loss``, ``rm/accuracy`` (weighted like the loss; ties in reward
      count 0.5) and ``rm/num_pairs``.
    """
    check_shapes("ranking_loss", [("rewards", rewards, "BK"), ("ranks", ranks, "BK")] +
                 ([] if valid is None else [("valid", valid, "BK")]))
    i, j, i_wins, pair_mask = ranking_pairs(ranks, valid)
    d = rewards[:, i] - rewards[:, j]
    diff = jnp.where(i_wins, d, -d)  # r_winner − r_loser, [B, P]
    per_pair = -jax.nn.log_sigmoid(diff)
    n_pairs = jnp.sum(pair_mask, axis=1)
    has_pairs = n_pairs > 0
    per_prompt_loss = masked_mean(per_pair, pair_mask, axis=1)
    per_prompt_acc = masked_mean(_pair_accuracy(diff), pair_mask, axis=1)
    loss = masked_mean(per_prompt_loss, has_pairs)
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": masked_mean(per_prompt_acc, has_pairs),
        "rm/num_pairs": jnp.sum(n_pairs).astype(jnp.float32),
    }
    return loss, metrics


def best_of_k_loss(rewards: Array, best: Array,
                   valid: Array | None = None) -> tuple[Array, Metrics]:
    """Best-of-K softmax loss of lm-human-preferences (Ziegler et al. 2019, §2.1)::

        loss = mean_b −log softmax(r_b)[best_b]

    i.e. softmax cross-entropy with the rewards of the K responses as logits and the labeler's
    choice as the label (K = 2 is the Bradley–Terry loss).

    Args:
      rewards: ``[B, K]`` scores.
      best: ``[B]`` int index of the chosen response.
      valid: optional ``[B, K]`` bool; invalid responses are excluded from the softmax (the chosen
        one must be valid). Rows without any valid response are ignored.

    Returns:
      ``(loss, metrics)`` with ``rm/loss`` and ``rm/accuracy`` (argmax of the rewards == best).
    """
    check_shapes("best_of_k_loss", [("rewards", rewards, "BK"), ("best", best, "B")] +
                 ([] if valid is None else [("valid", valid, "BK")]))
    best = best.astype(jnp.int32)
    if valid is None:
        v = jnp.ones(jnp.shape(rewards), bool)
    else:
        v = as_bool(valid)
    z = jnp.where(v, rewards, -jnp.inf)
    row = jnp.any(v, axis=1)
    lse = jax.nn.logsumexp(jnp.where(row[:, None], z, 0), axis=1)
    picked = jnp.take_along_axis(rewards, best[:, None], axis=1)[:, 0]
    nll = lse - picked
    correct = (jnp.argmax(z, axis=1) == best).astype(jnp.float32)
    loss = masked_mean(nll, row)
    return loss, {"rm/loss": loss, "rm/accuracy": masked_mean(correct, row)}


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------
def ppo_policy_loss(logp: Array, old_logp: Array, adv: Array, mask: Array,
                    clip_eps: float | Array, dual_clip: float | None = None,
                    log_ratio_clip: float | None = 20.0) -> tuple[Array, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), per token, masked mean::

        ρ_t = exp(logp_t − old_logp_t)
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))
        dual clip (Ye et al. 2020, arXiv:1912.09729), for A_t < 0:  L_t ← min(L_t, c·|A_t|)

    ``old_logp`` and ``adv`` are treated as constants (``stop_gradient``).

    Args:
      logp: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logp: ``[B, T]`` log-probs under the policy that sampled them.
      adv: ``[B, T]`` advantages (usually whitened with ``rl.masked_whiten``).
      mask: ``[B, T]`` True on response tokens.
      clip_eps: ε, scalar.
      dual_clip: c > 1 or None (off).
      log_ratio_clip: ``logp − old_logp`` is clipped to ``[−c, c]`` before ``exp`` so a wildly
        off-policy token gives a large finite loss instead of inf/NaN (``None`` disables).

    Returns:
      ``(loss, metrics)`` with ``ppo/policy_loss``, ``ppo/clipfrac`` (fraction of tokens where the
      clipped term is active), ``ppo/approxkl`` (``½·mean(Δlogp²)``), ``ppo/ratio_mean``,
      ``ppo/ratio_var`` and, with dual clip, ``ppo/dual_clipfrac``.
    """
    check_shapes("ppo_policy_loss", [("logp", logp, "BT"), ("old_logp", old_logp, "BT"),
                                     ("adv", adv, "BT"), ("mask", mask, "BT"),
                                     ("clip_eps", clip_eps, "")])
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"ppo_policy_loss: `dual_clip` is {dual_clip}; expected a value > 1 "
                         "(or None)")
    old_logp = jax.lax.stop_gradient(old_logp)
    adv = jax.lax.stop_gradient(adv)
    log_ratio = logp - old_logp
    if log_ratio_clip is not None:
        log_ratio = jnp.clip(log_ratio, -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {}
    if dual_clip is not None:
        bound = dual_clip * jnp.abs(adv)
        dual_active = (adv < 0) & (per_token > bound)
        per_token = jnp.where(dual_active, bound, per_token)
        metrics["ppo/dual_clipfrac"] = masked_mean(dual_active.astype(jnp.float32), mask)
    loss = masked_mean(per_token, mask)
    delta = jax.lax.stop_gradient(logp - old_logp)
    r = jax.lax.stop_gradient(ratio)
    metrics.update({
        "ppo/policy_loss": loss,
        "ppo/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "ppo/approxkl": 0.5 * masked_mean(jnp.square(delta), mask),
        "ppo/ratio_mean": masked_mean(r, mask),
        "ppo/ratio_var": masked_var(r, mask, unbiased=False),
    })
    return loss, metrics


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                   clip_eps: float | Array) -> tuple[Array, Metrics]:
    """Clipped value loss (Schulman et al. 2017 PPO as implemented in OpenAI baselines and
    lm-human-preferences, Ziegler et al. 2019)::

        V^clip_t = old_V_t + clip(V_t − old_V_t, −ε, ε)
        loss = ½ · mean_t max((V_t − R_t)², (V^clip_t − R_t)²)

    ``old_values`` and ``returns`` are treated as constants.

    Args:
      values: ``[B, T]`` current value predictions (squeeze the head's ``[B, T, 1]`` first).
      old_values: ``[B, T]`` values at rollout time.
      returns: ``[B, T]`` value targets (from :func:`rlhf_jax.rl.gae`).
      mask: ``[B, T]`` True on response tokens.
      clip_eps: ε for the value clip, scalar.

    Returns:
      ``(loss, metrics)`` with ``ppo/val/loss``, ``ppo/val/clipfrac`` (fraction where the clipped
      error is the larger), ``ppo/val/vpred`` (mean V), ``ppo/val/error`` (mean squared error) and
      ``ppo/val/explained_var``.
    """
    check_shapes("ppo_value_loss", [("values", values, "BT"), ("old_values", old_values, "BT"),
                                    ("returns", returns, "BT"), ("mask", mask, "BT"),
                                    ("clip_eps", clip_eps, "")])
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    v_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err = jnp.square(values - returns)
    err_clipped = jnp.square(v_clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    v = jax.lax.stop_gradient(values)
    metrics = {
        "ppo/val/loss": loss,
        "ppo/val/clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), mask),
        "ppo/val/vpred": masked_mean(v, mask),
        "ppo/val/error": masked_mean(jax.lax.stop_gradient(err), mask),
        "ppo/val/explained_var": explained_variance(v, returns, mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Direct preference optimisation and the KL loss term of critic-free RL
# --------------------------------------------------------------------------------------------
__all__ += ["DPO_LOSS_TYPES", "dpo_loss", "kl_penalty_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, beta: float | Array, label_smoothing: float | Array = 0.0,
             loss_type: str = "sigmoid", mask: Array | None = None) -> tuple[Array, Metrics]:
    """Direct preference optimisation on sequence log-probabilities. With the log-ratio margin ::

        h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))

    ``loss_type="sigmoid"`` is DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) with the
    conservative-DPO label smoothing ε (labels flipped with probability ε)::

        loss = mean_b  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    i.e. a Bradley–Terry loss on the implicit reward ``β·log(π/π_ref)`` (ε = 0 is plain DPO), and
    ``loss_type="ipo"`` is IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17), a squared loss that
    regresses the margin to a finite target instead of pushing it to infinity::

        loss = mean_b  (h − 1/(2β))²

    Both are computed on whatever log-probabilities are passed: summed over the response tokens
    for DPO as in the paper (the IPO paper, and TRL's implementation, use per-token means; pass
    those for that variant). The reference log-probs are constants (``stop_gradient``).

    Args:
      policy_chosen_logps: ``[B]`` ``log π(y_c|x)`` of the preferred responses, e.g.
        ``masked_sum(token_logprobs(...), response_mask, axis=1)``.
      policy_rejected_logps: ``[B]`` ``log π(y_r|x)`` of the other responses.
      ref_chosen_logps: ``[B]`` the same under the frozen reference (SFT) policy.
      ref_rejected_logps: ``[B]``.
      beta: β > 0, scalar (the KL-regularisation strength; 0.1 in the DPO paper).
      label_smoothing: ε in ``[0, ½]``, scalar, sigmoid loss only.
      loss_type: one of :data:`DPO_LOSS_TYPES` (static).
      mask: optional ``[B]``, True on real pairs (padding pairs are ignored).

    Returns:
      ``(loss, metrics)`` with ``dpo/loss``, ``dpo/rewards_chosen`` and ``dpo/rewards_rejected``
      (means of the implicit rewards ``β·(log π − log π_ref)``), ``dpo/accuracy`` (fraction of
      pairs whose chosen reward is the larger, ties 0.5 as ``rm/accuracy``), ``dpo/margin`` (mean
      ``β·h``), ``dpo/logps_chosen`` and ``dpo/logps_rejected`` (means of the policy log-probs).

    Raises:
      ValueError: for an unknown ``loss_type``, label smoothing with IPO, or a concrete ``beta``
        ≤ 0 or ε outside ``[0, ½]``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: `loss_type` is {loss_type!r}; expected one of "
                         f"{DPO_LOSS_TYPES}")
    specs = [("policy_chosen_logps", policy_chosen_logps, "B"),
             ("policy_rejected_logps", policy_rejected_logps, "B"),
             ("ref_chosen_logps", ref_chosen_logps, "B"),
             ("ref_rejected_logps", ref_rejected_logps, "B"), ("beta", beta, ""),
             ("label_smoothing", label_smoothing, "")]
    if mask is not None:
        specs.append(("mask", mask, "B"))
    check_shapes("dpo_loss", specs)
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"dpo_loss: `beta` is {beta}; expected a value > 0")
    if isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"dpo_loss: `label_smoothing` is {label_smoothing}; expected a value "
                             "in [0, 0.5]")
        if loss_type == "ipo" and label_smoothing != 0:
            raise ValueError("dpo_loss: `label_smoothing` applies to loss_type='sigmoid' only; "
                             f"got {label_smoothing} with loss_type='ipo'")
    m = jnp.ones(jnp.shape(policy_chosen_logps), bool) if mask is None else as_bool(mask)
    # Zero the padding pairs first: `where` on the loss alone would still give NaN gradients.
    pol_c, pol_r, ref_c, ref_r = (jnp.where(m, x, 0) for x in (
        policy_chosen_logps, policy_rejected_logps, jax.lax.stop_gradient(ref_chosen_logps),
        jax.lax.stop_gradient(ref_rejected_logps)))
    chosen_ratio = pol_c - ref_c
    rejected_ratio = pol_r - ref_r
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) -
                    label_smoothing * jax.nn.log_sigmoid(-beta * h))
    else:
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    loss = masked_mean(per_pair, m)
    r_c = jax.lax.stop_gradient(beta * chosen_ratio)
    r_r = jax.lax.stop_gradient(beta * rejected_ratio)
    metrics = {
        "dpo/loss": loss,
        "dpo/rewards_chosen": masked_mean(r_c, m),
        "dpo/rewards_rejected": masked_mean(r_r, m),
        "dpo/accuracy": masked_mean(_pair_accuracy(r_c - r_r), m),
        "dpo/margin": masked_mean(r_c - r_r, m),
        "dpo/logps_chosen": masked_mean(jax.lax.stop_gradient(pol_c), m),
        "dpo/logps_rejected": masked_mean(jax.lax.stop_gradient(pol_r), m),
    }
    return loss, metrics


def kl_penalty_loss(logp: Array, ref_logp: Array, mask: Array,
                    log_ratio_clip: float | None = 20.0) -> tuple[Array, Metrics]:
    """The KL term GRPO adds to its loss (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq.
    4): the masked token mean of the k3 estimator of KL(π ‖ π_ref) (Schulman 2020) ::

        k3_t = exp(ref_logp_t − logp_t) − (ref_logp_t − logp_t) − 1   (≥ 0, unbiased under π)
        loss = Σ_t m_t·k3_t / Σ_t m_t

    the same per-token estimate as ``rl.kl_estimate(..., "k3")``, normalised like
    :func:`ppo_policy_loss` (a mean over all real tokens of the batch), so the GRPO objective is
    ``ppo_policy_loss(...)[0] + β·kl_penalty_loss(...)[0]`` with the sequence advantages of
    ``rl.grpo_advantages`` repeated over each response's tokens. (PPO and RLOO instead subtract
    the KL from the reward: ``rl.kl_shaped_rewards``, ``rl.kl_penalized_scores``.)
    ``ref_logp`` is a constant (``stop_gradient``); the gradient of ``k3_t`` with respect to
    ``logp_t`` is ``1 − π_ref/π``.

    Args:
      logp: ``[B, T]`` log-probs of the sampled tokens under the current policy.
      ref_logp: ``[B, T]`` the same under the reference policy.
      mask: ``[B, T]`` True on response tokens.
      log_ratio_clip: ``ref_logp − logp`` is clipped to ``[−c, c]`` before ``exp`` so extreme
        log-probs give a large finite loss rather than inf/NaN (``None`` disables); the gradient
        is 0 where the clip is active.

    Returns:
      ``(loss, metrics)`` with ``kl/loss`` (the k3 mean) and ``kl/k1`` (masked mean of
      ``logp − ref_logp``, the plain estimate, for monitoring).
    """
    check_shapes("kl_penalty_loss", [("logp", logp, "BT"), ("ref_logp", ref_logp, "BT"),
                                     ("mask", mask, "BT")])
    m = as_bool(mask)
    log_r = jax.lax.stop_gradient(ref_logp) - logp
    log_r = jnp.where(m, log_r, 0)  # padding can hold anything, even inf
    if log_ratio_clip is not None:
        log_r = jnp.clip(log_r, -log_ratio_clip, log_ratio_clip)
    k3 = jnp.expm1(log_r) - log_r
    loss = masked_mean(k3, m)
    metrics = {
        "kl/loss": loss,
        "kl/k1": masked_mean(jax.lax.stop_gradient(logp - ref_logp), m),
    }
    return loss, metrics
