"""Direct preference optimisation (Rafailov et al. 2023; IPO: Azar et al. 2023): the policy is
trained on preference pairs directly, with the frozen SFT model as the reference and no reward
model.

Per pair (chosen ``y_w``, rejected ``y_l``) the implicit reward is ``β·log π(y|x)/π_ref(y|x)``;
the loss is :func:`rlhf_jax.losses.dpo_loss`. Log-probs come from
:func:`rlhf_jax.scoring.row_sequence_logprobs` on comparison-batch rows (``pairs=True``: chosen
first). One step is one compiled program (policy and reference forwards, loss, Adam update).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.scoring import row_sequence_logprobs


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO hyper-parameters."""
    beta: float = 0.1
    """β: the strength of the implicit KL constraint (smaller = further from the reference)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the probability that a label is flipped."""
    loss_type: str = "sigmoid"
    """``sigmoid`` (DPO) or ``ipo``."""
    learning_rate: float = 1e-4
    """Adam step size (linear warm-up, then constant)."""
    warmup_steps: int = 10
    max_grad_norm: float = 1.0

    def dpo_errors(self) -> list[str]:
        errs = []
        if not (self.beta > 0 and self.beta < float("inf")):
            errs.append(f"beta={self.beta}: expected a finite positive number")
        if not 0 <= self.label_smoothing < 0.5:
            errs.append(f"label_smoothing={self.label_smoothing}: expected a value in [0, 0.5)")
        if self.loss_type not in losses.DPO_LOSS_TYPES:
            errs.append(f"loss_type={self.loss_type!r}: expected one of {losses.DPO_LOSS_TYPES}")
        if not (self.learning_rate > 0 and self.learning_rate < float("inf")):
            errs.append(f"learning_rate={self.learning_rate}: expected a finite positive number")
        return errs


def make_optimizer(cfg: DPOConfig) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(schedule))


def pair_logprobs(lm_def: nnx.GraphDef, params, batch: dict) -> jax.Array:
    """``[B, 2]`` sequence log-probs of a ``pairs=True`` comparison batch (chosen first)."""
    b, k, t = batch["tokens"].shape
    flat = [batch[key].reshape(b * k, t) for key in ("tokens", "mask", "response_mask")]
    return row_sequence_logprobs(lm_def, params, *flat).reshape(b, k)


def make_dpo(cfg: DPOConfig, lm_def: nnx.GraphDef,
             tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """``(train_step, evaluate)``, both pure (jit them).

    * ``train_step(params, opt_state, ref_params, batch) -> (params, opt_state, metrics)``
    * ``evaluate(params, ref_params, batch) -> metrics`` (no update): the implicit reward's
      preference accuracy and margin on held-out pairs.

    ``batch``: ``tokens``/``mask``/``response_mask`` ``[B, 2, T]`` and ``valid [B, 2]``.
    """
    errs = cfg.dpo_errors()
    if errs:
        raise ValueError("invalid DPO config:\n  " + "\n  ".join(errs))

    def loss_fn(params, ref_params, batch):
        pi = pair_logprobs(lm_def, params, batch)
        ref = jax.lax.stop_gradient(pair_logprobs(lm_def, ref_params, batch))
        mask = jnp.all(batch["valid"], axis=1)
        return losses.dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], cfg.beta,
                               cfg.label_smoothing, cfg.loss_type, mask=mask)

    def train_step(params, opt_state, ref_params, batch):
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref_params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        m["dpo/grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, m

    def evaluate(params, ref_params, batch):
        return loss_fn(params, ref_params, batch)[1]

    return train_step, evaluate
