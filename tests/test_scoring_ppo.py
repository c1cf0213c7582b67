"""Scoring and the PPO program, on tiny random models: against independent oracles (the full
forward pass with the LM head everywhere, a hand-written reward-model layout, NumPy sums), and the
two defects found on review (missing-EOS penalty without a stop token; evaluation KL estimator)."""
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, ppo
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import positions_from_mask, Transformer
from rlhf_jax.scoring import (append_eos, pool_scores, response_logprobs, RewardScorer,
                              sequence_logprobs, TextReward)

CFG = PRESETS["tiny"]
B, TQ, TR, EOS, PAD = 4, 6, 5, 3, 0


@pytest.fixture(scope="module")
def models():
    lm = Transformer(CFG, rngs=nnx.Rngs(0))
    rm = ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1))
    critic = ScalarModel(CFG, head_init="value", rngs=nnx.Rngs(2))
    return lm, rm, critic


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, CFG.vocab_size, (B, TQ)).astype(np.int32)
    pmask = np.ones((B, TQ), bool)
    pmask[0, :2] = False  # left padding
    prompt[~pmask] = PAD
    resp = rng.integers(5, CFG.vocab_size, (B, TR)).astype(np.int32)
    rlen = np.array([TR, 3, 1, 4])
    rmask = np.arange(TR)[None] < rlen[:, None]
    resp[~rmask] = PAD
    resp[3, 2] = EOS  # a response that already ends in EOS: none is added
    rmask[3, 3:] = False
    resp[3, 3:] = PAD
    return prompt, pmask, resp, rmask


def test_response_logprobs_equal_the_full_forward(models):
    lm = models[0]
    prompt, pmask, resp, rmask = _batch()
    graphdef, params = nnx.split(lm)
    got = response_logprobs(graphdef, params, prompt, pmask, resp, rmask, temperature=0.7)
    tokens = np.concatenate([prompt, resp], 1)
    mask = np.concatenate([pmask, rmask], 1)
    logits, _, _ = lm(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                      jnp.asarray(mask))
    full = np.asarray(jax.nn.log_softmax(logits / 0.7, axis=-1))
    want = np.take_along_axis(full[:, TQ - 1:TQ + TR - 1], resp[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.where(rmask, got, 0), np.where(rmask, want, 0), atol=2e-5)
    seq = sequence_logprobs(graphdef, params, prompt, pmask, resp, rmask, temperature=0.7)
    np.testing.assert_allclose(seq, (want * rmask).sum(1), atol=1e-4)


def test_reward_scorer_reads_the_eos_it_appends(models):
    rm = models[1]
    prompt, pmask, resp, rmask = _batch(1)
    graphdef, params = nnx.split(rm)
    for pool in ("last", "mean"):
        got = np.asarray(RewardScorer(graphdef, EOS, pool)(params, prompt, pmask, resp, rmask))
        for i in range(B):  # the training layout, one row at a time: prompt + response + EOS
            r = list(resp[i][rmask[i]])
            r = r if EOS in r else r + [EOS]
            row = np.array(list(prompt[i][pmask[i]]) + r, np.int32)[None]
            m = np.ones_like(row, bool)
            values = np.asarray(rm(jnp.asarray(row), positions_from_mask(jnp.asarray(m)),
                                   jnp.asarray(m)))[0]
            want = values[-1] if pool == "last" else values[-len(r):].mean()
            np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f"{pool} row {i}")


def test_append_eos_and_pooling_by_hand():
    resp = jnp.array([[7, 8, 0], [7, EOS, 0]])
    rmask = jnp.array([[True, True, False], [True, True, False]])
    tokens, mask = append_eos(resp, rmask, EOS)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(np.where(mask, tokens, -1), [[7, 8, EOS, -1], [7, EOS, -1, -1]])
    v = jnp.array([[1.0, 2.0, 4.0, 9.0]])
    m = jnp.array([[True, True, True, False]])
    r = jnp.array([[False, True, True, False]])
    assert float(pool_scores(v, m, r, "last")[0]) == 4.0
    assert float(pool_scores(v, m, r, "mean")[0]) == 3.0
    with pytest.raises(ValueError, match="pool='max'"):
        pool_scores(v, m, r, "max")
    with pytest.raises(ValueError, match="rank"):
        pool_scores(v[..., None], m, r, "last")


