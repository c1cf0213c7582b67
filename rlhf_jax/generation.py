"""Jit-compiled KV-cache sampler: one program per (batch, prompt length, max new tokens) shape.

Sampling responses is where RLHF spends most of its wall-clock time, so the whole decode runs as a
single XLA program: a prefill of the (left-padded) prompt into a :class:`KVCache`, then a
``lax.while_loop`` over a :class:`SamplerState` that feeds one token per step and exits early once
every row has emitted EOS. No Python loop over tokens, no recompilation per step, and
:func:`sample` is traceable, so a PPO iteration can jit rollout + update as one program
(the loop follows Flax gemma's sampler).

Sampling of one step, for row ``b`` at new-token index ``t`` (:func:`sample_step`)::

    z        = logits / temperature                      # the sampling distribution of PPO
    logprob  = log_softmax(z)[token]                     # returned; before any filtering
    z'       = z with z[eos] = -inf        if t < min_new_tokens
    z'       = keep the top_k entries of z'              if top_k > 0
    z'       = keep the nucleus of softmax(z')           if top_p < 1   (Holtzman et al. 2020)
    token    = argmax z'  (greedy)  or  a draw from softmax(z')

The returned log-probs are those of the *unfiltered* tempered distribution, which is what PPO
recomputes from the policy (``log_softmax(logits / T)``), so the ratio at the first epoch is 1.

Randomness: row ``b`` at step ``t`` uses ``fold_in(row_key_b, t)``. With one scalar key the row
keys are ``fold_in(key, b)``, so a row's draws depend on its row index (not on the batch size, and
not on the amount of left padding); passing a ``[B]`` array of keys makes each row's draws depend
only on its own key. ``jax_threefry_partitionable`` makes the draws identical whether the batch is
sharded over a mesh or not. A draw uses one uniform per row (inverse-CDF sampling) rather than the
Gumbel-max trick's ``V`` uniforms: on CPU, generating ``B x V`` threefry numbers per step costs more
than the transformer step itself.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import init_cache, KVCache, positions_from_mask, Transformer

# Vocabularies larger than this are sampled with a two-level inverse CDF (block sums, then one
# block): it avoids a length-V cumulative sum (slow on CPU) and keeps f32 round-off per block.
_BLOCK = 256
_TWO_LEVEL_MIN_V = 4 * _BLOCK
# Nucleus fast path: look for the top-p boundary among this many most likely tokens first.
NUCLEUS_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses.

    Attributes:
      max_new_tokens: Tr, number of response slots (static; the output is always ``[B, Tr]``).
      temperature: divides the logits before sampling and before computing the returned log-probs.
      top_k: keep only the ``top_k`` most likely tokens (0 = off). Ties at the k-th value are
        broken by token id (lowest first, as ``lax.top_k``).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
        reaches ``top_p`` (1 = off); tokens tied with the least likely kept token are all kept.
      greedy: take the argmax of the filtered logits instead of sampling.
      eos_id: end-of-sequence token; a row stops after emitting it (None = never stop early).
      pad_id: token written after a row has stopped (mask 0, log-prob 0).
      min_new_tokens: the EOS logit is masked at new-token indices ``t < min_new_tokens``.
      truncate_token: lm-human-preferences' post-hoc truncation: the response is cut right after
        the first ``truncate_token`` at index ``>= truncate_after`` (None = off).
      truncate_after: first response index at which ``truncate_token`` cuts (None = 0).
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_id: int | None = None
    pad_id: int = 0
    min_new_tokens: int = 0
    truncate_token: int | None = None
    truncate_after: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}; expected >= 1")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}; expected > 0 "
                             "(use greedy=True for argmax decoding)")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k}; expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}; expected in (0, 1]")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"SamplingConfig.min_new_tokens={self.min_new_tokens}; expected in "
                             f"[0, max_new_tokens={self.max_new_tokens}]")
        if self.truncate_after is not None and self.truncate_token is None:
            raise ValueError("SamplingConfig.truncate_after is set but truncate_token is None")

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class SampleOutput:
    """Sampled responses.

    Attributes:
      tokens: ``[B, Tr]`` int32 response tokens; ``pad_id`` after EOS / truncation.
      mask: ``[B, Tr]`` bool, True for real response tokens (the EOS token included).
      logprobs: ``[B, Tr]`` f32 ``log_softmax(logits / temperature)`` of each sampled token (before
        top-k/top-p filtering and the ``min_new_tokens`` EOS mask); 0 where ``mask`` is False.
    """
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array


@flax.struct.dataclass
class SamplerState:
    """Carry of the decode loop.

    Attributes:
      step: int32 scalar, new-token index ``t`` sampled by the next iteration.
      cache: the KV cache holding the prompt and the tokens fed so far.
      last_token: ``[B]`` int32 token fed at the next iteration (last prompt token at ``t = 0``).
      last_mask: ``[B]`` bool, whether ``last_token`` is real.
      last_position: ``[B]`` int32 position of ``last_token``.
      done: ``[B]`` bool, the row has emitted EOS.
      tokens, mask, logprobs: ``[B, Tr]`` output buffers, filled up to ``step``.
    """
    step: jax.Array
    cache: KVCache
    last_token: jax.Array
    last_mask: jax.Array
    last_position: jax.Array
    done: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array


# --------------------------------------------------------------------------------------------------
# Filters and the per-step draw (model independent).

def _check_logits(logits_bv: jax.Array, name: str = "logits_bv") -> None:
    if logits_bv.ndim != 2:
        raise ValueError(f"{name} must be [B, V], got shape {logits_bv.shape}")


def _mask_eos(z_bv: jax.Array, step, cfg: SamplingConfig) -> jax.Array:
    if cfg.eos_id is None or cfg.min_new_tokens == 0:
        return z_bv
    blocked = (jnp.arange(z_bv.shape[1]) == cfg.eos_id)[None, :] & (step < cfg.min_new_tokens)
    return jnp.where(blocked, -jnp.inf, z_bv)


def _nucleus_threshold_bisect(probs_bv: jax.Array, top_p: float) -> jax.Array:
    bits_bv = lax.bitcast_convert_type(probs_bv, jnp.int32)

    def mass_above(tau_bits_b):
        return jnp.sum(jnp.where(bits_bv > tau_bits_b[:, None], probs_bv, 0.0), axis=1)

    def body(_, lo_hi):
        lo, hi = lo_hi                       # invariant: F(hi) < top_p, answer in (lo, hi]
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < top_p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi = jnp.max(bits_bv, axis=1)
    lo = jnp.full_like(hi, -1)
    _, hi = lax.fori_loop(0, 32, body, (lo, hi))
    return lax.bitcast_convert_type(hi, jnp.float32)


def _nucleus_threshold(probs_bv: jax.Array, top_p: float,
                       candidates: int = NUCLEUS_CANDIDATES) -> jax.Array:
    """Per-row ``tau`` such that the nucleus is ``{i: p_i >= tau}``.

    Token ``i`` is kept iff the mass of strictly more likely tokens is ``< top_p``. Fast path: when
    the ``candidates`` most likely tokens of every row already hold ``top_p`` of the mass, the
    nucleus boundary lies among them and ``tau`` is read off their prefix sums. Otherwise ``tau``
    is found exactly by bisection: ``F(tau) = sum_{p_j > tau} p_j`` is non-increasing, so the
    smallest probability with ``F < top_p`` is searched over the bit patterns of non-negative f32
    (monotone as integers), 32 masked sums instead of a length-V sort (~100x slower on CPU).
    ``F(max p) = 0 < top_p``, so the most likely token is always kept.
    """
    k = min(candidates, probs_bv.shape[1])
    top_bk, _ = lax.top_k(probs_bv, k)
    keep = jnp.cumsum(top_bk, axis=1) - top_bk < top_p
    tau_fast = jnp.min(jnp.where(keep, top_bk, jnp.inf), axis=1)
    covered = jnp.all(jnp.sum(top_bk, axis=1) >= top_p) | (k == probs_bv.shape[1])
    return lax.cond(covered, lambda: tau_fast, lambda: _nucleus_threshold_bisect(probs_bv, top_p))


def _top_p_sorted(z_bk: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter on logits already sorted in descending order (the top-k path)."""
    probs = jax.nn.softmax(z_bk, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Ties with the last kept token stay in, as in the full-vocabulary path.
    keep = mass_before < top_p
    tau = jnp.min(jnp.where(keep, probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= tau, z_bk, -jnp.inf)


def filter_logits(logits_bv: jax.Array, step, cfg: SamplingConfig):
    """Tempered logits with the EOS mask, top-k and top-p applied.

    Args:
      logits_bv: ``[B, V]`` raw logits.
      step: int scalar, new-token index (for ``min_new_tokens``).
      cfg: sampling configuration.

    Returns:
      ``(z_bc, ids_bc)``: filtered tempered logits over ``C`` candidates (``-inf`` = excluded) and
      their token ids. ``C = top_k`` when top-k is on (candidates sorted by logit), else ``C = V``
      and ``ids`` is ``arange(V)``.
    """
    _check_logits(logits_bv)
    z = _mask_eos(logits_bv.astype(jnp.float32) / cfg.temperature, step, cfg)
    b, v = z.shape
    if 0 < cfg.top_k < v:
        z, ids = lax.top_k(z, cfg.top_k)
        if cfg.top_p < 1:
            z = _top_p_sorted(z, cfg.top_p)
        return z, ids.astype(jnp.int32)
    ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32)[None, :], (b, v))
    if cfg.top_p < 1:
        probs = jax.nn.softmax(z, axis=-1)
        z = jnp.where(probs >= _nucleus_threshold(probs, cfg.top_p)[:, None], z, -jnp.inf)
    return z, ids


