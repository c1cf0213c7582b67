"""How a model scores text: the one definition every stage uses.

* :func:`response_logits` / :func:`response_logprobs`: a policy's per-token log-probs of a
  response after its prompt, with the LM head applied **only at response positions** (on a 50k
  vocabulary the head is the largest matmul). PPO (policy and reference), evaluation, DPO and
  best-of-N call it.
* :func:`sequence_logprobs`: the summed log-prob of each response (DPO's ``log π(y|x)``).
* :class:`RewardScorer`: a reward model's scalar score of ``prompt + response + EOS``, pooled by
  the convention it was trained with (:func:`pool_scores`). Reward training scores comparison
  batches with :meth:`RewardScorer.score_tokens`; PPO, evaluation and best-of-N score sampled
  responses with :meth:`RewardScorer.__call__`, which appends the EOS exactly as the training
  data did (:mod:`rlhf_jax.data.batching`).
* :class:`TextReward`: a reward computed on the host from the decoded response text, called like a
  :class:`RewardScorer`; with the gold scorer it is the *oracle* reward (PPO against the gold score
  itself: what a perfect reward model would reach at the same KL).

Layouts: prompts ``[B, Tq]`` are left-padded, responses ``[B, Tr]`` right-padded (real tokens
first), so ``prompt ++ response`` puts the logits that predict response token ``j`` at position
``Tq - 1 + j``. Comparison batches (``tokens/mask/response_mask [N, T]``) are right-padded
``prompt + response + EOS`` rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses
from rlhf_jax.masked import check_shapes, masked_mean, masked_sum
from rlhf_jax.models.transformer import positions_from_mask

Array = jax.Array
POOLS = ("last", "mean")


def response_positions(query_len: int, response_len: int) -> slice:
    """Positions of ``prompt ++ response`` whose logits predict the response tokens."""
    return slice(query_len - 1, query_len + response_len - 1)


def concat_prompt_response(prompt_bt: Array, prompt_mask_bt: Array, resp_bt: Array,
                           resp_mask_bt: Array) -> tuple[Array, Array]:
    """``(tokens [B, Tq+Tr] int32, mask [B, Tq+Tr] bool)`` of the prompt followed by the
    response."""
    tokens = jnp.concatenate([prompt_bt.astype(jnp.int32), resp_bt.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask_bt.astype(bool), resp_mask_bt.astype(bool)], axis=1)
    return tokens, mask


def response_logits(lm_def: nnx.GraphDef, params, tokens_bt: Array, mask_bt: Array,
                    resp: slice) -> tuple[Array, Array]:
    """``(logits [B, Tr, V], hidden [B, T, D])``: one forward pass, the LM head only at ``resp``.

    Args:
      lm_def, params: the language model (``nnx.split`` of a ``Transformer``).
      tokens_bt, mask_bt: ``[B, T]`` prompt ++ response (see :func:`concat_prompt_response`).
      resp: the positions predicting response tokens (:func:`response_positions`).
    """
    model = nnx.merge(lm_def, params)
    _, hidden, _ = model(tokens_bt, positions_from_mask(mask_bt), mask_bt, compute_logits=False)
    return model.logits(hidden[:, resp]), hidden


def response_logprobs(lm_def: nnx.GraphDef, params, prompt_bt: Array, prompt_mask_bt: Array,
                      resp_bt: Array, resp_mask_bt: Array, temperature: float = 1.0) -> Array:
    """``log π(y_t | x, y_<t) [B, Tr]`` of each response token (at ``temperature``; 0 on
    padding is *not* applied: mask with ``resp_mask_bt`` when reducing)."""
    check_shapes("response_logprobs", [("prompt_bt", prompt_bt, "BQ"),
                                       ("prompt_mask_bt", prompt_mask_bt, "BQ"),
                                       ("resp_bt", resp_bt, "BR"),
                                       ("resp_mask_bt", resp_mask_bt, "BR")])
    tokens, mask = concat_prompt_response(prompt_bt, prompt_mask_bt, resp_bt, resp_mask_bt)
    resp = response_positions(prompt_bt.shape[1], resp_bt.shape[1])
    logits, _ = response_logits(lm_def, params, tokens, mask, resp)
    return losses.token_logprobs(logits, resp_bt, temperature)


def sequence_logprobs(lm_def: nnx.GraphDef, params, prompt_bt: Array, prompt_mask_bt: Array,
                      resp_bt: Array, resp_mask_bt: Array, temperature: float = 1.0) -> Array:
    """``log π(y | x) = Σ_t m_t log π(y_t | x, y_<t)`` per response, ``[B]``."""
    lp = response_logprobs(lm_def, params, prompt_bt, prompt_mask_bt, resp_bt, resp_mask_bt,
                           temperature)
    return masked_sum(lp, resp_mask_bt, axis=1)


def _last_position(mask_bt: Array) -> Array:
    """``[B]`` index of each row's last real token."""
    pos = jnp.arange(mask_bt.shape[1])[None, :]
    return jnp.max(jnp.where(mask_bt.astype(bool), pos, 0), axis=1)


