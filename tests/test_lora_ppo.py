"""PPO with LoRA (rlhf_jax.lora_ppo) on the tiny Llama config: the rollout equals make_ppo's on the
merged models, one iteration is one compiled program that trains only adapters and the value head,
the program receives the base once, and evaluation's reference is the base."""
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import lora_ppo, ppo
from rlhf_jax.models import lora
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.heads import ScalarHead
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.scoring import RewardScorer

CFG = PRESETS["tiny-llama"]
B, TQ, TR, EOS, PAD = 4, 6, 5, 3, 0
LCFG = lora.LoraConfig(rank=4, alpha=8.0)


def _perturb(module, scale, seed, filt=lora.LoraParam):
    """Random values added to the ``filt`` leaves (adapters as after training), in place."""
    state = nnx.state(module, filt)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32))
           for x in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def _prompts():
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, CFG.vocab_size, (B, TQ)).astype(np.int32)
    pmask = np.ones((B, TQ), bool)
    pmask[0, :2] = False
    prompt[~pmask] = PAD
    return jnp.asarray(prompt), jnp.asarray(pmask)


@pytest.fixture(scope="module")
def run():
    """Models on one base, the LoRA program compiled once and run for two iterations."""
    cfg = dataclasses.replace(ppo.PPOConfig(), batch_size=B, query_len=TQ, response_len=TR,
                              ppo_epochs=2, num_minibatches=2, iterations=4,
                              value_head_on_policy=True, temperature=1.5)
    policy = _perturb(lora.apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)), LCFG,
                                      rngs=nnx.Rngs(1)), 0.05, 1)
    rm = _perturb(lora.scalar_model_on_base(policy, LCFG, rngs=nnx.Rngs(2)), 0.3, 2)
    head = _perturb(ScalarHead(CFG.d_model, init="value", rngs=nnx.Rngs(3)), 0.1, 3, nnx.Param)
    s = lora_ppo.setup(policy, rm, EOS)
    tx = ppo.make_optimizer(cfg)
    scfg = ppo.sampling_config(cfg, PAD, EOS)
    prog = lora_ppo.make_lora_ppo(cfg, s.lm_def, s.base_def, nnx.graphdef(head), s.reward, tx,
                                  scfg)
    state0 = lora_ppo.init_state(cfg, s.policy_lora, head, tx)
    prompt, pmask = _prompts()
    lowered = jax.jit(prog.iteration).lower(state0, s.base, s.rm_params, prompt, pmask)
    compiled = lowered.compile()
    state1, metrics1, resp1, rmask1 = compiled(state0, s.base, s.rm_params, prompt, pmask)
    state2, metrics2, _, _ = compiled(state1, s.base, s.rm_params, prompt, pmask)
    return dict(cfg=cfg, policy=policy, rm=rm, head=head, setup=s, tx=tx, scfg=scfg,
                prompt=prompt, pmask=pmask, lowered=lowered, compiled=compiled, states=(
                    state0, state1, state2), metrics=(metrics1, metrics2), resp=(resp1, rmask1))


def test_rollout_equals_make_ppo_on_the_merged_models(run):
    """Oracle: ``make_ppo`` with the merged policy, the base as a separate reference, the same
    value head and the merged reward model computes the rollout the LoRA program computed."""
    cfg, head, (state0, _, _) = run["cfg"], run["head"], run["states"]
    merged_policy, merged_rm = lora.merge_lora(run["policy"]), lora.merge_lora(run["rm"])
    lm_def, policy_params = nnx.split(merged_policy)
    ref_params = jax.tree.map(jnp.copy, run["setup"].base)  # make_ppo needs a second copy
    prog = ppo.make_ppo(cfg, lm_def, nnx.graphdef(head),
                        RewardScorer(nnx.graphdef(merged_rm), EOS), run["tx"], run["scfg"])
    state = ppo.PPOState(params={"policy": policy_params, "value": nnx.state(head)},
                         opt_state=None, kl_ctl=state0.kl_ctl, key=state0.key,
                         iteration=state0.iteration)
    k_sample, _ = jax.random.split(jax.random.fold_in(state0.key, state0.iteration))
    _, want, out = jax.jit(prog.rollout)(state, ref_params, nnx.state(merged_rm), run["prompt"],
                                         run["pmask"], k_sample)
    resp, rmask = run["resp"]
    np.testing.assert_array_equal(np.asarray(resp), np.asarray(out.tokens))
    np.testing.assert_array_equal(np.asarray(rmask), np.asarray(out.mask))
    got = run["metrics"][0]
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), atol=2e-4, rtol=1e-4,
                                   err_msg=k)
    assert abs(float(want["objective/kl"])) > 1e-3  # the policy is not the reference
    assert abs(float(want["objective/scores"])) > 1e-3


