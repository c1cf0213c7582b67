"""Tests of the KV-cache sampler against independent oracles.

Oracles: the full (cache-free) forward pass, a slow NumPy-driven argmax loop that recomputes the
whole sequence every step, NumPy implementations of top-k / nucleus filtering, hand-computed
outputs of a model whose logits are forced to a fixed vector, and empirical frequencies over 20k
vectorised draws.
"""
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import generation as g
from rlhf_jax import parallel
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.transformer import positions_from_mask, Transformer

B, P, TR = 8, 10, 12
PAD = 1


def _peaky(cfg, seed=0):
    """A random model with confident, context-dependent predictions (default init is ~uniform)."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))

    def scale(path, x):
        name = jax.tree_util.keystr(path)
        if any(f"'{n}'" in name for n in ("qkv", "out", "up", "down", "gate")):
            return x * 8.0
        if "'embed'" in name or "'lm_head'" in name:
            return x * 15.0
        return x

    nnx.update(model, jax.tree_util.tree_map_with_path(scale, nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def model():
    return _peaky(PRESETS["tiny"])


def _prompts(lengths, seed, p, vocab=512):
    rng = np.random.default_rng(seed)
    return g.left_pad([list(rng.integers(2, vocab, n)) for n in lengths], PAD, p)


@pytest.fixture(scope="module")
def batch_a():
    """[8, 10] prompts with 0..9 padding."""
    return _prompts([5, 10, 7, 3, 1, 9, 2, 6], 0, P)


def _row_keys(ids):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(42), i))(jnp.asarray(ids))


# eos_id 345 is a token this model samples mid-response in rows 1 and 3 (asserted below).
SAMPLED = g.SamplingConfig(max_new_tokens=TR, temperature=0.7, eos_id=345, pad_id=PAD)
GREEDY = g.SamplingConfig(max_new_tokens=TR, greedy=True, pad_id=PAD)


@pytest.fixture(scope="module")
def sampled_a(model, batch_a):
    keys = _row_keys(np.arange(B))
    return keys, g.sample_jit(model, *batch_a, keys, SAMPLED)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward(graphdef, state, tokens, mask):
    logits, _, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)
    return logits


def _check_logprobs_match_full_forward(model, prompt, prompt_mask, out, temperature):
    tokens = jnp.concatenate([jnp.asarray(prompt), out.tokens], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask), out.mask], axis=1)
    logits = _full_forward(*nnx.split(model), tokens, mask)
    p = prompt.shape[1]
    logp = jax.nn.log_softmax(logits[:, p - 1:-1] / temperature, axis=-1)
    want = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], -1)[..., 0]
    m = np.asarray(out.mask)
    assert m.sum() > 0
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], want[m], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.logprobs)[~m], 0.0)


# --------------------------------------------------------------------------------------------------
# The model-based invariants.

def test_incremental_logprobs_equal_full_forward(model, batch_a, sampled_a):
    _, out = sampled_a
    _check_logprobs_match_full_forward(model, *batch_a, out, SAMPLED.temperature)
    # The run must exercise both the early stop of some rows and full-length rows.
    m = np.asarray(out.mask)
    assert len(set(m.sum(1).tolist())) > 1


def test_incremental_logprobs_equal_full_forward_llama():
    model = _peaky(PRESETS["tiny-llama"])
    prompt, mask = _prompts([4, 10, 1, 7], 1, P)
    cfg = g.SamplingConfig(max_new_tokens=TR, temperature=1.3, pad_id=PAD)
    out = g.sample_jit(model, prompt, mask, jax.random.key(3), cfg)
    assert np.asarray(out.mask).all()
    _check_logprobs_match_full_forward(model, prompt, mask, out, cfg.temperature)


def test_greedy_equals_full_recompute_argmax_loop(model, batch_a):
    prompt, pmask = batch_a
    out = g.sample_jit(model, prompt, pmask, jax.random.key(0), GREEDY)
    # Slow oracle: no cache; the whole sequence is re-run every step (right side masked off).
    graphdef, state = nnx.split(model)
    seq = np.concatenate([prompt, np.full((B, TR), PAD, np.int32)], axis=1)
    msk = np.concatenate([pmask, np.zeros((B, TR), bool)], axis=1)
    for t in range(TR):
        logits = _full_forward(graphdef, state, jnp.asarray(seq), jnp.asarray(msk))
        seq[:, P + t] = np.argmax(np.asarray(logits[:, P - 1 + t]), axis=-1)
        msk[:, P + t] = True
    np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, P:])
    assert np.asarray(out.mask).all()
    assert len(np.unique(seq[:, P:])) > 8   # the model is not degenerate


def test_left_padding_does_not_change_samples(model, batch_a, sampled_a):
    """Row b draws with fold_in(row_key_b, t): independent of its padding and its row index.

    Batch B holds prompts 0 (x, 5 tokens), 3 (3 tokens) and 6 (2 tokens) of batch A, now padded
    to 5 instead of 10 and placed in other rows; with each row given the same key as in batch A,
    greedy and sampled tokens must equal those of batch A.
    """
    prompt_a, mask_a = batch_a
    src = np.array([3, 0, 6, 0, 3, 6, 0, 3])
    prompt_b, mask_b = prompt_a[src, -5:], mask_a[src, -5:]
    assert not mask_b.all() and mask_b[:, -1].all()
    greedy_a = g.sample_jit(model, prompt_a, mask_a, jax.random.key(0), GREEDY)
    greedy_b = g.sample_jit(model, prompt_b, mask_b, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(greedy_b.tokens), np.asarray(greedy_a.tokens)[src])

    keys_a, out_a = sampled_a
    out_b = g.sample_jit(model, prompt_b, mask_b, keys_a[src], SAMPLED)
    np.testing.assert_array_equal(np.asarray(out_b.tokens), np.asarray(out_a.tokens)[src])
    np.testing.assert_array_equal(np.asarray(out_b.mask), np.asarray(out_a.mask)[src])
    np.testing.assert_allclose(np.asarray(out_b.logprobs), np.asarray(out_a.logprobs)[src],
                               atol=1e-4)


def test_keys_determine_samples(model, batch_a, sampled_a):
    keys, out = sampled_a
    again = g.sample_jit(model, *batch_a, keys, SAMPLED)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    other = g.sample_jit(model, *batch_a, _row_keys(np.arange(B) + 100), SAMPLED)
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()
    # A scalar key means row keys fold_in(key, b).
    scalar = g.sample_jit(model, *batch_a, jax.random.key(42), SAMPLED)
    np.testing.assert_array_equal(np.asarray(scalar.tokens), np.asarray(out.tokens))


def test_traceable_in_nnx_jit_and_sharded_jax_jit(model, batch_a, sampled_a, mesh8):
    keys, out = sampled_a

    @functools.partial(nnx.jit, static_argnames=("cfg",))
    def rollout(m, prompt, mask, key, cfg):
        return g.sample(m, prompt, mask, key, cfg)

    via_nnx = rollout(model, jnp.asarray(batch_a[0]), jnp.asarray(batch_a[1]), keys, SAMPLED)
    np.testing.assert_array_equal(np.asarray(via_nnx.tokens), np.asarray(out.tokens))

    # Our own jax.jit over (graphdef, state), with the batch split over 8 devices.
    graphdef, state = nnx.split(model)
    step = jax.jit(g.sample_split, static_argnames=("graphdef", "cfg"))
    prompt, mask, keys_s = parallel.shard_batch((jnp.asarray(batch_a[0]), jnp.asarray(batch_a[1]),
                                                 keys), mesh8)
    sharded = step(graphdef, parallel.replicate(state, mesh8), prompt, mask, keys_s, cfg=SAMPLED)
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(out.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.mask), np.asarray(out.mask))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(out.logprobs), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Hand-built cases on a model whose logits are a fixed vector at every step.

def _forced_model(logits_v):
    """Untied tiny model: final norm scale 0 and bias e_0, so logits = lm_head[0] everywhere."""
    cfg = PRESETS["tiny"].replace(tie_embeddings=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.final_norm.scale[...] = jnp.zeros((cfg.d_model,))
    model.final_norm.bias[...] = jnp.zeros((cfg.d_model,)).at[0].set(1.0)
    model.lm_head[...] = jnp.zeros((cfg.d_model, cfg.vocab_size)).at[0].set(jnp.asarray(logits_v))
    return model


def _forced_logits(values: dict[int, float], v=512, rest=-30.0):
    logits = np.full(v, rest, np.float32)
    for k, x in values.items():
        logits[k] = x
    return logits


EOS = 7


# One compiled program serves every forced greedy case (same shapes, same config).
FORCED_GREEDY = g.SamplingConfig(max_new_tokens=8, greedy=True, eos_id=EOS, pad_id=PAD,
                                 min_new_tokens=3, temperature=2.0, truncate_token=13,
                                 truncate_after=4)


def _forced_greedy(logits):
    prompt, mask = _prompts([3, 6], 5, 6)
    return g.sample_jit(_forced_model(logits), prompt, mask, jax.random.key(0), FORCED_GREEDY)


def test_greedy_eos_min_new_tokens_and_padding():
    logits = _forced_logits({EOS: 9.0, 20: 8.0, 21: 2.0})
    out = _forced_greedy(logits)
    # EOS is the argmax but masked for t < 3: three 20s, then EOS, then padding.
    want = np.array([20, 20, 20, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack([want, want]))
    np.testing.assert_array_equal(np.asarray(out.mask), np.stack([np.arange(8) <= 3] * 2))
    # Log-probs are of the tempered, unfiltered distribution (EOS mask not applied).
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / 2.0))
    want_lp = np.array([logp[20]] * 3 + [logp[EOS]] + [0.0] * 4)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.stack([want_lp] * 2), rtol=1e-5)


def test_truncate_applied_by_sampler():
    out = _forced_greedy(_forced_logits({13: 5.0, 20: 4.0}))
    # Cut right after the first 13 at index >= 4; the 13 at index 4 is kept.
    np.testing.assert_array_equal(np.asarray(out.tokens), [[13] * 5 + [PAD] * 3] * 2)
    np.testing.assert_array_equal(np.asarray(out.mask), [[1] * 5 + [0] * 3] * 2)
    np.testing.assert_array_equal(np.asarray(out.logprobs)[:, 5:], 0.0)
    assert (np.asarray(out.logprobs)[:, :5] < 0).all()


def test_sampled_eos_rows_stop_independently():
    logits = _forced_logits({EOS: 1.0, 20: 1.5, 21: 1.2, 22: 0.5})
    model = _forced_model(logits)
    prompt, mask = _prompts([2, 4, 1, 4, 3, 2, 4, 1] * 4, 6, 4)
    cfg = g.SamplingConfig(max_new_tokens=10, eos_id=EOS, pad_id=PAD, min_new_tokens=2)
    out = g.sample_jit(model, prompt, mask, jax.random.key(7), cfg)
    toks, m, lp = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    stopped = 0
    for row, rm, rl in zip(toks, m, lp):
        eos_at = np.flatnonzero(row == EOS)
        end = eos_at[0] if len(eos_at) else len(row) - 1
        stopped += bool(len(eos_at))
        assert end >= 2                                   # min_new_tokens
        np.testing.assert_array_equal(rm, np.arange(len(row)) <= end)
        np.testing.assert_array_equal(row[end + 1:], PAD)
        assert set(row[:end + 1].tolist()) <= {EOS, 20, 21, 22}
        np.testing.assert_allclose(rl[rm], logp[row[rm]], rtol=1e-5)
        np.testing.assert_array_equal(rl[~rm], 0.0)
    assert 0 < stopped < len(toks)


def test_truncate_rule_hand_cases():
    tokens = jnp.array([[5, 13, 2, 13, 4, 13],
                        [13, 1, 2, 3, 4, 5],
                        [1, 2, 3, 13, EOS, PAD],
                        [1, 2, 3, 4, 5, 6]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1] * 6, [1, 1, 1, 1, 1, 0], [1] * 6], bool)
    cfg = g.SamplingConfig(max_new_tokens=6, truncate_token=13, truncate_after=2, pad_id=PAD)
    t, m = g.truncate(tokens, mask, cfg)
    np.testing.assert_array_equal(np.asarray(t), [[5, 13, 2, 13, PAD, PAD],
                                                  [13, 1, 2, 3, 4, 5],
                                                  [1, 2, 3, 13, PAD, PAD],
                                                  [1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(np.asarray(m), [[1, 1, 1, 1, 0, 0], [1] * 6,
                                                  [1, 1, 1, 1, 0, 0], [1] * 6])


def test_generate_text_decodes_up_to_eos():
    from rlhf_jax.data.tokenizers import train_bpe
    tok = train_bpe(["a cat sat on a mat", "the dog ran far away"] * 20, vocab_size=300)
    a_id = tok.encode("a")[0]
    model = _forced_model(_forced_logits({tok.eos_id: 6.0, a_id: 5.0}))
    cfg = g.SamplingConfig(max_new_tokens=6, greedy=True, min_new_tokens=3)
    texts = g.generate_text(model, tok, ["the cat", "a dog ran on the mat"], cfg, seed=0)
    assert texts == ["aaa", "aaa"]


# --------------------------------------------------------------------------------------------------
# Filters and draws on fixed distributions.

def _np_filter_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """NumPy oracle: sort, keep top-k, keep the nucleus (mass before < top_p), renormalise."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        ps = p[order]
        before = np.cumsum(ps) - ps
        nucleus = order[(before < top_p) & (ps > 0)]
        p = np.where(np.isin(np.arange(len(z)), nucleus), p, 0.0)
        p /= p.sum()
    return p