def pool_scores(values_bt: Array, mask_bt: Array, response_mask_bt: Array, pool: str) -> Array:
    """One score per sequence ``[B]`` from a scalar head's per-token outputs ``[B, T]``.

    ``last`` reads the last real token (the EOS appended after the response: InstructGPT);
    ``mean`` averages over the response tokens and that EOS (a bag-of-tokens reward that a small
    model learns from few comparisons).
    """
    check_shapes("pool_scores", [("values_bt", values_bt, "BT"), ("mask_bt", mask_bt, "BT"),
                                 ("response_mask_bt", response_mask_bt, "BT")])
    if pool == "last":
        return jnp.take_along_axis(values_bt, _last_position(mask_bt)[:, None], axis=1)[:, 0]
    if pool == "mean":
        return masked_mean(values_bt, response_mask_bt, axis=1)
    raise ValueError(f"pool={pool!r}; expected one of {POOLS}")


def pool_features(hidden_btd: Array, mask_bt: Array, response_mask_bt: Array, pool: str) -> Array:
    """Hidden states ``[B, T, D]`` pooled to ``[B, D]`` as :func:`pool_scores` pools scalars: for a
    linear head, ``head(pool_features(h)) == pool_scores(head(h))``, so a head can be fitted on
    pooled features computed once (:mod:`rlhf_jax.reward_head`)."""
    check_shapes("pool_features", [("hidden_btd", hidden_btd, "BTD"), ("mask_bt", mask_bt, "BT"),
                                   ("response_mask_bt", response_mask_bt, "BT")])
    if pool == "last":
        return jnp.take_along_axis(hidden_btd, _last_position(mask_bt)[:, None, None],
                                   axis=1)[:, 0]
    if pool == "mean":
        w_bt = response_mask_bt.astype(jnp.float32)
        return (jnp.einsum("btd,bt->bd", hidden_btd, w_bt)
                / jnp.maximum(jnp.sum(w_bt, axis=1), 1.0)[:, None])
    raise ValueError(f"pool={pool!r}; expected one of {POOLS}")


def append_eos(resp_bt: Array, resp_mask_bt: Array, eos_id: int) -> tuple[Array, Array]:
    """``(response [B, Tr+1], mask)`` with an EOS after the last real token of each response that
    does not already contain one (the reward model's training format)."""
    b = resp_bt.shape[0]
    n = jnp.sum(resp_mask_bt, axis=1)
    has_eos = jnp.any((resp_bt == eos_id) & resp_mask_bt, axis=1)
    resp = jnp.concatenate([resp_bt, jnp.full((b, 1), eos_id, resp_bt.dtype)], axis=1)
    add = (jnp.arange(resp.shape[1])[None, :] == n[:, None]) & ~has_eos[:, None]
    resp = jnp.where(add, eos_id, resp)
    rmask = jnp.concatenate([resp_mask_bt.astype(bool), jnp.zeros((b, 1), bool)], axis=1) | add
    return resp, rmask