def test_one_iteration_is_one_program_that_trains_adapters_only(run):
    state0, state1, state2 = run["states"]
    assert "while" in run["lowered"].as_text()  # sampler while_loop + scanned epochs/minibatches
    assert int(state1.iteration) == 1 and int(state2.iteration) == 2
    # The trained tree is the adapters and the value head, nothing else.
    assert jax.tree.structure(state1.params["policy"]) == \
        jax.tree.structure(run["setup"].policy_lora)
    assert jax.tree.structure(state1.params["value"]) == \
        jax.tree.structure(nnx.state(run["head"]))
    for name in ("policy", "value"):
        moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
                 zip(jax.tree.leaves(state0.params[name]), jax.tree.leaves(state2.params[name]))]
        assert max(moved) > 0, name
    for m in run["metrics"]:
        assert all(np.isfinite(float(v)) for v in m.values())
        assert float(m["ppo/grad_norm"]) > 0
    # The optimizer state is Adam's two moments of the trained leaves (plus step counts).
    held = lora_ppo.held_bytes(state1, run["setup"].base, run["setup"].rm_params)
    extra = held["optimizer"] - 2 * (held["policy_adapters"] + held["value_head"])
    assert 0 <= extra <= 64, held


def test_ppo_with_lora_holds_the_base_once(run):
    s, (state0, _, _) = run["setup"], run["states"]
    held = lora_ppo.held_bytes(state0, s.base, s.rm_params)
    base = lora.tree_bytes(nnx.state(lora.base_model(run["policy"])))
    assert held["base"] == base
    assert held["total"] == sum(v for k, v in held.items() if k != "total")
    adapters = lora.tree_bytes(s.policy_lora)
    assert held["reward_adapters"] == adapters and held["policy_adapters"] == adapters
    # Beyond one base: policy adapters + value head with Adam's moments, the reward model's
    # adapters and head, scalars. Here (r = 4 on a 130k-parameter model) ~0.3 of a base; a
    # second copy of the base would be >= 1.
    assert held["total"] - base < 0.45 * base, held
    # XLA's view of the compiled program: its arguments are what held_bytes counts plus the
    # prompts, so nothing else the size of a base is passed in.
    args = run["compiled"].memory_analysis().argument_size_in_bytes
    prompts = run["prompt"].nbytes + run["pmask"].nbytes
    assert held["total"] + prompts - 64 <= args <= held["total"] + prompts + 64, (args, held)
    # The same run with full fine-tuning receives policy + Adam + reference + reward model.
    full = 4 * base
    assert held["total"] < full / 2.5


def test_evaluation_reference_is_the_base_with_adapters_off(run):
    s, cfg = run["setup"], run["cfg"]
    evaluate = lora_ppo.make_evaluate(cfg, s.lm_def, s.reward, run["scfg"])
    key = jax.random.key(7)
    zero = jax.tree.map(jnp.zeros_like, s.policy_lora)
    at_base = evaluate(zero, s.base, s.rm_params, run["prompt"], run["pmask"], key)
    np.testing.assert_array_equal(np.asarray(at_base["kl_k1"]), 0.0)  # exactly the reference
    trained = evaluate(run["states"][2].params["policy"], s.base, s.rm_params, run["prompt"],
                       run["pmask"], key)
    assert np.all(np.isfinite(np.asarray(trained["score"])))
    assert np.abs(np.asarray(trained["kl_k1"])).max() > 1e-4


def test_lora_ppo_refuses_a_separate_critic_and_another_base(run):
    cfg, s = run["cfg"], run["setup"]
    with pytest.raises(ValueError, match="value_head_on_policy=False"):
        lora_ppo.make_lora_ppo(dataclasses.replace(cfg, value_head_on_policy=False), s.lm_def,
                               s.base_def, nnx.graphdef(run["head"]), s.reward, run["tx"],
                               run["scfg"])
    other = lora.apply_lora(Transformer(CFG, rngs=nnx.Rngs(9)), LCFG, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="reward model's base .* is not the policy's"):
        lora_ppo.setup(other, run["rm"], EOS)
    with pytest.raises(ValueError, match="the policy has no adapters"):
        lora_ppo.setup(lora.base_model(run["policy"]), run["rm"], EOS)