def sampling_probs(logits_bv: jax.Array, step, cfg: SamplingConfig) -> jax.Array:
    """``[B, V]`` probabilities the sampler draws from (0 outside the allowed set)."""
    z, ids = filter_logits(logits_bv, step, cfg)
    probs = jax.nn.softmax(z, axis=-1)
    return jnp.zeros(logits_bv.shape, jnp.float32).at[jnp.arange(z.shape[0])[:, None], ids].set(
        probs)


def _first_index_above(cum_bc: jax.Array, u_b: jax.Array, probs_bc: jax.Array) -> jax.Array:
    """Smallest ``i`` with ``cum[i] > u``; never an index with zero probability.

    Zero-probability entries repeat the previous cumulative value, so they can never be the first
    to exceed ``u >= 0``. If round-off puts ``u`` at or beyond the total, the last nonzero entry is
    taken.
    """
    count = jnp.sum(cum_bc <= u_b[:, None], axis=1)
    c = probs_bc.shape[1]
    last_nonzero = c - 1 - jnp.argmax((probs_bc > 0)[:, ::-1], axis=1)
    return jnp.where(count < c, count, last_nonzero).astype(jnp.int32)


def inverse_cdf(probs_bc: jax.Array, uniform_b: jax.Array) -> jax.Array:
    """Index drawn from each row of (unnormalised) ``probs_bc`` with one uniform in [0, 1) per row.

    Large rows use two levels: block sums of ``_BLOCK`` entries, pick a block, then an entry inside
    it, so no length-V prefix sum is needed and round-off stays local to a block.
    """
    b, c = probs_bc.shape
    if c < _TWO_LEVEL_MIN_V:
        cum = jnp.cumsum(probs_bc, axis=1)
        return _first_index_above(cum, uniform_b * cum[:, -1], probs_bc)
    nb = -(-c // _BLOCK)
    padded = jnp.pad(probs_bc, ((0, 0), (0, nb * _BLOCK - c))).reshape(b, nb, _BLOCK)
    block_mass = jnp.sum(padded, axis=2)
    block_cum = jnp.cumsum(block_mass, axis=1)
    u = uniform_b * block_cum[:, -1]
    blk = _first_index_above(block_cum, u, block_mass)
    rows = jnp.arange(b)
    inner = padded[rows, blk]                                     # [B, _BLOCK]
    u_inner = jnp.maximum(u - (block_cum[rows, blk] - block_mass[rows, blk]), 0.0)
    idx = _first_index_above(jnp.cumsum(inner, axis=1), u_inner, inner)
    return blk * _BLOCK + idx


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """``[B]`` typed keys: ``fold_in(key, b)`` for a scalar key, the keys themselves for ``[B]``.

    Accepts typed keys (``jax.random.key``) or raw uint32 keys (``[2]`` / ``[B, 2]``).
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    if key.shape != (batch,):
        raise ValueError(f"key must be a scalar key or [B={batch}] keys, got shape {key.shape}")
    return key


def sample_step(logits_bv: jax.Array, keys_b: jax.Array, step, cfg: SamplingConfig):
    """Draw one token per row from ``logits_bv`` (see the module docstring for the order).

    Args:
      logits_bv: ``[B, V]`` raw logits of the next token.
      keys_b: ``[B]`` typed row keys; the draw uses ``fold_in(keys_b[b], step)``.
      step: int scalar, new-token index ``t``.
      cfg: sampling configuration.

    Returns:
      ``(tokens_b int32, logprobs_b f32)`` with ``logprobs = log_softmax(logits / T)[token]``.
    """
    _check_logits(logits_bv)
    z_bc, ids_bc = filter_logits(logits_bv, step, cfg)
    rows = jnp.arange(z_bc.shape[0])
    if cfg.greedy:
        choice = jnp.argmax(z_bc, axis=1)
    else:
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys_b)
        choice = inverse_cdf(jax.nn.softmax(z_bc, axis=1), u)
    tokens = ids_bc[rows, choice]
    logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32) / cfg.temperature, axis=1)
    return tokens, logp_bv[rows, tokens]


def truncate(tokens_bt: jax.Array, mask_bt: jax.Array, cfg: SamplingConfig):
    """lm-human-preferences' rule: cut after the first ``truncate_token`` at index >= after.

    The truncation token itself is kept; later tokens become ``pad_id`` with mask False. Rows
    without such a token are unchanged.
    """
    if cfg.truncate_token is None:
        return tokens_bt, mask_bt
    t = jnp.arange(tokens_bt.shape[1])[None, :]
    hit = (tokens_bt == cfg.truncate_token) & mask_bt & (t >= (cfg.truncate_after or 0))
    first = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), tokens_bt.shape[1])
    keep = mask_bt & (t <= first[:, None])
    return jnp.where(keep, tokens_bt, cfg.pad_id), keep


# --------------------------------------------------------------------------------------------------
# The decode loop.

def sample_split(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens_bt: jax.Array,
                 prompt_mask_bt: jax.Array, key: jax.Array, cfg: SamplingConfig) -> SampleOutput:
    """:func:`sample` on a split model (``graphdef, state = nnx.split(model)``); pure, jittable.

    The model is rebuilt with ``nnx.merge`` inside the prefill and the loop body, so ``state`` may
    be a tracer of an enclosing ``jax.jit`` (one PPO program for rollout and update).
    """
    if prompt_tokens_bt.ndim != 2 or prompt_mask_bt.shape != prompt_tokens_bt.shape:
        raise ValueError(f"prompt_tokens_bt and prompt_mask_bt must both be [B, P]; got shapes "
                         f"{prompt_tokens_bt.shape} and {prompt_mask_bt.shape}")
    mcfg = nnx.merge(graphdef, state).cfg
    b, p = prompt_tokens_bt.shape
    tr = cfg.max_new_tokens
    # The last prompt token and all but the last new token are fed: P - 1 + Tr slots.
    slots = p - 1 + tr
    if slots > mcfg.max_seq_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {tr} - 1 = {slots} exceeds the "
                         f"model's max_seq_len={mcfg.max_seq_len}")
    tokens_bt = prompt_tokens_bt.astype(jnp.int32)
    mask_bt = prompt_mask_bt.astype(bool)
    positions_bt = positions_from_mask(mask_bt)
    keys_b = row_keys(key, b)
    cache_dtype = jnp.dtype(mcfg.compute_dtype)
    cache = init_cache(mcfg, b, slots, dtype=cache_dtype)
    if p > 1:
        # Prefill all prompt tokens but the last without the LM head: the step that feeds the last
        # prompt token computes the only prompt logits we need ([B, 1, V] instead of [B, P, V]).
        _, _, cache = nnx.merge(graphdef, state)(tokens_bt[:, :-1], positions_bt[:, :-1],
                                                 mask_bt[:, :-1], cache, compute_logits=False)

    def cond(s: SamplerState):
        return (s.step < tr) & ~jnp.all(s.done)

    def body(s: SamplerState) -> SamplerState:
        model = nnx.merge(graphdef, state)
        logits, _, cache = model(s.last_token[:, None], s.last_position[:, None],
                                 s.last_mask[:, None], s.cache)
        token, logprob = sample_step(logits[:, 0], keys_b, s.step, cfg)
        live = ~s.done
        token = jnp.where(live, token, cfg.pad_id)
        done = s.done if cfg.eos_id is None else s.done | (token == cfg.eos_id)
        put = lambda buf, x: lax.dynamic_update_slice(buf, x[:, None], (0, s.step))
        return SamplerState(step=s.step + 1, cache=cache, last_token=token, last_mask=live,
                            last_position=s.last_position + 1, done=done,
                            tokens=put(s.tokens, token), mask=put(s.mask, live),
                            logprobs=put(s.logprobs, jnp.where(live, logprob, 0.0)))

    init = SamplerState(step=jnp.zeros((), jnp.int32), cache=cache, last_token=tokens_bt[:, -1],
                        last_mask=mask_bt[:, -1], last_position=positions_bt[:, -1],
                        done=jnp.zeros((b,), bool), tokens=jnp.full((b, tr), cfg.pad_id, jnp.int32),
                        mask=jnp.zeros((b, tr), bool), logprobs=jnp.zeros((b, tr), jnp.float32))
    final = lax.while_loop(cond, body, init)
    out_tokens, out_mask = truncate(final.tokens, final.mask, cfg)
    return SampleOutput(tokens=out_tokens, mask=out_mask,
                        logprobs=jnp.where(out_mask, final.logprobs, 0.0))


def sample(model: Transformer, prompt_tokens_bt: jax.Array, prompt_mask_bt: jax.Array,
           key: jax.Array, cfg: SamplingConfig) -> SampleOutput:
    """Sample a batch of responses with the KV cache; traceable (usable inside jit / nnx.jit).

    Args:
      model: the causal LM.
      prompt_tokens_bt: ``[B, P]`` int prompts, LEFT-padded (the last column must be a real token
        of every row; an all-padding row gives meaningless samples).
      prompt_mask_bt: ``[B, P]`` 1/True for real prompt tokens.
      key: a scalar PRNG key (row ``b`` uses ``fold_in(key, b)``) or ``[B]`` per-row keys.
      cfg: sampling configuration (static).

    Returns:
      :class:`SampleOutput` with ``[B, max_new_tokens]`` tokens, mask and log-probs.
    """
    graphdef, state = nnx.split(model)
    return sample_split(graphdef, state, prompt_tokens_bt, prompt_mask_bt, key, cfg)


_sample_split_jit = jax.jit(sample_split, static_argnames=("graphdef", "cfg"))


def sample_jit(model: Transformer, prompt_tokens_bt, prompt_mask_bt, key,
               cfg: SamplingConfig) -> SampleOutput:
    """:func:`sample` compiled once per (model structure, shapes, ``cfg``); cached by jax.jit."""
    graphdef, state = nnx.split(model)
    return _sample_split_jit(graphdef, state, jnp.asarray(prompt_tokens_bt),
                             jnp.asarray(prompt_mask_bt), key, cfg=cfg)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad token lists to ``[B, length]``; returns NumPy ``(tokens int32, mask bool)``."""
    length = length if length is not None else max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for i, s in enumerate(sequences):
        if not 0 < len(s) <= length:
            raise ValueError(f"sequence {i} has {len(s)} tokens; expected 1..{length}")
        tokens[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return tokens, mask


def generate_text(model: Transformer, tokenizer, prompts: list[str], cfg: SamplingConfig,
                  seed: int = 0) -> list[str]:
    """Sample one response per prompt and decode it (up to and excluding EOS / padding).

    ``cfg.eos_id`` defaults to ``tokenizer.eos_id`` and ``pad_id`` to ``tokenizer.pad_id`` when the
    config leaves them at their defaults. Prompts are left-padded to the longest one.
    """
    if not prompts:
        return []
    if cfg.eos_id is None:
        cfg = cfg.replace(eos_id=tokenizer.eos_id)
    if cfg.pad_id == 0 and tokenizer.pad_id is not None:
        cfg = cfg.replace(pad_id=tokenizer.pad_id)
    encoded = [tokenizer.encode(p) for p in prompts]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens; the sampler needs >= 1 per prompt")
    tokens, mask = left_pad(encoded, cfg.pad_id)
    out = sample_jit(model, tokens, mask, jax.random.key(seed), cfg)
    toks, msk = np.asarray(out.tokens), np.asarray(out.mask)
    texts = []
    for row, m in zip(toks, msk):
        ids = [int(t) for t in row[m]]
        if cfg.eos_id is not None and ids and ids[-1] == cfg.eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