@dataclasses.dataclass(frozen=True)
class RewardScorer:
    """A reward model and how it reads text: its graph, EOS id and pooling convention.

    Hashable and static (close over it in jitted code); the parameters are passed at call time.

    Attributes:
      graphdef: ``nnx.graphdef`` of a :class:`rlhf_jax.models.heads.ScalarModel`.
      eos_id: the EOS the training data appended after each response.
      pool: ``last`` or ``mean`` (see :func:`pool_scores`).
    """
    graphdef: nnx.GraphDef
    eos_id: int
    pool: str = "last"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"RewardScorer: pool={self.pool!r}; expected one of {POOLS}")

    def score_tokens(self, params, tokens_bt: Array, mask_bt: Array,
                     response_mask_bt: Array) -> Array:
        """Scores ``[B]`` of already formatted ``prompt + response + EOS`` rows ``[B, T]``."""
        values_bt = nnx.merge(self.graphdef, params)(tokens_bt, positions_from_mask(mask_bt),
                                                     mask_bt)
        return pool_scores(values_bt, mask_bt, response_mask_bt, self.pool)

    def pooled_features(self, params, tokens_bt: Array, mask_bt: Array,
                        response_mask_bt: Array) -> Array:
        """``[B, D]``: the hidden states the head reads, pooled like its scores (the head's input
        for :mod:`rlhf_jax.reward_head`)."""
        model = nnx.merge(self.graphdef, params)
        hidden = model.features(tokens_bt, positions_from_mask(mask_bt), mask_bt)
        return pool_features(hidden, mask_bt, response_mask_bt, self.pool)

    def __call__(self, params, prompt_bt: Array, prompt_mask_bt: Array, resp_bt: Array,
                 resp_mask_bt: Array) -> Array:
        """Scores ``[B]`` of sampled responses: the EOS is appended as in training."""
        resp, rmask = append_eos(resp_bt, resp_mask_bt, self.eos_id)
        tokens, mask = concat_prompt_response(prompt_bt, prompt_mask_bt, resp, rmask)
        response_mask = jnp.concatenate([jnp.zeros_like(prompt_mask_bt, bool), rmask], axis=1)
        return self.score_tokens(params, tokens, mask, response_mask)


@dataclasses.dataclass(frozen=True, eq=False)
class TextReward:
    """A reward computed on the host from the text of each sampled response, e.g. the gold scorer's
    log-odds (:class:`rlhf_jax.labelers.GoldSentimentScorer`): ``score_texts(texts) -> [N]``.

    Called like :class:`RewardScorer` (its ``params`` are ignored): the responses are decoded
    (special tokens dropped) and scored through ``jax.pure_callback``, so it runs inside the jitted
    PPO iteration and under ``vmap`` over seeds, at the cost of one host round trip per call. It has
    no gradient and no reward-model weights: PPO against the gold scorer this way is the *oracle*
    run of Gao et al. (2022), the gold score a perfect reward model would give at the same KL.
    """
    score_texts: Callable[[Sequence[str]], Any]
    tokenizer: Any

    def _host(self, resp, mask):
        from rlhf_jax.data.batching import decode_rows
        scores = np.asarray(self.score_texts(decode_rows(self.tokenizer, resp, mask)), np.float32)
        return scores.reshape(np.shape(resp)[:-1])

    def __call__(self, params, prompt_bt: Array, prompt_mask_bt: Array, resp_bt: Array,
                 resp_mask_bt: Array) -> Array:
        """Scores ``[B]`` of sampled responses ``[B, Tr]``."""
        check_shapes("TextReward", [("resp_bt", resp_bt, "BT"), ("resp_mask_bt", resp_mask_bt,
                                                                 "BT")])
        out = jax.ShapeDtypeStruct(resp_bt.shape[:-1], jnp.float32)
        return jax.pure_callback(self._host, out, resp_bt, resp_mask_bt,
                                 vmap_method="broadcast_all")


def row_sequence_logprobs(lm_def: nnx.GraphDef, params, tokens_nt: Array, mask_nt: Array,
                          response_mask_nt: Array) -> Array:
    """``log π(y | x)`` per row ``[N]`` of formatted ``prompt + response + EOS`` rows ``[N, T]``
    (the comparison-batch layout): ``Σ_t r_{t+1} log π(tok_{t+1} | tok_≤t)`` where ``r`` is the
    response mask (response tokens and their EOS). DPO's log-probs of chosen/rejected responses.
    """
    check_shapes("row_sequence_logprobs", [("tokens_nt", tokens_nt, "NT"),
                                           ("mask_nt", mask_nt, "NT"),
                                           ("response_mask_nt", response_mask_nt, "NT")])
    model = nnx.merge(lm_def, params)
    _, hidden, _ = model(tokens_nt, positions_from_mask(mask_nt), mask_nt, compute_logits=False)
    logits = model.logits(hidden[:, :-1])
    lp = losses.token_logprobs(logits, tokens_nt[:, 1:])
    return masked_sum(lp, response_mask_nt[:, 1:].astype(bool), axis=1)
