"""Best-of-N sampling against a reward model: a baseline policy with no training.

Sample N responses per prompt from the base (SFT) policy and keep the one the reward model scores
highest. Its KL to the base policy is analytic, ``log N − (N−1)/N`` (:func:`rlhf_jax.stats.
best_of_n_kl`), so best-of-N traces a gold-vs-KL curve for free (Stiennon et al. 2020; Gao et
al. 2022). :func:`sample_scored` draws M samples per prompt; :func:`curve` turns them into the
expected proxy and gold score of best-of-n for every n ≤ M with the unbiased order-statistics
estimator (:func:`rlhf_jax.stats.best_of_n_expectation`).
"""
from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import stats
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.scoring import RewardScorer


def sample_scored(lm_def: nnx.GraphDef, params, reward: RewardScorer, rm_params,
                  prompt_bt: jax.Array, prompt_mask_bt: jax.Array, key: jax.Array,
                  scfg: SamplingConfig, m: int):
    """``(tokens [B, M, Tr], mask [B, M, Tr], scores [B, M])``: M samples per prompt and their
    reward-model scores (jit it with ``m`` and ``scfg`` static)."""
    b, tq = prompt_bt.shape
    rep = lambda x: jnp.repeat(x, m, axis=0)  # noqa: E731  [B*M, Tq], prompt-major
    out = sample_split(lm_def, params, rep(prompt_bt), rep(prompt_mask_bt), key, scfg)
    scores = reward(rm_params, rep(prompt_bt), rep(prompt_mask_bt), out.tokens, out.mask)
    tr = out.tokens.shape[1]
    return (out.tokens.reshape(b, m, tr), out.mask.reshape(b, m, tr), scores.reshape(b, m))


def select_best(tokens_bmt, mask_bmt, scores_bm):
    """The best-of-M response per prompt: ``(tokens [B, Tr], mask [B, Tr])``."""
    best = jnp.argmax(scores_bm, axis=1)
    take = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)[:, 0]  # noqa: E731
    return take(tokens_bmt), take(mask_bmt)


def curve(proxy_pm: np.ndarray, gold_pm: np.ndarray | None,
          ns=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> list[dict]:
    """Rows ``{n, kl, proxy, gold}`` of best-of-n for each ``n ≤ M`` (expected over prompts)."""
    m = proxy_pm.shape[1]
    rows = []
    for n in ns:
        if n > m:
            break
        e = stats.best_of_n_expectation(proxy_pm, n, gold_pm)
        rows.append({"n": n, "kl": float(e["kl"]), "proxy": float(e["proxy"]),
                     "gold": float(e["gold"]) if "gold" in e else None})
    return rows
