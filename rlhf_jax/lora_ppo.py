"""PPO with LoRA: the policy trains adapters on a frozen base that every model shares.

* **policy** = base + its adapters (:mod:`rlhf_jax.models.lora`); the adapters are the trained
  parameters (``PPOState.params["policy"]``).
* **reference** = the same base with the adapters off: the base graph merged with the base
  state (:func:`rlhf_jax.models.lora.base_graphdef`), no second copy of the weights.
* **critic** = a zero-initialised :class:`~rlhf_jax.models.heads.ScalarHead` on the policy's
  hidden states (``PPOState.params["value"]``; needs ``PPOConfig.value_head_on_policy=True``).
* **reward model** = the same frozen base + its own adapters + a scalar head
  (:func:`rlhf_jax.models.lora.scalar_model_on_base`), passed as ``{"lora", "rest"}``.

So the program receives the base once, and gradients and Adam moments exist only for the
adapters and the value head. The base is an argument that is never differentiated (``jax.grad``
is taken w.r.t. the trainable tree only, so no weight gradient of a base kernel is computed) and
never donated.

Why not :func:`rlhf_jax.ppo.make_ppo` as is: it differentiates and updates the whole of
``PPOState.params["policy"]``, and its forward gets no other parameters, so the base would have
to live inside the trained tree (gradients, global-norm clipping and a second reference copy
included). The iteration below is the same algorithm, step for step (a test checks that its
rollout equals ``make_ppo``'s on the same models), with the base as a separate argument:

    program = make_lora_ppo(cfg, setup.lm_def, setup.base_def, nnx.graphdef(value_head),
                            setup.reward, make_optimizer(cfg), sampling)
    step = jax.jit(program.iteration, donate_argnums=(0,))
    state, metrics, responses, response_mask = step(state, setup.base, setup.rm_params,
                                                    prompts, mask)

Like ``make_ppo``'s, the iteration is one compiled program (the sampler's ``while_loop``, the
scoring forwards, GAE, and the epochs × minibatches as ``lax.scan``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, rl
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.masked import masked_mean, masked_sum, masked_whiten
from rlhf_jax.models import lora
from rlhf_jax.models.heads import ScalarHead, ScalarModel
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.ppo import make_evaluate as _make_evaluate
from rlhf_jax.ppo import PPOConfig, PPOProgram, PPOState
from rlhf_jax.scoring import (concat_prompt_response, response_logits, response_positions,
                              RewardScorer)


class LoraPPOSetup(NamedTuple):
    """The graphs and arrays a LoRA PPO run needs (see :func:`setup`)."""
    lm_def: nnx.GraphDef
    """The adapted policy's graph."""
    base_def: nnx.GraphDef
    """The base graph: merged with ``base`` it is the reference (adapters off)."""
    policy_lora: nnx.State
    """The policy's adapters (the initial ``PPOState.params["policy"]``)."""
    base: nnx.State
    """The frozen base, shared by policy, reference and reward model."""
    reward: RewardScorer
    """The adapted reward model's graph, EOS and pooling."""
    rm_params: dict
    """``{"lora": the reward model's adapters, "rest": its head}``."""


def _same_base(a: nnx.State, b: nnx.State) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) == len(lb) and all(x is y for x, y in zip(la, lb)):
        return True
    return lora.base_hash(a) == lora.base_hash(b)


def setup(policy: Transformer, reward_model: ScalarModel, eos_id: int,
          pool: str = "last") -> LoraPPOSetup:
    """Splits an adapted policy and an adapted reward model on the same base.

    Args:
      policy: a Transformer with adapters (:func:`rlhf_jax.models.lora.apply_lora`).
      reward_model: a ScalarModel with adapters on the same base, e.g. from
        :func:`rlhf_jax.models.lora.scalar_model_on_base` (its base arrays are then shared) or
        :func:`rlhf_jax.models.lora.load_adapters` (checked by hash).
      eos_id, pool: the reward model's conventions (:class:`RewardScorer`).

    Raises:
      ValueError: a model without adapters, or a reward model on a different base.
    """
    for name, m in (("policy", policy), ("reward_model", reward_model)):
        if lora.lora_config(m) is None:
            raise ValueError(f"LoRA PPO: the {name} has no adapters (lora.apply_lora first)")
    pol, rm = lora.split(policy), lora.split(reward_model)
    if not _same_base(pol.base, rm.base):
        raise ValueError(f"LoRA PPO: the reward model's base (sha256 {lora.base_hash(rm.base)}) "
                         f"is not the policy's (sha256 {lora.base_hash(pol.base)}); both must "
                         "adapt the same base, which the program holds once")
    return LoraPPOSetup(lm_def=pol.graphdef, base_def=lora.base_graphdef(policy),
                        policy_lora=pol.lora, base=pol.base,
                        reward=RewardScorer(rm.graphdef, eos_id, pool),
                        rm_params={"lora": rm.lora, "rest": rm.rest})