SMALL = np.array([1.0, 3.0, -2.0, 0.5, 2.2, 2.9, -1.0, 0.0, 1.7, -0.5], np.float32)
FILTERS = [dict(), dict(temperature=0.6), dict(top_k=3), dict(top_p=0.7),
           dict(top_k=6, top_p=0.8, temperature=1.4), dict(top_p=0.35)]


@pytest.mark.parametrize("kw", FILTERS)
def test_sampling_probs_match_numpy_oracle(kw):
    cfg = g.SamplingConfig(max_new_tokens=1, **kw)
    got = np.asarray(g.sampling_probs(jnp.asarray(SMALL)[None], 0, cfg))[0]
    np.testing.assert_allclose(got, _np_filter_probs(SMALL, **kw), atol=1e-6)


@functools.partial(jax.jit, static_argnames=("cfg", "n"))
def _draw(logits_v, cfg, n):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(n))
    return g.sample_step(jnp.broadcast_to(logits_v[None], (n, logits_v.shape[0])), keys,
                         jnp.int32(0), cfg)


def _check_frequencies(logits, kw, n):
    """Frequencies of tokens with >= 50 expected draws, and of the remaining tokens pooled in runs
    of 64 consecutive ids, are within 4 standard errors of the renormalised probabilities."""
    cfg = g.SamplingConfig(max_new_tokens=1, **kw)
    tokens, logprobs = _draw(jnp.asarray(logits), cfg, n)
    want = _np_filter_probs(logits, **kw)
    counts = np.bincount(np.asarray(tokens), minlength=len(logits))
    assert counts[want == 0].sum() == 0, "a filtered-out token was sampled"
    big = want * n >= 50
    groups = [(f"token {i}", want[i], counts[i]) for i in np.flatnonzero(big)]
    for start in range(0, len(logits), 64):
        sl = slice(start, start + 64)
        rest = ~big[sl]
        groups.append((f"ids {start}..", np.sum(want[sl] * rest), np.sum(counts[sl] * rest)))
    for name, p, c in groups:
        se = np.sqrt(p * (1 - p) / n)
        assert abs(c / n - p) <= 4 * se + 1e-12, (name, c / n, p)
    # Returned log-probs: tempered, unfiltered.
    logp = np.log(_np_filter_probs(logits, temperature=kw.get("temperature", 1.0)))
    np.testing.assert_allclose(np.asarray(logprobs), logp[np.asarray(tokens)], atol=1e-5)


