"""A reward head read from a middle layer and fitted on frozen features (``rlhf_jax.reward_head``):
the truncated forward against running the blocks by hand, pooling commuting with the head, and
the fit recovering a known head from simulated rankings."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, reward_head
from rlhf_jax.labelers import simulated_ranks
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import positions_from_mask, rope_tables
from rlhf_jax.scoring import pool_features, pool_scores, RewardScorer

CFG = PRESETS["tiny-llama"]
B, T, EOS = 3, 7, 2


def _batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, CFG.vocab_size, (B, T)))
    mask = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [2], [1]]))  # left padding
    response_mask = mask & (jnp.arange(T)[None, :] >= 4)
    return tokens, mask, response_mask


def test_a_head_on_layer_n_reads_the_normed_output_of_block_n():
    rm = ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1), layer=1)
    tokens, mask, _ = _batch()
    pos = positions_from_mask(mask)
    got = rm.features(tokens, pos, mask)
    # By hand: embed, block 0 only, the final norm.
    bb = rm.backbone
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
    x, _ = bb.blocks[0](bb.embed[...][tokens], allowed,
                        rope_tables(pos, CFG.head_dim, CFG.rope_theta), None, 0)
    np.testing.assert_allclose(got, bb.final_norm(x), atol=1e-5)
    # The full model is a different function; layer = L is the full model.
    _, last, _ = bb(tokens, pos, mask, compute_logits=False)
    assert float(jnp.abs(got - last).max()) > 1e-2
    full = ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1), layer=CFG.num_layers)
    np.testing.assert_allclose(full.features(tokens, pos, mask), last, atol=1e-6)


def test_a_layer_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="layer=3: expected 0..2"):
        ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1), layer=3)
    lm = ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1)).backbone
    tokens, mask, _ = _batch()
    with pytest.raises(ValueError, match="num_layers=1 needs .* compute_logits=False"):
        lm(tokens, positions_from_mask(mask), mask, num_layers=1)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_pooling_commutes_with_the_head(pool):
    """A head fitted on pooled features scores text as the assembled reward model does."""
    graphdef, params = nnx.split(ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1),
                                             layer=1))
    scorer = RewardScorer(graphdef, EOS, pool)
    tokens, mask, response_mask = _batch()
    feats = scorer.pooled_features(params, tokens, mask, response_mask)
    head = nnx.merge(graphdef, params).head
    via_features = head(feats[:, None, :])[:, 0]
    np.testing.assert_allclose(via_features, scorer.score_tokens(params, tokens, mask,
                                                                 response_mask), atol=1e-5)
    values = jnp.asarray(np.random.default_rng(1).normal(size=(B, T)), jnp.float32)
    np.testing.assert_allclose(  # on plain scalars, as pool_scores
        pool_features(values[..., None], mask, response_mask, pool)[:, 0],
        pool_scores(values, mask, response_mask, pool), atol=1e-6)


def test_unstandardize_folds_the_standardisation_into_the_head():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (20, 4, 5))
    mean, std = reward_head.standardize(x, np.ones((20, 4), bool))
    w = rng.normal(size=5)
    w_raw, b = reward_head.unstandardize(w, mean, std)
    np.testing.assert_allclose(x @ w_raw + b, ((x - mean) / std) @ w, rtol=1e-5, atol=1e-5)


def test_fit_head_reaches_the_optimum_of_the_penalised_loss():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 4, 6)), jnp.float32)
    ranks = jnp.asarray(np.argsort(np.argsort(-rng.normal(size=(40, 4)), 1), 1))
    valid = jnp.ones((40, 4), bool)
    w = reward_head.fit_head(x, ranks, valid, jnp.float32(0.1))

    def objective(v):
        return losses.ranking_loss(x @ v, ranks, valid)[0] + 0.05 * jnp.sum(v * v)

    assert float(jnp.abs(jax.grad(objective)(w)).max()) < 1e-4  # stationary: convex optimum
    assert float(objective(w)) < float(objective(jnp.zeros(6))) - 1e-3


def test_cross_validated_head_recovers_a_simulated_labelers_head():
    """Rankings drawn by the simulated labeler from a known linear reward: the fitted head
    orders fresh responses like the true one, and a weak penalty wins over a crushing one."""
    rng = np.random.default_rng(0)
    d, true_w = 8, rng.normal(size=8)

    def draw(n):
        x = rng.normal(2.0, 3.0, (n, 4, d))  # raw features: offset and scaled
        return x, simulated_ranks(x @ true_w, 0.5, rng)

    x, ranks = draw(300)
    fit = reward_head.cross_validated_head(x, ranks, np.ones((300, 4), bool),
                                           l2_grid=(0.01, 100.0), folds=3)
    assert fit.l2 == 0.01 and fit.cv[0]["loss"] < fit.cv[1]["loss"]
    cos = fit.w @ true_w / np.linalg.norm(fit.w) / np.linalg.norm(true_w)
    assert cos > 0.95, cos
    fresh, _ = draw(200)
    i, j = np.triu_indices(4, 1)
    s, g = fresh @ fit.w + fit.b, fresh @ true_w
    agree = ((s[:, i] > s[:, j]) == (g[:, i] > g[:, j])).mean()
    assert agree > 0.9, agree
    assert 0.5 < fit.train_accuracy <= 1.0


def test_cross_validated_head_refuses_bad_folds():
    x = np.zeros((3, 2, 4))
    with pytest.raises(ValueError, match="folds=4 needs 2 <= folds <= N=3"):
        reward_head.cross_validated_head(x, np.zeros((3, 2), int), np.ones((3, 2), bool),
                                         folds=4)
