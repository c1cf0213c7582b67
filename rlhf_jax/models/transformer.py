"""Decoder-only transformer for the GPT-2 and Llama families, with an explicit KV cache.

One module covers both families; ``ModelConfig.family`` switches the parts that differ:

=============  =================================  ==========================================
               gpt2 (Radford et al. 2019)         llama (Touvron et al. 2023; Qwen2, SmolLM2)
=============  =================================  ==========================================
positions      learned table ``pos_embed[P, D]``  RoPE (Su et al. 2021), HF rotate-half layout
norm           LayerNorm (scale + bias)           RMSNorm (scale only)
MLP            GELU (tanh approx.), 4D            SwiGLU: ``down(silu(gate x) * up x)``
attention      N heads, biases everywhere         grouped-query (N query / K kv heads), no bias
                                                  except optional QKV bias (Qwen2)
=============  =================================  ==========================================

The model is used functionally (``graphdef, state = nnx.split(model)`` once, ``nnx.merge`` inside
jitted functions and ``lax.while_loop`` bodies). Shapes use the dimension vocabulary B batch,
T tokens of the chunk, S cache slots / key positions, D model, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, F MLP width, V vocab, L layers.

Mixed precision: parameters are f32; with ``compute_dtype="bfloat16"`` every matmul casts its
inputs to bf16 and accumulates in f32 (``preferred_element_type``). The residual stream, norms,
softmax and the returned logits/hidden are f32. On GPUs, XLA runs f32 matmuls in TF32 by default;
wrap calls in ``jax.default_matmul_precision("highest")`` where exact f32 is needed (parity checks).
"""
from __future__ import annotations

import functools
import math

import flax
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

# A large finite negative for masked scores: rows with no attendable key stay finite (uniform).
MASK_VALUE = -1e30


