"""Transformer, KV cache and scalar heads: invariances and independent NumPy oracles."""
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig, PRESETS
from rlhf_jax.models.heads import ScalarEnsemble, ScalarHead, ScalarModel
from rlhf_jax.models.transformer import attend, init_cache, positions_from_mask, Transformer

FAMILIES = ["tiny", "tiny-llama"]
B, T, PROMPT = 3, 12, 7


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """GPUs default to TF32 for f32 matmuls (~1e-2 logit error); CPU is unaffected."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return Transformer(PRESETS[request.param], rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def fwd(model):
    """Jitted functional forward ``(tokens, pos, mask) -> (logits, hidden)`` of ``model``."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t, p, m: nnx.merge(graphdef, s)(t, p, m)[:2])
    return lambda t, p, m: f(state, t, p, m)


@pytest.fixture(scope="module")
def batch():
    """Left-padded batch: row 0 has 3 pads, row 1 has 1, row 2 none."""
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 512)
    mask = jnp.ones((B, T), bool).at[0, :3].set(False).at[1, :1].set(False)
    return tokens, mask, positions_from_mask(mask)


def _masked_max_err(a_btv, b_btv, mask_bt):
    return float(jnp.max(jnp.where(mask_bt[..., None], jnp.abs(a_btv - b_btv), 0.0)))


def test_positions_from_mask_hand_case():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        positions_from_mask(jnp.ones((5,)))


def test_attend_matches_numpy_loop_with_gqa():
    rng = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 3, 5, 4, 2, 8
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    kk = rng.normal(size=(b, s, k, h)).astype(np.float32)
    v = rng.normal(size=(b, s, k, h)).astype(np.float32)
    allowed = rng.random((b, t, s)) < 0.6
    allowed[0, 1] = False  # a row with nothing to attend to must stay finite
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), jnp.asarray(allowed)))
    want = np.zeros_like(got)
    for bi in range(b):
        for ti in range(t):
            for ni in range(n):
                kv = ni // (n // k)
                keys = np.nonzero(allowed[bi, ti])[0]
                sc = kk[bi, keys, kv] @ q[bi, ti, ni] / np.sqrt(h)
                if len(keys) == 0:  # uniform over all slots, as a finite masked softmax gives
                    keys, sc = np.arange(s), np.zeros(s, np.float32)
                p = np.exp(sc - sc.max())
                want[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, kv]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_eager_forward_shapes_and_jit_equality(model, fwd, batch):
    tokens, mask, pos = batch
    logits, hidden, cache = model(tokens, pos, mask)
    assert cache is None and logits.dtype == jnp.float32 and hidden.dtype == jnp.float32
    assert logits.shape == (B, T, model.cfg.vocab_size) and hidden.shape == (B, T, 64)
    assert bool(jnp.isfinite(logits).all())  # pad rows included
    jit_logits, jit_hidden = fwd(tokens, pos, mask)
    np.testing.assert_allclose(jit_logits, logits, atol=1e-5)
    np.testing.assert_allclose(jit_hidden, hidden, atol=1e-5)
    no_logits, hidden2, _ = model(tokens, pos, mask, compute_logits=False)
    assert no_logits is None
    np.testing.assert_array_equal(hidden2, hidden)


def test_left_padding_equals_unpadded_row(fwd, batch):
    tokens, mask, pos = batch
    logits, _ = fwd(tokens, pos, mask)
    # Row 0 without its 3 pads: the real positions must give identical logits (masked == sliced).
    alone, _ = fwd(tokens[:, 3:], pos[:, 3:], mask[:, 3:])
    np.testing.assert_allclose(logits[0, 3:], alone[0], atol=1e-5)
    # The pads are really ignored: changing pad tokens does not move real logits.
    other, _ = fwd(tokens.at[0, :3].set(5), pos, mask)
    assert _masked_max_err(other, logits, mask) < 1e-5
    # Causality: changing the last token does not move earlier logits, but moves the last.
    changed, _ = fwd(tokens.at[:, -1].add(1), pos, mask)
    assert _masked_max_err(changed[:, :-1], logits[:, :-1], mask[:, :-1]) < 1e-5
    assert float(jnp.abs(changed[:, -1] - logits[:, -1]).max()) > 1e-4


def _incremental(model, tokens, mask, pos, cache):
    outs = []
    lg, _, cache = model(tokens[:, :PROMPT], pos[:, :PROMPT], mask[:, :PROMPT], cache)
    outs.append(lg)
    for i in range(PROMPT, T):
        lg, _, cache = model(tokens[:, i:i + 1], pos[:, i:i + 1], mask[:, i:i + 1], cache)
        outs.append(lg)
    return jnp.concatenate(outs, axis=1), cache


def test_kv_cache_matches_full_forward_eager(model, fwd, batch):
    tokens, mask, pos = batch
    full, _ = fwd(tokens, pos, mask)
    inc, cache = _incremental(model, tokens, mask, pos, init_cache(model.cfg, B, T + 4))
    assert int(cache.index) == T
    np.testing.assert_array_equal(cache.mask[:, :T], mask)
    assert not bool(cache.mask[:, T:].any())
    assert _masked_max_err(inc, full, mask) < 1e-4