def init_state(cfg: PPOConfig, policy_lora: nnx.State, value_head: ScalarHead,
               tx: optax.GradientTransformation) -> PPOState:
    """The state at iteration 0: adapters and value head as the trained parameters, the
    optimizer state over them only, β, the base key (as :func:`rlhf_jax.ppo.init_state`)."""
    params = {"policy": policy_lora, "value": nnx.state(value_head)}
    kl_ctl = (rl.adaptive_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else rl.fixed_kl_controller(cfg.kl_coef))
    return PPOState(params=params, opt_state=tx.init(params), kl_ctl=kl_ctl,
                    key=jax.random.key(cfg.seed), iteration=jnp.zeros((), jnp.int32))


def reward_state(rm_params: dict, base: nnx.State) -> nnx.State:
    """The reward model's full state: ``base`` as its backbone, its adapters and head."""
    return lora.join(rm_params["lora"], base, rm_params["rest"], lora.SCALAR_BACKBONE)


def held_bytes(state: PPOState, base: nnx.State, rm_params: dict) -> dict[str, int]:
    """Bytes of everything the iteration receives, by part.

    ``total`` sums the bytes of every leaf of ``(state, base, rm_params)`` (a leaf passed twice
    would count twice), so ``total - base`` is what LoRA PPO holds beyond one copy of the base:
    policy adapters, value head, their optimizer state, the reward model's adapters and head,
    and a few scalars (β, key, iteration).
    """
    parts = {"base": lora.tree_bytes(base),
             "policy_adapters": lora.tree_bytes(state.params["policy"]),
             "value_head": lora.tree_bytes(state.params["value"]),
             "optimizer": lora.tree_bytes(state.opt_state),
             "reward_adapters": lora.tree_bytes(rm_params["lora"]),
             "reward_head": lora.tree_bytes(rm_params["rest"]),
             "scalars": lora.tree_bytes((state.kl_ctl, state.key, state.iteration))}
    parts["total"] = lora.tree_bytes((state, base, rm_params))
    return parts