def _program(models, **changes):
    lm, rm, critic = models
    cfg = dataclasses.replace(ppo.PPOConfig(), batch_size=B, query_len=TQ, response_len=TR,
                              ppo_epochs=2, num_minibatches=2, iterations=4, **changes)
    lm_def, ref = nnx.split(lm)
    tx = ppo.make_optimizer(cfg)
    scfg = ppo.sampling_config(cfg, PAD, EOS)
    reward = RewardScorer(nnx.graphdef(rm), EOS)
    prog = ppo.make_ppo(cfg, lm_def, nnx.graphdef(critic), reward, tx, scfg)
    state = ppo.init_state(cfg, lm, critic, tx)
    return cfg, prog, state, jax.tree.map(jnp.copy, ref), nnx.state(rm), reward, scfg


def test_missing_eos_penalty_without_a_stop_token_is_refused(models):
    lm, rm, critic = models
    cfg = dataclasses.replace(ppo.PPOConfig(), missing_eos_penalty=-1.0)
    scfg = ppo.sampling_config(cfg, PAD, None)
    with pytest.raises(ValueError, match="missing_eos_penalty=-1.0: needs a stop token"):
        ppo.make_ppo(cfg, nnx.graphdef(lm), nnx.graphdef(critic),
                     RewardScorer(nnx.graphdef(rm), EOS), ppo.make_optimizer(cfg), scfg)


def test_missing_eos_penalty_follows_the_stop_token(models):
    _, prog, state, ref, rm_params, reward, _ = _program(models, missing_eos_penalty=-7.0,
                                                         temperature=3.0)
    prompt, pmask, _, _ = _batch()
    prompt, pmask = np.tile(prompt, (4, 1)), np.tile(pmask, (4, 1))  # more samples, same B rule
    _, metrics, out = jax.jit(prog.rollout)(state, ref, rm_params, prompt[:B], pmask[:B],
                                            jax.random.key(3))
    has_eos = np.asarray(jnp.any((out.tokens == EOS) & out.mask, axis=1))
    # Independent oracle: score the same responses with the scorer, apply the rule by hand.
    raw = np.asarray(reward(rm_params, prompt[:B], pmask[:B], out.tokens, out.mask))
    want = np.where(has_eos, raw, -7.0)
    assert float(metrics["objective/scores"]) == pytest.approx(want.mean(), abs=1e-5)


def test_one_iteration_is_one_program_and_trains(models):
    cfg, prog, state, ref, rm_params, _, _ = _program(models)
    prompt, pmask, _, _ = _batch()
    step = jax.jit(prog.iteration)
    lowered = step.lower(state, ref, rm_params, prompt, pmask)
    text = lowered.as_text()
    assert "while" in text  # the sampler's while_loop and the scanned epochs × minibatches
    new_state, metrics, resp, rmask = step(state, ref, rm_params, prompt, pmask)
    assert int(new_state.iteration) == 1
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                         state.params["policy"], new_state.params["policy"]))
    assert max(moved) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert resp.shape == (B, TR) and rmask.shape == (B, TR)
    # A fresh state is committed like the step's outputs, so the loop compiles once, not twice.
    assert all(x.committed for x in jax.tree.leaves(state))
    step(new_state, ref, rm_params, prompt, pmask)
    assert step._cache_size() == 1
    # ... and still builds from shapes alone (jax.eval_shape, as the memory planner does).
    lm, _, critic = models
    abstract = jax.eval_shape(lambda: ppo.init_state(cfg, lm, critic, ppo.make_optimizer(cfg)))
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, state)


def test_evaluate_reports_kl_by_both_estimators(models):
    cfg, _, state, ref, rm_params, reward, scfg = _program(models)
    lm_def = nnx.graphdef(models[0])
    # A policy different from the reference: perturb the params.
    pol = jax.tree.map(lambda x: x * 1.3 if x.dtype == jnp.float32 else x, ref)
    prompt, pmask, _, _ = _batch()
    out = ppo.make_evaluate(cfg, lm_def, reward, scfg)(pol, ref, rm_params, prompt, pmask,
                                                       jax.random.key(0))
    lp = response_logprobs(lm_def, pol, prompt, pmask, out["tokens"], out["mask"], 1.0)
    lq = response_logprobs(lm_def, ref, prompt, pmask, out["tokens"], out["mask"], 1.0)
    m = np.asarray(out["mask"])
    k1 = (np.asarray(lp - lq) * m).sum(1)
    log_r = np.asarray(lq - lp)
    k3 = ((np.exp(log_r) - 1 - log_r) * m).sum(1)
    np.testing.assert_allclose(out["kl_k1"], k1, atol=1e-4)
    np.testing.assert_allclose(out["kl_k3"], k3, atol=1e-4)
    assert np.all(np.asarray(out["kl_k3"]) >= -1e-6)
    assert not np.allclose(out["kl_k1"], out["kl_k3"])