@flax.struct.dataclass
class KVCache:
    """Keys/values of all layers for ``S`` slots, filled left to right.

    Attributes:
      k: ``L`` arrays ``[B, K, S, H]``, the keys of each layer (after RoPE for the Llama family).
        Slots sit next to each other per head, so a decoding step reads each head's keys
        contiguously (on CPU about 3x faster attention than ``[B, S, K, H]``), and one array per
        layer is updated in place without slicing a layer out of an ``[L, ...]`` array (that
        slice was a copy of the layer's cache at every step, ~11% of GPT-2 sampling time).
      v: ``L`` arrays ``[B, K, S, H]``, the values.
      mask: ``[B, S]`` bool, which slots hold real (non-pad) tokens.
      index: int32 scalar, next slot to write.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of ``max_len`` slots for ``batch`` sequences."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    layers = range(cfg.num_layers)
    return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` clipped at 0, so left padding does not shift positions.

    Args:
      mask_bt: ``[B, T]`` 1/True for real tokens.

    Returns:
      ``[B, T]`` int32 positions; the first real token of each row gets 0, pads get 0.
    """
    if mask_bt.ndim != 2:
        raise ValueError(f"positions_from_mask expects mask [B, T], got shape {mask_bt.shape}")
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnums=2)
def _scaled_normal(key: jax.Array, std: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # One compiled program per shape (std is traced): eager init otherwise compiles the draw and
    # the scaling separately for every shape, which dominates model construction time on CPU.
    return std * jax.random.normal(key, shape, jnp.float32)


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
    return nnx.Param(_scaled_normal(rngs.params(), jnp.float32(std), tuple(shape)))


def _zeros(shape) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def _mm(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """``einsum`` with inputs cast to the compute dtype and f32 accumulation/output."""
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _dense(x: jax.Array, w: jax.Array, dtype, n_in: int = 1) -> jax.Array:
    """``x [..., *in] · w [*in, *out] -> [..., *out]`` (the last ``n_in`` axes of ``x``
    contracted with the first ``n_in`` of ``w``) as one 2-D matmul ``[rows, in] · [in, out]``,
    compute-dtype inputs, f32 accumulation/output.

    Same math as the ``einsum``; written as a plain 2-D ``dot`` because XLA's CPU backend then
    avoids transposing loop fusions in the backward pass (GPT-2-width reward-model step, 4
    layers: 3.1-3.4 s instead of 3.8-4.2 s).
    """
    lead, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    if w.shape[:n_in] != ins:
        raise ValueError(f"_dense: x {x.shape} and w {w.shape} do not share {n_in} axes")
    k = math.prod(ins)
    y = jnp.dot(x.reshape(-1, k).astype(dtype), w.reshape(k, -1).astype(dtype),
                preferred_element_type=jnp.float32)
    return y.reshape(lead + w.shape[n_in:])


def _adapted(module: nnx.Module, proj: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    """``y = x · W`` of projection ``proj`` plus its LoRA update when an adapter is attached.

    :func:`rlhf_jax.models.lora.apply_lora` attaches adapters as ``module.lora_<proj>`` (``proj``
    in ``qkv``, ``out``, ``up``, ``gate``, ``down``); a model without them has no such attribute,
    so its graph, parameters and outputs are exactly those of the plain model.
    """
    adapter = getattr(module, "lora_" + proj, None)
    return y if adapter is None else adapter(x, y, dtype)


class Norm(nnx.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) over the last axis, computed in f32."""

    def __init__(self, cfg: ModelConfig):
        self.rms = cfg.family == "llama"
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32))
        self.bias = None if self.rms else _zeros((cfg.d_model,))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(jnp.float32)
        lead = (1,) * (x.ndim - 1)
        scale = self.scale[...].reshape(lead + (-1,))
        if self.rms:
            return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + self.eps) * scale + self.bias[...].reshape(lead + (-1,))


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float):
    """cos/sin tables ``[B, T, H]`` for RoPE in HF's rotate-half layout.

    ``angle[b, t, i] = pos[b, t] * theta^(-2i/H)`` for ``i < H/2``, repeated for both halves.
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]`` (HF layout)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


class Attention(nnx.Module):
    """Causal multi-head / grouped-query self-attention with a fused QKV projection.

    ``qkv[D, N + 2K, H]`` holds the query heads, then the key heads, then the value heads, so both
    GPT-2's fused ``c_attn`` and Llama's separate ``q/k/v_proj`` map onto one einsum.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        self.qkv = _normal(rngs, (d, n + 2 * k, h), 0.02)
        self.qkv_bias = _zeros((n + 2 * k, h)) if cfg.family == "gpt2" or cfg.qkv_bias else None
        # GPT-2's scaled init of residual projections: std 0.02 / sqrt(2 L).
        self.out = _normal(rngs, (n, h, d), 0.02 / math.sqrt(2 * cfg.num_layers))
        self.out_bias = _zeros((d,)) if cfg.family == "gpt2" else None

    def __call__(self, x_btd, allowed_bts, rope, cache_kv, index):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        n, k = cfg.num_heads, cfg.num_kv_heads
        qkv = _adapted(self, "qkv", x_btd, _dense(x_btd, self.qkv[...], dtype), dtype)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...][None, None]
        q, key, val = qkv[:, :, :n], qkv[:, :, n:n + k], qkv[:, :, n + k:]
        if rope is not None:
            q, key = apply_rope(q, *rope), apply_rope(key, *rope)
        if cache_kv is not None:
            # Write this chunk at slots [index, index + T) of this layer, then attend to all S.
            k_cache, v_cache = cache_kv
            start = (0, 0, index, 0)
            k_cache = lax.dynamic_update_slice(  # [B, K, T, H] chunk
                k_cache, jnp.swapaxes(key, 1, 2).astype(k_cache.dtype), start)
            v_cache = lax.dynamic_update_slice(
                v_cache, jnp.swapaxes(val, 1, 2).astype(v_cache.dtype), start)
            cache_kv = (k_cache, v_cache)
            out_btnh = attend(q, k_cache, v_cache, allowed_bts, dtype, kv_layout="bksh")
        else:
            out_btnh = attend(q, key, val, allowed_bts, dtype)
        y = _adapted(self, "out", out_btnh, _dense(out_btnh, self.out[...], dtype, n_in=2), dtype)
        if self.out_bias is not None:
            y = y + self.out_bias[...][None, None]
        return y, cache_kv


def attend(q_btnh, k_bskh, v_bskh, allowed_bts, dtype=jnp.float32, kv_layout: str = "bskh"):
    """``softmax(q k^T / sqrt(H) + mask) v`` with grouped-query heads.

    Query head ``n`` uses kv head ``n // G``. The largest intermediate is the ``[B, K, G, T, S]``
    score tensor (= ``[B, N, T, S]``); kv heads are never repeated in memory.

    Args:
      q_btnh: ``[B, T, N, H]`` queries.
      k_bskh, v_bskh: ``[B, S, K, H]`` keys and values (``[B, K, S, H]`` with
        ``kv_layout="bksh"``, the KV cache's layout).
      allowed_bts: ``[B, T, S]`` bool, which keys each query may attend to.
      dtype: matmul input dtype (f32 accumulation).
      kv_layout: ``"bskh"`` or ``"bksh"``.

    Returns:
      ``[B, T, N, H]`` f32.
    """
    if kv_layout not in ("bskh", "bksh"):
        raise ValueError(f"attend: kv_layout={kv_layout!r}; expected 'bskh' or 'bksh'")
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2 if kv_layout == "bskh" else 1]
    q = (q_btnh * (1.0 / math.sqrt(h))).reshape(b, t, k, n // k, h)
    scores = _mm(f"btkgh,{kv_layout}->bkgts", q, k_bskh, dtype)
    scores = jnp.where(allowed_bts[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = _mm(f"bkgts,{kv_layout}->btkgh", probs, v_bskh, dtype)
    return out.reshape(b, t, n, h)


class MLP(nnx.Module):
    """GPT-2: ``proj(gelu_tanh(fc x))``; Llama: ``down(silu(gate x) * up x)`` (SwiGLU)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.mlp_dim
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        self.up = _normal(rngs, (d, f), 0.02)
        self.down = _normal(rngs, (f, d), out_std)
        if cfg.family == "gpt2":
            self.gate = None
            self.up_bias, self.down_bias = _zeros((f,)), _zeros((d,))
        else:
            self.gate = _normal(rngs, (d, f), 0.02)
            self.up_bias = self.down_bias = None

    def __call__(self, x_btd):
        dtype = jnp.dtype(self.cfg.compute_dtype)
        up = _adapted(self, "up", x_btd, _dense(x_btd, self.up[...], dtype), dtype)
        if self.gate is None:
            hidden = jax.nn.gelu(up + self.up_bias[...][None, None], approximate=True)
            out = _adapted(self, "down", hidden, _dense(hidden, self.down[...], dtype), dtype)
            return out + self.down_bias[...][None, None]
        gate = _adapted(self, "gate", x_btd, _dense(x_btd, self.gate[...], dtype), dtype)
        hidden = jax.nn.silu(gate) * up
        return _adapted(self, "down", hidden, _dense(hidden, self.down[...], dtype), dtype)


class Block(nnx.Module):
    """Pre-norm residual block: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, allowed_bts, rope, cache_kv, index):
        y, cache_kv = self.attn(self.attn_norm(x_btd), allowed_bts, rope, cache_kv, index)
        x_btd = x_btd + y
        return x_btd + self.mlp(self.mlp_norm(x_btd)), cache_kv


def _remat_block(block: Block, x_btd, allowed_bts, rope):
    """``block`` without a cache under ``jax.checkpoint``: its activations are recomputed in the
    backward pass (``ModelConfig.remat``)."""
    graphdef, state = nnx.split(block)

    def run(state, x_btd, allowed_bts, rope):
        return nnx.merge(graphdef, state)(x_btd, allowed_bts, rope, None, 0)[0]

    return jax.checkpoint(run)(state, x_btd, allowed_bts, rope)


class Transformer(nnx.Module):
    """Decoder-only causal LM (GPT-2 or Llama family, see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), 0.02)
        self.pos_embed = (_normal(rngs, (cfg.max_seq_len, cfg.d_model), 0.01)
                          if cfg.family == "gpt2" else None)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg)
        self.lm_head = (None if cfg.tie_embeddings else
                        _normal(rngs, (cfg.d_model, cfg.vocab_size), 0.02))

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """The LM head: f32 ``[B, T, V]`` logits of final hidden states ``[B, T, D]``.

        Call it on a slice of ``hidden`` (``compute_logits=False``) when only some positions
        need logits, e.g. the response tokens in PPO: the head is the largest matmul of a small
        model with a 50k vocabulary.
        """
        dtype = jnp.dtype(self.cfg.compute_dtype)
        if self.lm_head is None:
            return _mm("btd,vd->btv", hidden_btd, self.embed[...], dtype)
        return _dense(hidden_btd, self.lm_head[...], dtype)

    def __call__(self, tokens_bt, positions_bt, attention_mask_bt, cache: KVCache | None = None,
                 *, compute_logits: bool = True, num_layers: int | None = None):
        """Run a chunk of tokens, optionally appending it to a KV cache.

        Without a cache, token ``i`` attends to tokens ``j <= i`` with ``attention_mask[j]``. With a
        cache, the chunk's keys/values are written at slots ``[index, index + T)``, ``cache.mask``
        there is set from ``attention_mask_bt``, and the query in slot ``index + i`` attends to
        slots ``j <= index + i`` with ``mask[j]``.

        Args:
          tokens_bt: ``[B, T]`` int token ids.
          positions_bt: ``[B, T]`` int positions (``positions_from_mask`` for left padding).
          attention_mask_bt: ``[B, T]`` 1/True for real tokens of this chunk.
          cache: optional ``KVCache`` with ``B`` rows and at least ``index + T`` slots.
          compute_logits: skip the LM head (scalar heads only need hidden states).
          num_layers: run only the first N blocks (no cache, no logits): ``hidden`` is then the
            final norm of block N's output, the features a reward head can read from the middle
            of the network (:class:`rlhf_jax.models.heads.ScalarModel` ``layer``).

        Returns:
          ``(logits_btv | None, hidden_btd, cache | None)``; logits and hidden (after the final
          norm) are f32; the cache has ``index + T``.
        """
        cfg = self.cfg
        for name, arr in (("tokens_bt", tokens_bt), ("positions_bt", positions_bt),
                          ("attention_mask_bt", attention_mask_bt)):
            if arr.ndim != 2 or arr.shape != tokens_bt.shape:
                raise ValueError(f"Transformer: {name} must be [B, T] = {tokens_bt.shape}, "
                                 f"got shape {arr.shape}")
        if num_layers is not None and not (
                0 <= num_layers <= cfg.num_layers and cache is None and not compute_logits):
            raise ValueError(f"Transformer: num_layers={num_layers} needs 0 <= N <= "
                             f"{cfg.num_layers}, no cache and compute_logits=False")
        b, t = tokens_bt.shape
        mask_bt = attention_mask_bt.astype(bool)

        x = self.embed[...][tokens_bt]
        if self.pos_embed is not None:
            x = x + self.pos_embed[...][positions_bt]
        rope = (rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta)
                if cfg.family == "llama" else None)

        if cache is None:
            q_slot, k_slot, key_mask_bs, index = jnp.arange(t), jnp.arange(t), mask_bt, 0
        else:
            if (len(cache.k) != cfg.num_layers or cache.k[0].shape[0] != b
                    or cache.k[0].shape[2] < t):
                raise ValueError(f"Transformer: cache k {len(cache.k)} x {cache.k[0].shape} "
                                 f"(L x [B, K, S, H]) does not fit L={cfg.num_layers} layers "
                                 f"and a chunk of B={b}, T={t}")
            index = cache.index
            key_mask_bs = lax.dynamic_update_slice(cache.mask, mask_bt, (0, index))
            q_slot, k_slot = index + jnp.arange(t), jnp.arange(cache.k[0].shape[2])
        causal_ts = k_slot[None, :] <= q_slot[:, None]
        allowed_bts = causal_ts[None] & key_mask_bs[:, None, :]

        new_kv = []  # (k, v) of each layer after this chunk; only with a cache
        blocks = self.blocks if num_layers is None else self.blocks[:num_layers]
        for layer, block in enumerate(blocks):
            layer_kv = None if cache is None else (cache.k[layer], cache.v[layer])
            if cfg.remat and cache is None:
                x = _remat_block(block, x, allowed_bts, rope)
            else:
                x, layer_kv = block(x, allowed_bts, rope, layer_kv, index)
            new_kv.append(layer_kv)
        hidden = self.final_norm(x)

        logits = self.logits(hidden) if compute_logits else None
        if cache is not None:
            cache = KVCache(k=tuple(k for k, _ in new_kv), v=tuple(v for _, v in new_kv),
                            mask=key_mask_bs, index=index + t)
        return logits, hidden, cache