def make_lora_ppo(cfg: PPOConfig, lm_def: nnx.GraphDef, base_def: nnx.GraphDef,
                  value_def: nnx.GraphDef, reward: RewardScorer,
                  tx: optax.GradientTransformation, scfg: SamplingConfig) -> PPOProgram:
    """Builds the LoRA PPO program (the same algorithm as :func:`rlhf_jax.ppo.make_ppo`).

    Args:
      cfg: the hyper-parameters; ``value_head_on_policy`` must be True.
      lm_def: the adapted policy's graph (:attr:`LoraPPOSetup.lm_def`).
      base_def: the base graph, the reference (:attr:`LoraPPOSetup.base_def`).
      value_def: graph of the critic, a :class:`ScalarHead` on the policy's hidden states.
      reward: the adapted reward model (:attr:`LoraPPOSetup.reward`).
      tx: the optimizer (:func:`rlhf_jax.ppo.make_optimizer`); it sees adapters and head only.
      scfg: the rollout sampler (:func:`rlhf_jax.ppo.sampling_config`).

    Returns:
      a :class:`rlhf_jax.ppo.PPOProgram` whose functions take the base as an extra argument:
      ``rollout(state, base, rm_params, prompt_bt, prompt_mask_bt, key)``,
      ``update(params, opt_state, base, batch, key)`` and
      ``iteration(state, base, rm_params, prompt_bt, prompt_mask_bt)``.

    Raises:
      ValueError: invalid hyper-parameters, ``missing_eos_penalty`` without a stop token, or a
        separate value model (``value_head_on_policy=False``).
    """
    errs = cfg.ppo_errors()
    if cfg.missing_eos_penalty is not None and scfg.eos_id is None:
        errs.append(f"missing_eos_penalty={cfg.missing_eos_penalty}: needs a stop token (the "
                    "sampler's eos_id is None, so every response would get the penalty)")
    if not cfg.value_head_on_policy:
        errs.append("value_head_on_policy=False: LoRA PPO's critic is a value head on the "
                    "policy's hidden states; set it to True")
    if errs:
        raise ValueError("invalid LoRA PPO config:\n  " + "\n  ".join(errs))
    temp = cfg.temperature
    resp = response_positions(cfg.query_len, cfg.response_len)
    b, n_mb = cfg.batch_size, cfg.num_minibatches

    def forward(params, base, tokens_bt, mask_bt):
        """Policy logits ``[B, Tr, V]`` and values ``[B, Tr]`` over the response positions."""
        logits, hidden = response_logits(lm_def, lora.join(params["policy"], base), tokens_bt,
                                         mask_bt, resp)
        values = nnx.merge(value_def, params["value"])(hidden)
        return logits, values[:, resp]

    def rollout(state: PPOState, base, rm_params, prompt_bt, prompt_mask_bt, key):
        policy = lora.join(state.params["policy"], base)
        out = sample_split(lm_def, policy, prompt_bt, prompt_mask_bt, key, scfg)
        rmask = out.mask
        tokens, mask = concat_prompt_response(prompt_bt, prompt_mask_bt, out.tokens, rmask)
        logits, values = forward(state.params, base, tokens, mask)
        logp = losses.token_logprobs(logits, out.tokens, temp)
        ref_logits, _ = response_logits(base_def, base, tokens, mask, resp)  # adapters off
        ref_logp = losses.token_logprobs(ref_logits, out.tokens, temp)
        score = reward(reward_state(rm_params, base), prompt_bt, prompt_mask_bt, out.tokens,
                       rmask)
        if cfg.missing_eos_penalty is not None:
            has_eos = jnp.any((out.tokens == scfg.eos_id) & rmask, axis=1)
            score = rl.apply_missing_eos_penalty(score, has_eos, cfg.missing_eos_penalty)
        rewards, kl = rl.kl_shaped_rewards(score, logp, ref_logp, rmask, state.kl_ctl.value,
                                           cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, rmask, shift_mean=False)
        adv, returns = rl.gae(rewards, values, rmask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, rmask)
        kl_seq = masked_sum(kl, rmask, axis=1)
        batch = {"tokens": tokens, "mask": mask, "response": out.tokens, "rmask": rmask,
                 "old_logp": logp, "old_values": values, "adv": adv, "returns": returns}
        metrics = {
            "objective/kl": jnp.mean(kl_seq),
            "objective/kl_coef": state.kl_ctl.value,
            "objective/scores": jnp.mean(score),
            "objective/rlhf_reward": jnp.mean(score - state.kl_ctl.value * kl_seq),
            "objective/entropy": losses.entropy(logits, rmask, temp),
            "objective/response_len": jnp.mean(jnp.sum(rmask, axis=1).astype(jnp.float32)),
            "ppo/val/explained_var_rollout": rl.explained_variance(values, returns, rmask),
            "ppo/returns_mean": masked_mean(returns, rmask),
        }
        return batch, metrics, out

    def loss_fn(params, base, mb):
        logits, values = forward(params, base, mb["tokens"], mb["mask"])
        logp = losses.token_logprobs(logits, mb["response"], temp)
        pg_loss, pm = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["rmask"],
                                             cfg.clip_eps, cfg.dual_clip)
        vf_loss, vm = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["rmask"],
                                            cfg.value_clip_eps)
        ent = losses.entropy(logits if cfg.entropy_coef else jax.lax.stop_gradient(logits),
                             mb["rmask"], temp)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
        return loss, {**pm, **vm, "ppo/loss": loss, "ppo/entropy": ent}

    def update(params, opt_state, base, batch, key):
        def minibatch_step(carry, idx_m):
            params, opt_state, batch = carry
            mb = jax.tree.map(lambda x: x[idx_m], batch)
            # Gradients w.r.t. the adapters and the value head only (argument 0).
            (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, base, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            m["ppo/grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state, batch), m

        def epoch_step(carry, key):
            perm = jax.random.permutation(key, b).reshape(n_mb, b // n_mb)
            return jax.lax.scan(minibatch_step, carry, perm)

        (params, opt_state, _), um = jax.lax.scan(
            epoch_step, (params, opt_state, jax.lax.stop_gradient(batch)),
            jax.random.split(key, cfg.ppo_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, um)

    def iteration(state: PPOState, base, rm_params, prompt_bt, prompt_mask_bt):
        key = jax.random.fold_in(state.key, state.iteration)
        k_sample, k_epochs = jax.random.split(key)
        batch, metrics, out = rollout(state, base, rm_params, prompt_bt, prompt_mask_bt,
                                      k_sample)
        params, opt_state, um = update(state.params, state.opt_state, base, batch, k_epochs)
        metrics.update(um)
        kl_ctl = rl.kl_controller_update(state.kl_ctl, metrics["objective/kl"], b)
        new_state = PPOState(params=params, opt_state=opt_state, kl_ctl=kl_ctl, key=state.key,
                             iteration=state.iteration + 1)
        return new_state, metrics, out.tokens, out.mask

    return PPOProgram(rollout=rollout, update=update, iteration=iteration)


def make_evaluate(cfg: PPOConfig, lm_def: nnx.GraphDef, reward: RewardScorer,
                  scfg: SamplingConfig) -> Callable:
    """``evaluate(policy_lora, base, rm_params, prompts, mask, key) -> dict``:
    :func:`rlhf_jax.ppo.make_evaluate` with the policy = base + adapters, the reference = the same
    base with zeroed adapters (exactly the base; only the small adapters are zeroed, the base is
    not copied), and the reward model on the same base."""
    evaluate = _make_evaluate(cfg, lm_def, reward, scfg)

    def run(policy_lora, base, rm_params, prompt_bt, prompt_mask_bt, key):
        off = jax.tree.map(jnp.zeros_like, policy_lora)
        return evaluate(lora.join(policy_lora, base), lora.join(off, base),
                        reward_state(rm_params, base), prompt_bt, prompt_mask_bt, key)

    return run