def test_invalid_ppo_configs_are_listed_together():
    cfg = dataclasses.replace(ppo.PPOConfig(), batch_size=6, num_minibatches=4,
                              learning_rate=float("nan"), kl_estimator="k9")
    errs = cfg.ppo_errors()
    assert any("batch_size=6" in e for e in errs)
    assert any("learning_rate=nan" in e for e in errs)
    assert any("kl_estimator='k9'" in e for e in errs)


def test_token_logprobs_used_by_scoring_is_the_loss_module_one():
    # scoring builds on losses.token_logprobs: a hand case of the shared definition.
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    assert float(losses.token_logprobs(logits, jnp.array([[1]]))[0, 0]) == pytest.approx(
        np.log(0.25), abs=1e-6)


def test_vmapped_seeds_equal_the_seeds_run_one_at_a_time(models):
    cfg, prog, _, ref, rm_params, _, _ = _program(models)
    lm, _, critic = models
    tx = ppo.make_optimizer(cfg)
    seeds = (0, 5)
    prompt, pmask, _, _ = _batch()
    prompts = np.stack([prompt, prompt[::-1]])
    masks = np.stack([pmask, pmask[::-1]])
    states = ppo.init_seed_states(cfg, lm, critic, tx, seeds)
    step = jax.jit(ppo.vmap_seeds(prog))
    single = jax.jit(prog.iteration)
    alone = [ppo.init_state(dataclasses.replace(cfg, seed=s), lm, critic, tx) for s in seeds]
    for _ in range(2):  # two iterations: the states carry over
        states, metrics, resp, _ = step(states, ref, rm_params, prompts, masks)
        for i in range(len(seeds)):
            alone[i], m_i, r_i, _ = single(alone[i], ref, rm_params, prompts[i], masks[i])
            np.testing.assert_array_equal(resp[i], r_i)
            for k in m_i:
                np.testing.assert_allclose(metrics[k][i], m_i[k], rtol=1e-5, atol=1e-5,
                                           err_msg=k)
    for i in range(len(seeds)):
        for a, b in zip(jax.tree.leaves(alone[i].params),
                        jax.tree.leaves(jax.tree.map(lambda x: x[i], states.params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(resp[0], resp[1])  # different seeds draw different samples


def test_best_of_n_samples_scores_and_curve(models):
    from rlhf_jax import best_of_n, stats
    lm, rm, _ = models
    lm_def, params = nnx.split(lm)
    reward = RewardScorer(nnx.graphdef(rm), EOS)
    prompt, pmask, _, _ = _batch()
    scfg = ppo.sampling_config(dataclasses.replace(ppo.PPOConfig(), response_len=TR), PAD, None)
    m = 8
    tokens, mask, scores = jax.jit(best_of_n.sample_scored, static_argnums=(0, 2, 7, 8))(
        lm_def, params, reward, nnx.state(rm), prompt, pmask, jax.random.key(0), scfg, m)
    assert tokens.shape == (B, m, TR) and scores.shape == (B, m)
    # Each sample's score is what the scorer gives it alone.
    again = reward(nnx.state(rm), prompt[2:3], pmask[2:3], tokens[2, 5][None], mask[2, 5][None])
    np.testing.assert_allclose(scores[2, 5], again[0], atol=1e-5)
    best_t, _ = best_of_n.select_best(tokens, mask, scores)
    i = np.asarray(jnp.argmax(scores, 1))
    np.testing.assert_array_equal(best_t, np.asarray(tokens)[np.arange(B), i])
    gold = np.asarray(scores) * -1.0  # a gold scorer that disagrees with the proxy
    rows = best_of_n.curve(np.asarray(scores), gold, ns=(1, 2, 8, 16))
    assert [r["n"] for r in rows] == [1, 2, 8]  # n > M is left out
    assert rows[0]["kl"] == 0 and rows[0]["proxy"] == pytest.approx(float(scores.mean()))
    assert rows[2]["proxy"] == pytest.approx(float(scores.max(1).mean()))
    assert rows[2]["gold"] == pytest.approx(float((-scores.max(1)).mean()))
    assert rows[1]["kl"] == pytest.approx(stats.best_of_n_kl(2))


@pytest.mark.parametrize("advantage,kl_in", [("rloo", "reward"), ("grpo", "loss")])
def test_one_rloo_grpo_iteration_is_one_program_and_trains(models, advantage, kl_in):
    from rlhf_jax import grpo
    lm, rm, _ = models
    k = 4
    cfg = grpo.GRPOConfig(batch_size=2, query_len=TQ, response_len=TR, num_samples=k,
                          ppo_epochs=2, num_minibatches=2, iterations=4, advantage=advantage,
                          kl_in=kl_in, temperature=2.0)
    lm_def, ref = nnx.split(lm)
    tx = grpo.make_optimizer(cfg)
    prog = grpo.make_grpo(cfg, lm_def, RewardScorer(nnx.graphdef(rm), EOS), tx,
                          ppo.sampling_config(cfg, PAD, None))
    state = grpo.init_state(cfg, lm, tx)
    prompt, pmask, _, _ = _batch()
    step = jax.jit(prog.iteration)
    assert "while" in step.lower(state, jax.tree.map(jnp.copy, ref), nnx.state(rm), prompt[:2],
                                 pmask[:2]).as_text()
    batch, _, out = jax.jit(prog.rollout)(state, ref, nnx.state(rm), prompt[:2], pmask[:2],
                                          jax.random.key(0))
    assert out.tokens.shape == (2 * k, TR)
    adv = np.asarray(batch["adv"])[:, 0].reshape(2, k)  # the sequence advantage, per group
    np.testing.assert_allclose(adv.sum(1), 0, atol=1e-4)  # both baselines centre each group
    new, metrics, _, _ = step(state, jax.tree.map(jnp.copy, ref), nnx.state(rm), prompt[:2],
                              pmask[:2])
    assert all(np.isfinite(float(v)) for v in metrics.values())
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                             state.params["policy"], new.params["policy"])))
    assert moved > 0 and int(new.iteration) == 1
    assert ("kl/loss" in metrics) == (kl_in == "loss")


