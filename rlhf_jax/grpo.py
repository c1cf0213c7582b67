"""Critic-free policy gradients over groups of K samples per prompt: RLOO (Ahmadian et al. 2024)
and GRPO (Shao et al. 2024), on the same pieces as PPO.

Each iteration samples K responses to each of B prompts, scores them with the reward model
(:class:`rlhf_jax.scoring.RewardScorer`), and baselines each response by its own group — RLOO by
the mean of the other K − 1 (:func:`rlhf_jax.rl.rloo_advantages`), GRPO by the group mean and std
(:func:`rlhf_jax.rl.grpo_advantages`) — so no value model is trained. The KL to the reference
goes where the papers put it: into the sequence reward (``kl_in="reward"``, RLOO:
:func:`rlhf_jax.rl.kl_penalized_scores`) or into the loss as the k3 estimate
(``kl_in="loss"``, GRPO: :func:`rlhf_jax.losses.kl_penalty_loss`). The policy loss is PPO's clipped
objective with the sequence advantage on every response token. One iteration — sampling,
scoring, advantages, ``ppo_epochs`` × ``num_minibatches`` updates — is one compiled program.
"""
from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, rl
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.ppo import initial_state, PPOConfig, PPOProgram, PPOState, stack_seeds
from rlhf_jax.scoring import (concat_prompt_response, response_logits, response_positions,
                              RewardScorer)

ADVANTAGES = ("grpo", "rloo")
KL_PLACES = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(PPOConfig):
    """PPO's hyper-parameters (the critic's are unused) plus the group settings. ``batch_size``
    counts prompts; each iteration samples ``batch_size × num_samples`` responses."""
    num_samples: int = 4
    """K responses per prompt (≥ 2)."""
    advantage: str = "grpo"
    """``grpo`` (group mean/std) or ``rloo`` (leave-one-out mean)."""
    scale_advantages: bool = True
    """GRPO: divide by the group std (False: Dr. GRPO's mean-centring only)."""
    kl_in: str = "loss"
    """``loss`` (GRPO: β·k3 term) or ``reward`` (RLOO: score − β·KL per sequence)."""

    def grpo_errors(self) -> list[str]:
        return self.ppo_errors() + self.group_errors()

    def group_errors(self) -> list[str]:
        """The group settings' errors (``grpo_errors`` adds PPO's)."""
        errs = []
        if self.num_samples < 2:
            errs.append(f"num_samples={self.num_samples}: expected at least 2 per prompt")
        if self.advantage not in ADVANTAGES:
            errs.append(f"advantage={self.advantage!r}: expected one of {ADVANTAGES}")
        if self.kl_in not in KL_PLACES:
            errs.append(f"kl_in={self.kl_in!r}: expected one of {KL_PLACES}")
        return errs


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    total = cfg.iterations * cfg.ppo_epochs * cfg.num_minibatches
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adam(optax.linear_schedule(cfg.learning_rate, 0.0, total), eps=1e-5))


def init_state(cfg: GRPOConfig, policy: nnx.Module, tx) -> PPOState:
    """PPO's state with ``params = {"policy": LM params}``: no value model."""
    return initial_state(cfg, {"policy": nnx.state(policy)}, tx)


def init_seed_states(cfg: GRPOConfig, policy: nnx.Module, tx, seeds) -> PPOState:
    """States of independent runs stacked over a leading seed axis, as
    :func:`rlhf_jax.ppo.init_seed_states`; feed them to :func:`rlhf_jax.ppo.vmap_seeds`."""
    return stack_seeds([init_state(dataclasses.replace(cfg, seed=int(s)), policy, tx)
                        for s in seeds])