def test_kv_cache_matches_full_forward_jit_while_loop(model, fwd, batch):
    """Functional use as a sampler does it: split once, merge inside jit and a fori_loop body."""
    tokens, mask, pos = batch
    full, _ = fwd(tokens, pos, mask)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, tokens, mask, pos):
        m = nnx.merge(graphdef, state)
        cache = init_cache(m.cfg, B, T)
        lg, _, cache = m(tokens[:, :PROMPT], pos[:, :PROMPT], mask[:, :PROMPT], cache)
        out = jnp.zeros((B, T, m.cfg.vocab_size), jnp.float32).at[:, :PROMPT].set(lg)

        def body(i, carry):
            out, cache = carry
            m = nnx.merge(graphdef, state)
            sl = lambda x: lax.dynamic_slice_in_dim(x, i, 1, axis=1)
            lg, _, cache = m(sl(tokens), sl(pos), sl(mask), cache)
            return lax.dynamic_update_slice_in_dim(out, lg, i, axis=1), cache

        return lax.fori_loop(PROMPT, T, body, (out, cache))

    out, cache = decode(state, tokens, mask, pos)
    assert int(cache.index) == T
    assert _masked_max_err(out, full, mask) < 1e-4


def test_bf16_compute_close_to_f32(model, fwd, batch):
    tokens, mask, pos = batch
    full, _ = fwd(tokens, pos, mask)
    bf16 = Transformer(model.cfg.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(bf16, nnx.state(model))
    lg, _, _ = nnx.jit(lambda m: m(tokens, pos, mask))(bf16)
    assert lg.dtype == jnp.float32 and bool(jnp.isfinite(lg).all())
    err = _masked_max_err(lg, full, mask)
    assert 0 < err < 0.05 * float(jnp.abs(full).max()) + 1e-2


def test_rank_and_shape_errors(model):
    x = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="positions_bt"):
        model(x, jnp.zeros((2, 5), jnp.int32), x)
    with pytest.raises(ValueError, match="tokens_bt"):
        model(jnp.zeros((2, 4, 1), jnp.int32), x, x)
    with pytest.raises(ValueError, match="cache"):
        model(x, x, x, init_cache(model.cfg, 3, 8))


def test_config_validation():
    with pytest.raises(ValueError, match="family"):
        ModelConfig("bert", 10, 1, 8, 2, 2, 16, 8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig("llama", 10, 1, 8, 4, 3, 16, 8)
    assert PRESETS["smollm2-135m"].head_dim == 64 and PRESETS["gpt2"].head_dim == 64


# --- scalar heads -----------------------------------------------------------------------------

def test_value_head_is_zero_at_init_and_reward_head_std():
    hidden = jax.random.normal(jax.random.key(0), (2, 5, 64))
    value = ScalarHead(64, init="value", rngs=nnx.Rngs(0))
    out = value(hidden)
    assert out.shape == (2, 5)
    np.testing.assert_array_equal(out, 0.0)
    d = 4095
    reward = ScalarHead(d, init="reward", rngs=nnx.Rngs(1))
    std = float(jnp.std(reward.w[...]))
    assert abs(std * np.sqrt(d + 1) - 1.0) < 0.05
    # Unit-variance features give roughly unit-variance rewards at init.
    feats = jax.random.normal(jax.random.key(2), (4, 64, d))
    assert 0.8 < float(jnp.std(reward(feats))) < 1.2
    with pytest.raises(ValueError, match=r"\[B, T, D"):
        reward(feats[0])


def test_scalar_head_gain_bias_formula():
    head = ScalarHead(3, init="reward", rngs=nnx.Rngs(0))
    head.gain[...] = jnp.asarray(2.0)
    head.bias[...] = jnp.asarray(-1.0)
    head.b[...] = jnp.asarray(0.5)
    h = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    want = 2.0 * (h @ np.asarray(head.w[...]) + 0.5) - 1.0
    np.testing.assert_allclose(head(jnp.asarray(h)), want, rtol=1e-6)


def test_scalar_model_from_lm_uses_lm_hidden(model, fwd, batch):
    tokens, mask, pos = batch
    sm = ScalarModel.from_lm(model, "reward", nnx.Rngs(3))
    values = nnx.jit(lambda m: m(tokens, pos, mask))(sm)
    assert values.shape == (B, T)
    _, hidden = fwd(tokens, pos, mask)
    want = jnp.einsum("btd,d->bt", hidden, sm.head.w[...])
    np.testing.assert_allclose(values, want, atol=1e-5)
    # A copy, not an alias: training the scalar model leaves the LM untouched.
    sm.backbone.embed[...] = sm.backbone.embed[...] + 1.0
    assert float(jnp.abs(model.embed[...] - sm.backbone.embed[...]).max()) == pytest.approx(1.0)


def test_ensemble_disagreement_penalty_is_mean_minus_lambda_times_member_variance(model, batch):
    """Coste et al.'s uncertainty-weighted reward, per token, against NumPy on three members."""
    tokens, mask, pos = batch
    members = [ScalarModel.from_lm(model, "reward", nnx.Rngs(s)) for s in (3, 4, 5)]
    outs = np.stack([np.asarray(m(tokens, pos, mask)) for m in members])  # [M, B, T]
    assert outs.std(0).max() > 1e-2  # the members disagree
    mean = np.asarray(ScalarEnsemble(members)(tokens, pos, mask))
    np.testing.assert_allclose(mean, outs.mean(0), atol=1e-5)
    penalised = np.asarray(ScalarEnsemble(members, disagreement=0.5)(tokens, pos, mask))
    np.testing.assert_allclose(penalised, outs.mean(0) - 0.5 * outs.var(0), atol=1e-5)
    assert (penalised <= mean + 1e-6).all() and (penalised < mean - 1e-4).any()
    with pytest.raises(ValueError, match="2 members"):
        ScalarEnsemble(members[:1], disagreement=0.5)
    with pytest.raises(ValueError, match="≥ 0"):
        ScalarEnsemble(members, disagreement=-1.0)
