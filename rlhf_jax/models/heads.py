"""Scalar heads on a transformer backbone: reward models and PPO value functions.

Initialisation follows lm-human-preferences (Ziegler et al. 2019, ``lm_human_preferences/
language/model.py``): the value head starts at exactly zero, the reward head's weights are drawn
from ``N(0, 1 / (D + 1))`` so its initial outputs have roughly unit variance, and the reward head
carries a learnable ``gain``/``bias`` pair that reward normalisation sets so the scores of policy
samples have a chosen mean and standard deviation.
"""
from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer

HEAD_INITS = ("reward", "value")


class ScalarHead(nnx.Module):
    """``r = gain * (h @ w + b) + bias`` mapping hidden states ``[B, T, D]`` to ``[B, T]``.

    Args:
      d_model: D.
      init: ``"reward"`` (``w ~ N(0, 1/(D+1))``) or ``"value"`` (``w = 0``); ``b = 0``,
        ``gain = 1``, ``bias = 0`` either way.
      rngs: the ``params`` stream draws ``w`` for the reward init.
    """

    def __init__(self, d_model: int, *, init: str, rngs: nnx.Rngs):
        if init not in HEAD_INITS:
            raise ValueError(f"ScalarHead init={init!r}; expected one of {HEAD_INITS}")
        if init == "reward":
            std = 1.0 / math.sqrt(d_model + 1)
            w = std * jax.random.normal(rngs.params(), (d_model,), jnp.float32)
        else:
            w = jnp.zeros((d_model,), jnp.float32)
        self.w = nnx.Param(w)
        self.b = nnx.Param(jnp.zeros((), jnp.float32))
        self.gain = nnx.Param(jnp.ones((), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, hidden_btd: jax.Array) -> jax.Array:
        if hidden_btd.ndim != 3 or hidden_btd.shape[-1] != self.w.shape[0]:
            raise ValueError(f"ScalarHead expects hidden [B, T, D={self.w.shape[0]}], got shape "
                             f"{hidden_btd.shape}")
        # The explicit contraction to [B, T] avoids a [B, T, 1] output: ranks are never broadcast.
        out_bt = jnp.einsum("btd,d->bt", hidden_btd.astype(jnp.float32), self.w[...])
        return self.gain[...] * (out_bt + self.b[...]) + self.bias[...]


class ScalarModel(nnx.Module):
    """Transformer backbone + :class:`ScalarHead`: ``values_bt = head(backbone(tokens).hidden)``.

    The backbone keeps its LM head (unused here) so its parameters mirror a :class:`Transformer`
    exactly and can be copied to and from one.

    ``layer`` (static) makes the head read the hidden states after that many blocks instead of
    the last: the blocks above it are kept (the parameters still mirror the Transformer, and a
    reward model on a shared base holds no copy) but never run. Middle layers of a pretrained
    LM often carry more linearly readable sentiment than its last, which is tuned to the next
    token; a reward head on them also costs half the forward pass.
    """

    def __init__(self, cfg: ModelConfig, *, head_init: str, rngs: nnx.Rngs,
                 layer: int | None = None):
        if layer is not None and not 0 <= layer <= cfg.num_layers:
            raise ValueError(f"ScalarModel layer={layer}: expected 0..{cfg.num_layers} or None")
        self.cfg = cfg
        self.layer = layer
        self.backbone = Transformer(cfg, rngs=rngs)
        self.head = ScalarHead(cfg.d_model, init=head_init, rngs=rngs)

    def features(self, tokens_bt, positions_bt, attention_mask_bt) -> jax.Array:
        """``[B, T, D]`` f32 hidden states the head reads (after block ``layer``, normed)."""
        _, hidden_btd, _ = self.backbone(tokens_bt, positions_bt, attention_mask_bt,
                                         compute_logits=False, num_layers=self.layer)
        return hidden_btd

    def __call__(self, tokens_bt, positions_bt, attention_mask_bt) -> jax.Array:
        """Scalars for every token.

        Args:
          tokens_bt, positions_bt, attention_mask_bt: ``[B, T]``, as for :class:`Transformer`.

        Returns:
          ``[B, T]`` f32; position ``t`` scores the prefix ending at token ``t``.
        """
        return self.head(self.features(tokens_bt, positions_bt, attention_mask_bt))

    @classmethod
    def from_lm(cls, lm: Transformer, head_init: str, rngs: nnx.Rngs) -> "ScalarModel":
        """A scalar model whose backbone starts from a trained LM's parameters (copied)."""
        model = cls(lm.cfg, head_init=head_init, rngs=rngs)
        nnx.update(model.backbone, jax.tree.map(jnp.copy, nnx.state(lm)))
        return model


class ScalarEnsemble(nnx.Module):
    """The mean of several scalar models' per-token outputs: a reward-model ensemble.

    Reward models trained with different seeds agree where the comparisons pin the reward down
    and disagree where they do not; a policy optimising their mean gains less from exploiting
    any one member's errors (Coste et al. 2023, *Reward Model Ensembles Help Mitigate
    Overoptimization*). The members may differ in shape; each keeps its own normalisation, and
    the pooled score of the mean is the mean of the members' pooled scores (pooling is linear).
    It is called like a :class:`ScalarModel`, so :class:`rlhf_jax.scoring.RewardScorer` scores
    with it unchanged.

    ``disagreement`` > 0 subtracts that multiple of the members' variance (over members, per
    token): Coste et al.'s uncertainty-weighted optimisation, ``mean − λ · var``, which pays the
    policy less where the members disagree — where a response is outside what the comparisons
    pinned down. With last-token pooling the penalty is exactly ``λ`` times the variance of the
    members' pooled scores; with mean pooling it is ``λ`` times the token-mean of the per-token
    variances (at least the variance of the pooled scores).
    """

    def __init__(self, members: list[ScalarModel], disagreement: float = 0.0):
        if not members:
            raise ValueError("ScalarEnsemble needs at least one member")
        if disagreement < 0 or (disagreement > 0 and len(members) < 2):
            raise ValueError(f"disagreement={disagreement}: needs ≥ 0, and ≥ 2 members when > 0 "
                             f"(got {len(members)})")
        self.members = nnx.List(members)
        self.disagreement = float(disagreement)

    def __call__(self, tokens_bt, positions_bt, attention_mask_bt) -> jax.Array:
        """``[B, T]`` f32: the members' outputs averaged (minus ``disagreement`` × their
        variance)."""
        outs = [m(tokens_bt, positions_bt, attention_mask_bt) for m in self.members]
        mean = sum(outs) / len(outs)
        if not self.disagreement:
            return mean
        var = sum((o - mean) ** 2 for o in outs) / len(outs)
        return mean - self.disagreement * var
