"""A reward head fitted on frozen features.

The reward model's backbone stays frozen; each response's pooled hidden states are computed once
(:meth:`rlhf_jax.scoring.RewardScorer.pooled_features`), and a linear head on them is fitted to
the rankings by the Bradley–Terry loss (:func:`rlhf_jax.losses.ranking_loss`) plus an L2
penalty, to convergence, by L-BFGS. The penalty is chosen by K-fold cross-validation over
prompts: every (penalty, fold) pair is one fit, and all of them run as one vmapped program.

Why: a reward model fine-tuned for one epoch on a few hundred ranked prompts can stay at chance
(the first LoRA chat run did: 0.49 pair accuracy against gold after 16 steps), and more epochs
cost a forward and backward pass of the whole model per step. Fitting the head on cached
features costs one forward pass per response, and the fit itself takes seconds. For a linear
head, pooling commutes with the head (:func:`rlhf_jax.scoring.pool_features`), so the fitted
head scores text exactly as the assembled reward model does.

Features are standardised (mean 0, std 1 per dimension over the training responses) before
fitting, so one penalty scale suits every layer; :func:`unstandardize` folds the standardisation
back into the head's ``w`` and ``b``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses
from rlhf_jax.masked import check_shapes

L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Default penalties tried (on the mean per-prompt loss, for standardised features)."""


class HeadFit(NamedTuple):
    """A fitted head and how its penalty was chosen."""
    w: np.ndarray
    """``[D]`` weights on the raw (unstandardised) features."""
    b: float
    """Offset (``-w·mean``; Bradley–Terry is blind to it, normalisation sets the scale later)."""
    l2: float
    """The penalty chosen: lowest mean held-out loss over the folds."""
    cv: list[dict]
    """Per penalty: ``l2``, held-out ``loss`` and pair ``accuracy`` (means over folds)."""
    train_loss: float
    train_accuracy: float
    """Of the final fit on every training prompt (against the labels it was fitted to)."""


def standardize(x_nkd: np.ndarray, valid_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], std [D])`` over the valid responses (std floored at 1e-6)."""
    rows = np.asarray(x_nkd, np.float64)[np.asarray(valid_nk, bool)]
    return rows.mean(0), np.maximum(rows.std(0), 1e-6)


def unstandardize(w: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, float]:
    """``(w_raw, b)`` with ``w_raw·x + b == w·(x − mean)/std`` for every ``x``."""
    w_raw = np.asarray(w, np.float64) / std
    return w_raw.astype(np.float32), float(-w_raw @ mean)


def fit_head(x_nkd: jax.Array, ranks_nk: jax.Array, valid_nk: jax.Array, l2: jax.Array,
             steps: int = 100) -> jax.Array:
    """``w [D]`` minimising ``ranking_loss(x·w, ranks, valid) + l2/2·|w|²`` (``steps`` L-BFGS
    steps from zero; the problem is convex). Jit- and vmap-able over ``valid`` and ``l2``."""
    check_shapes("fit_head", [("x_nkd", x_nkd, "NKD"), ("ranks_nk", ranks_nk, "NK"),
                              ("valid_nk", valid_nk, "NK")])

    def loss(w):
        return (losses.ranking_loss(x_nkd @ w, ranks_nk, valid_nk)[0]
                + 0.5 * l2 * jnp.sum(w * w))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(w, updates), state), None

    w0 = jnp.zeros(x_nkd.shape[-1], jnp.float32)
    (w, _), _ = jax.lax.scan(step, (w0, opt.init(w0)), None, length=steps)
    return w


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """``[N]`` fold of each prompt: a seeded permutation dealt round-robin."""
    ids = np.empty(n, np.int32)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def cross_validated_head(x_nkd: np.ndarray, ranks_nk: np.ndarray, valid_nk: np.ndarray, *,
                         l2_grid: Sequence[float] = L2_GRID, folds: int = 4, seed: int = 0,
                         steps: int = 100) -> HeadFit:
    """Chooses the penalty by ``folds``-fold cross-validation over prompts, then fits the head on
    every prompt with it.

    Args:
      x_nkd: ``[N, K, D]`` pooled features of the K responses to each of N prompts.
      ranks_nk: ``[N, K]`` ranks (0 = best; ties give no pair).
      valid_nk: ``[N, K]`` False for padding responses.
      l2_grid: penalties to try (for standardised features; see the module doc).
      folds: at least 2 and at most N.
      seed: the fold assignment.
    """
    n = len(x_nkd)
    if not 2 <= folds <= n:
        raise ValueError(f"cross_validated_head: folds={folds} needs 2 <= folds <= N={n}")
    if not l2_grid or min(l2_grid) < 0:
        raise ValueError(f"cross_validated_head: l2_grid={tuple(l2_grid)}: expected penalties "
                         ">= 0")
    mean, std = standardize(x_nkd, valid_nk)
    x = jnp.asarray((np.asarray(x_nkd, np.float64) - mean) / std, jnp.float32)
    ranks, valid = jnp.asarray(ranks_nk), jnp.asarray(valid_nk, bool)
    held_out = jnp.asarray(fold_ids(n, folds, seed)[None, :] == np.arange(folds)[:, None])
    grid = jnp.asarray(l2_grid, jnp.float32)

    @jax.jit
    def cv_table():
        def one(l2, held):  # fit on the other folds, score the held-out one
            w = fit_head(x, ranks, valid & ~held[:, None], l2, steps)
            loss, m = losses.ranking_loss(x @ w, ranks, valid & held[:, None])
            return loss, m["rm/accuracy"]
        per_fold = jax.vmap(jax.vmap(one, (None, 0)), (0, None))
        return per_fold(grid, held_out)

    loss_lf, acc_lf = (np.asarray(a) for a in cv_table())
    best = int(np.argmin(loss_lf.mean(1)))
    w = jax.jit(fit_head, static_argnums=4)(x, ranks, valid, grid[best], steps)
    train_loss, m = losses.ranking_loss(x @ w, ranks, valid)
    w_raw, b = unstandardize(np.asarray(w), mean, std)
    cv = [{"l2": float(l2), "loss": float(lo), "accuracy": float(a)}
          for l2, lo, a in zip(l2_grid, loss_lf.mean(1), acc_lf.mean(1))]
    return HeadFit(w_raw, b, float(l2_grid[best]), cv, float(train_loss),
                   float(m["rm/accuracy"]))