@pytest.mark.parametrize("kw", FILTERS[1:5])
def test_empirical_frequencies_small_vocab(kw):
    """20k draws; every token's frequency within 4 standard errors of the renormalised p."""
    _check_frequencies(SMALL, kw, 20000)


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(top_p=0.9), dict(top_p=0.2)])
def test_empirical_frequencies_two_level_vocab(kw):
    """V = 1500: the blockwise inverse CDF; top_p 0.9 needs the bisection nucleus threshold, 0.2
    is reached by the 64 most likely tokens (the fast path)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, 1500).astype(np.float32)
    peaks = [3, 255, 256, 511, 777, 1023, 1024, 1100, 1280, 1499]
    logits[peaks] = 3.5 + rng.normal(0, 0.7, len(peaks))
    assert len(np.unique(logits)) == len(logits)
    _check_frequencies(logits, kw, 20000)


def test_nucleus_fast_path_equals_bisection():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (6, 700)).astype(np.float32)
    logits[5, :300] = 1.0                            # a wide tie straddling the boundary
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    for top_p in (0.05, 0.3, 0.6):
        fast = g._nucleus_threshold(probs, top_p, candidates=700)
        slow = g._nucleus_threshold_bisect(probs, top_p)
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))
        kept = np.asarray(probs >= fast[:, None])
        for row, p in zip(kept, np.asarray(logits)):
            np.testing.assert_array_equal(row, _np_filter_probs(p, top_p=top_p) > 0)


def test_greedy_step_takes_filtered_argmax():
    logits = jnp.asarray(np.stack([SMALL, SMALL[::-1]]))
    cfg = g.SamplingConfig(max_new_tokens=4, greedy=True, eos_id=1, min_new_tokens=2)
    keys = jax.random.split(jax.random.key(0), 2)
    tok0, _ = g.sample_step(logits, keys, 0, cfg)          # EOS (id 1, the argmax) masked
    tok2, _ = g.sample_step(logits, keys, 2, cfg)
    np.testing.assert_array_equal(np.asarray(tok0), [5, 8])
    np.testing.assert_array_equal(np.asarray(tok2), [1, 8])


def test_inverse_cdf_never_picks_zero_probability():
    probs = jnp.array([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = jnp.array([0.0, 0.25, 0.5, 0.999999, 1.0])
    np.testing.assert_array_equal(np.asarray(g.inverse_cdf(probs, u)), [2, 2, 4, 4, 4])


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="temperature"):
        g.SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        g.SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        g.SamplingConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        g.sample(model, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool), jax.random.key(0),
                 GREEDY)
    with pytest.raises(ValueError, match="max_seq_len"):
        g.sample(model, jnp.zeros((2, 120), jnp.int32), jnp.ones((2, 120), bool),
                 jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match=r"\[B=2\] keys"):
        g.sample(model, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool),
                 jax.random.split(jax.random.key(0), 3), GREEDY)