def make_grpo(cfg: GRPOConfig, lm_def: nnx.GraphDef, reward: RewardScorer,
              tx: optax.GradientTransformation, scfg: SamplingConfig) -> PPOProgram:
    """The RLOO/GRPO program: ``rollout``, ``update`` and ``iteration`` as in
    :func:`rlhf_jax.ppo.make_ppo` (prompts ``[B, Tq]``; responses come back ``[B·K, Tr]``)."""
    errs = cfg.grpo_errors()
    if cfg.missing_eos_penalty is not None and scfg.eos_id is None:
        errs.append(f"missing_eos_penalty={cfg.missing_eos_penalty}: needs a stop token")
    if errs:
        raise ValueError("invalid RLOO/GRPO config:\n  " + "\n  ".join(errs))
    k, temp = cfg.num_samples, cfg.temperature
    resp = response_positions(cfg.query_len, cfg.response_len)
    n = cfg.batch_size * k
    if n % cfg.num_minibatches:
        raise ValueError(f"batch_size × num_samples = {n} is not divisible by "
                         f"num_minibatches={cfg.num_minibatches}")

    def logprobs(params, tokens, mask, response):
        logits, _ = response_logits(lm_def, params, tokens, mask, resp)
        return losses.token_logprobs(logits, response, temp), logits

    def rollout(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt, key):
        prompts = jnp.repeat(prompt_bt, k, axis=0)  # [B·K, Tq], prompt-major groups
        pmask = jnp.repeat(prompt_mask_bt, k, axis=0)
        out = sample_split(lm_def, state.params["policy"], prompts, pmask, key, scfg)
        rmask = out.mask
        tokens, mask = concat_prompt_response(prompts, pmask, out.tokens, rmask)
        logp, logits = logprobs(state.params["policy"], tokens, mask, out.tokens)
        ref_logp, _ = logprobs(ref_params, tokens, mask, out.tokens)
        score = reward(rm_params, prompts, pmask, out.tokens, rmask)
        if cfg.missing_eos_penalty is not None:
            has_eos = jnp.any((out.tokens == scfg.eos_id) & rmask, axis=1)
            score = rl.apply_missing_eos_penalty(score, has_eos, cfg.missing_eos_penalty)
        beta = state.kl_ctl.value
        total, kl_seq = rl.kl_penalized_scores(score, logp, ref_logp, rmask, beta,
                                               cfg.kl_estimator)
        group = (total if cfg.kl_in == "reward" else score).reshape(-1, k)
        adv = (rl.rloo_advantages(group) if cfg.advantage == "rloo"
               else rl.grpo_advantages(group, scale=cfg.scale_advantages))
        adv_bt = jnp.where(rmask, adv.reshape(-1)[:, None], 0.0)
        batch = {"tokens": tokens, "mask": mask, "response": out.tokens, "rmask": rmask,
                 "old_logp": logp, "ref_logp": ref_logp, "adv": adv_bt}
        metrics = {
            "objective/kl": jnp.mean(kl_seq),
            "objective/kl_coef": beta,
            "objective/scores": jnp.mean(score),
            "objective/rlhf_reward": jnp.mean(score - beta * kl_seq),
            "objective/entropy": losses.entropy(logits, rmask, temp),
            "objective/response_len": jnp.mean(jnp.sum(rmask, axis=1).astype(jnp.float32)),
            "grpo/group_score_std": jnp.mean(jnp.std(score.reshape(-1, k), axis=1)),
        }
        return batch, metrics, out

    def loss_fn(params, beta, mb):
        logp, logits = logprobs(params["policy"], mb["tokens"], mb["mask"], mb["response"])
        loss, m = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["rmask"],
                                         cfg.clip_eps, cfg.dual_clip)
        if cfg.kl_in == "loss":
            kl_loss, km = losses.kl_penalty_loss(logp, mb["ref_logp"], mb["rmask"])
            loss = loss + beta * kl_loss
            m = {**m, **km}
        ent = losses.entropy(jax.lax.stop_gradient(logits), mb["rmask"], temp)
        return loss, {**m, "grpo/loss": loss, "grpo/entropy": ent}

    def update(params, opt_state, batch, key, beta):
        def minibatch(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[idx], batch)
            (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, beta, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            m["grpo/grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state), m

        def epoch(carry, key):
            perm = jax.random.permutation(key, n).reshape(cfg.num_minibatches, -1)
            return jax.lax.scan(minibatch, carry, perm)

        batch = jax.lax.stop_gradient(batch)
        (params, opt_state), um = jax.lax.scan(epoch, (params, opt_state),
                                               jax.random.split(key, cfg.ppo_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, um)

    def iteration(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt):
        key = jax.random.fold_in(state.key, state.iteration)
        k_sample, k_epochs = jax.random.split(key)
        batch, metrics, out = rollout(state, ref_params, rm_params, prompt_bt, prompt_mask_bt,
                                      k_sample)
        params, opt_state, um = update(state.params, state.opt_state, batch, k_epochs,
                                       state.kl_ctl.value)
        metrics.update(um)
        kl_ctl = rl.kl_controller_update(state.kl_ctl, metrics["objective/kl"], n)
        return (PPOState(params=params, opt_state=opt_state, kl_ctl=kl_ctl, key=state.key,
                         iteration=state.iteration + 1), metrics, out.tokens, out.mask)

    return PPOProgram(rollout=rollout, update=update, iteration=iteration)