def test_text_reward_scores_the_decoded_responses_under_jit_and_vmap():
    """The oracle reward: the gold scorer's log-odds of each decoded response, from inside a
    jitted program and under ``vmap`` over a seed axis (the seeds runner's layout)."""
    from rlhf_jax.data.batching import decode_rows
    from rlhf_jax.data.tokenizers import train_bpe
    from rlhf_jax.labelers import GoldSentimentScorer

    good, bad = "a great film, wonderful and moving", "an awful film, dull and boring"
    gold = GoldSentimentScorer.fit([good, bad] * 4, [1, 0] * 4)
    tok = train_bpe([good, bad] * 10, vocab_size=300)
    rows = [tok.encode(t) for t in (good, bad, "great", "dull and awful")]
    width = max(len(r) for r in rows) + 2
    resp = np.zeros((2, 2, width), np.int32)
    mask = np.zeros((2, 2, width), bool)
    for i, r in enumerate(rows):
        resp[i // 2, i % 2, :len(r)] = r
        mask[i // 2, i % 2, :len(r)] = True
    reward = TextReward(gold.score, tok)
    prompt = jnp.ones((2, 3), jnp.int32)  # ignored, as the params are
    want = gold.score(decode_rows(tok, resp, mask)).reshape(2, 2)
    assert want[0, 0] > 0 > want[0, 1]  # the scorer tells the two reviews apart
    per_seed = jax.jit(reward)(None, prompt, prompt > 0, resp[0], mask[0])
    np.testing.assert_allclose(per_seed, want[0], rtol=1e-6)
    vmapped = jax.jit(jax.vmap(reward, (None, None, None, 0, 0)))
    stacked = vmapped(None, prompt, prompt > 0, resp, mask)
    np.testing.assert_allclose(stacked, want, rtol=1e-6)
    with pytest.raises(ValueError, match="resp_bt"):
        reward(None, prompt, prompt > 0, resp, mask)  # [S, B, T] outside vmap: a shape error
