"""PPO with a KL penalty to a reference policy: the state, the rollout, the update, and the
one-iteration program (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

One iteration — sample responses, policy/reference log-probs, reward-model scores, KL-shaped
per-token rewards ``r_t = -β·KL_t (+ score at the last token)``, GAE, then ``ppo_epochs`` ×
``num_minibatches`` clipped policy + clipped value updates — is **one compiled program**
(:meth:`PPOProgram.iteration`; the epochs and minibatches are ``lax.scan`` loops). Jit it with the
state donated; with the batch sharded over a device mesh the same program runs data-parallel.

Example::

    program = make_ppo(cfg, lm_def, value_def, RewardScorer(rm_def, eos_id), make_optimizer(cfg),
                       sampling)
    step = jax.jit(program.iteration, donate_argnums=(0,))
    state, metrics, responses, response_mask = step(state, ref_params, rm_params, prompts, mask)

The hyper-parameters are :class:`PPOConfig`; an experiment's config extends it with paths.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, parallel, rl
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.masked import masked_mean, masked_sum, masked_whiten
from rlhf_jax.models.transformer import positions_from_mask
from rlhf_jax.scoring import (concat_prompt_response, response_logits, response_positions,
                              RewardScorer)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (defaults: the embedded IMDB task on a 2-core CPU)."""
    iterations: int = 100
    """PPO iterations (each: one rollout batch + its updates); sets the learning-rate decay."""
    batch_size: int = 64
    """Rollouts per iteration (split over the devices of the data axis)."""
    query_len: int = 16
    """Prompt tokens (left-padded if shorter)."""
    response_len: int = 24
    """Sampled tokens per response."""
    temperature: float = 1.0
    """Sampling temperature; policy and reference log-probs use it too."""
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: float | None = None
    """Score given to responses without the stop token (lm-human-preferences: -1); needs one."""
    ppo_epochs: int = 2
    num_minibatches: int = 2
    learning_rate: float = 2e-4
    """Adam step size, decayed linearly to 0 over all updates."""
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.1
    """Initial β."""
    adaptive_kl: bool = True
    kl_target: float = 10.0
    """Adaptive controller target (nats per response)."""
    kl_horizon: float = 1000.0
    """Adaptive controller horizon H in samples (β moves by at most 20%·batch/H per iteration)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (papers) or k3 (unbiased, non-negative)."""
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    value_head_on_policy: bool = False
    """Critic = a zero-init value head on the policy's hidden states instead of a separate model."""
    seed: int = 0

    def ppo_errors(self) -> list[str]:
        """Every invalid hyper-parameter, as ``"field=value: expected ..."`` (empty: valid)."""
        errs = []
        for f in ("iterations", "batch_size", "query_len", "response_len", "ppo_epochs",
                  "num_minibatches"):
            if getattr(self, f) < 1:
                errs.append(f"{f}={getattr(self, f)}: expected a positive integer")
        if self.num_minibatches >= 1 and self.batch_size % self.num_minibatches:
            errs.append(f"batch_size={self.batch_size}: expected a multiple of "
                        f"num_minibatches={self.num_minibatches}")
        for f in ("learning_rate", "kl_coef", "temperature", "clip_eps", "kl_target"):
            v = getattr(self, f)
            if not (v == v and abs(v) != float("inf")) or v <= 0:
                errs.append(f"{f}={v}: expected a finite positive number")
        if self.kl_estimator not in rl.KL_ESTIMATORS:
            errs.append(f"kl_estimator={self.kl_estimator!r}: expected one of "
                        f"{tuple(rl.KL_ESTIMATORS)}")
        return errs


@flax.struct.dataclass
class PPOState:
    """Everything a PPO run carries from one iteration to the next (and checkpoints)."""
    params: dict
    """``{"policy": LM params, "value": critic params}`` (nnx.State pytrees)."""
    opt_state: optax.OptState
    kl_ctl: rl.KLControllerState
    key: jax.Array
    """Base key; iteration ``i`` uses ``fold_in(key, i)``, so a resumed run draws the same
    numbers."""
    iteration: jax.Array


class PPOProgram(NamedTuple):
    """The pieces of one PPO iteration; each is a pure function to ``jax.jit``.

    * ``rollout(state, ref_params, rm_params, prompt_bt, prompt_mask_bt, key) -> (batch, metrics,
      sample)``: sample, score, shape rewards, GAE.
    * ``update(params, opt_state, ref_params, batch, key) -> (params, opt_state, metrics)``: the
      epochs × minibatches of clipped updates on one rollout (``ref_params`` is read only where
      the policy is built from it, as with LoRA; otherwise XLA drops it).
    * ``iteration(state, ref_params, rm_params, prompt_bt, prompt_mask_bt) -> (state, metrics,
      response_tokens, response_mask)``: both, plus the KL-controller step.
    """
    rollout: Callable
    update: Callable
    iteration: Callable


class Assembly(NamedTuple):
    """How a PPO program builds its models from the trained parameters and the frozen
    ``ref_params`` that each of its functions receives.

    The default is full fine-tuning: the trained policy parameters are the whole policy,
    ``ref_params`` the reference's own copy, ``rm_params`` the whole reward model. LoRA
    (:mod:`rlhf_jax.lora_ppo`) trains adapters and passes the shared base as ``ref_params``: the
    policy is base + adapters, the reference the base graph (adapters off), the reward model the
    base + its own adapters and head.
    """
    policy: Callable = lambda trained, ref_params: trained
    """``(trained policy params, ref_params) -> the policy's state`` (for ``lm_def``)."""
    ref_def: nnx.GraphDef | None = None
    """The reference's graph, merged with ``ref_params`` (None: ``lm_def``)."""
    reward: Callable = lambda rm_params, ref_params: rm_params
    """``(rm_params, ref_params) -> the reward model's state``."""


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Global-norm clipping + Adam (eps 1e-5), the step size decayed linearly to 0."""
    total_updates = cfg.iterations * cfg.ppo_epochs * cfg.num_minibatches
    schedule = optax.linear_schedule(cfg.learning_rate, 0.0, total_updates)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adam(schedule, eps=1e-5))


def init_state(cfg: PPOConfig, policy: nnx.Module, critic: nnx.Module,
               tx: optax.GradientTransformation) -> PPOState:
    """The state at iteration 0: policy and critic params, optimizer state, β, the base key."""
    return initial_state(cfg, {"policy": nnx.state(policy), "value": nnx.state(critic)}, tx)


def initial_state(cfg: PPOConfig, params: dict, tx: optax.GradientTransformation) -> PPOState:
    """The state at iteration 0 for the trained ``params`` (``{"policy", "value"}``)."""
    kl_ctl = (rl.adaptive_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else rl.fixed_kl_controller(cfg.kl_coef))
    state = PPOState(params=params, opt_state=tx.init(params), kl_ctl=kl_ctl,
                     key=jax.random.key(cfg.seed), iteration=jnp.zeros((), jnp.int32))
    return parallel.commit_like(state, jax.tree.leaves(params)[0])  # one compile, not two


def sampling_config(cfg: PPOConfig, pad_id: int, eos_id: int | None) -> SamplingConfig:
    """The rollout sampler: ``response_len`` tokens at the PPO temperature, stopping at
    ``eos_id`` (None: fixed-length responses)."""
    return SamplingConfig(max_new_tokens=cfg.response_len, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id,
                          min_new_tokens=1)


def make_ppo(cfg: PPOConfig, lm_def: nnx.GraphDef, value_def: nnx.GraphDef,
             reward: RewardScorer, tx: optax.GradientTransformation,
             scfg: SamplingConfig, mesh: jax.sharding.Mesh | None = None,
             assembly: Assembly = Assembly()) -> PPOProgram:
    """Builds the PPO program for these models and hyper-parameters.

    Args:
      cfg: the hyper-parameters.
      lm_def: graph of the policy (and reference) ``Transformer``.
      value_def: graph of the critic: a ``ScalarModel`` or, with ``value_head_on_policy``, a
        ``ScalarHead`` on the policy's hidden states.
      reward: the reward model's graph, EOS and pooling.
      tx: the optimizer (:func:`make_optimizer`).
      scfg: the rollout sampler (:func:`sampling_config`).
      mesh: the device mesh the state is sharded over (:func:`rlhf_jax.parallel.shard`); every
        update keeps parameters and optimizer state on the partition rules' shardings (None:
        leave the shardings to XLA).
      assembly: how the models are built from the trained parameters and ``ref_params`` (the
        default: full fine-tuning; :func:`rlhf_jax.lora_ppo.make_lora_ppo` passes LoRA's).

    Raises:
      ValueError: invalid hyper-parameters, or ``missing_eos_penalty`` without a stop token.
    """
    errs = cfg.ppo_errors()
    if cfg.missing_eos_penalty is not None and scfg.eos_id is None:
        errs.append(f"missing_eos_penalty={cfg.missing_eos_penalty}: needs a stop token (the "
                    "sampler's eos_id is None, so every response would get the penalty)")
    if errs:
        raise ValueError("invalid PPO config:\n  " + "\n  ".join(errs))
    temp = cfg.temperature
    resp = response_positions(cfg.query_len, cfg.response_len)
    b, n_mb = cfg.batch_size, cfg.num_minibatches
    ref_def = assembly.ref_def or lm_def

    def forward(params, ref_params, tokens_bt, mask_bt):
        """Policy logits ``[B, Tr, V]`` and values ``[B, Tr]`` over the response positions."""
        logits, hidden = response_logits(lm_def, assembly.policy(params["policy"], ref_params),
                                         tokens_bt, mask_bt, resp)
        pos = positions_from_mask(mask_bt)
        critic = nnx.merge(value_def, params["value"])
        values = critic(hidden) if cfg.value_head_on_policy else critic(tokens_bt, pos, mask_bt)
        return logits, values[:, resp]

    def rollout(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt, key):
        out = sample_split(lm_def, assembly.policy(state.params["policy"], ref_params),
                           prompt_bt, prompt_mask_bt, key, scfg)
        rmask = out.mask
        tokens, mask = concat_prompt_response(prompt_bt, prompt_mask_bt, out.tokens, rmask)
        logits, values = forward(state.params, ref_params, tokens, mask)
        logp = losses.token_logprobs(logits, out.tokens, temp)
        ref_logits, _ = response_logits(ref_def, ref_params, tokens, mask, resp)
        ref_logp = losses.token_logprobs(ref_logits, out.tokens, temp)
        score = reward(assembly.reward(rm_params, ref_params), prompt_bt, prompt_mask_bt,
                       out.tokens, rmask)
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
            "objective/kl": jnp.mean(kl_seq),  # the `kl_estimator` KL: what β is applied to
            "objective/kl_coef": state.kl_ctl.value,
            "objective/scores": jnp.mean(score),
            "objective/rlhf_reward": jnp.mean(score - state.kl_ctl.value * kl_seq),
            "objective/entropy": losses.entropy(logits, rmask, temp),
            "objective/response_len": jnp.mean(jnp.sum(rmask, axis=1).astype(jnp.float32)),
            "ppo/val/explained_var_rollout": rl.explained_variance(values, returns, rmask),
            "ppo/returns_mean": masked_mean(returns, rmask),
        }
        return batch, metrics, out

    def loss_fn(params, ref_params, mb):
        logits, values = forward(params, ref_params, mb["tokens"], mb["mask"])
        logp = losses.token_logprobs(logits, mb["response"], temp)
        pg_loss, pm = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["rmask"],
                                             cfg.clip_eps, cfg.dual_clip)
        vf_loss, vm = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["rmask"],
                                            cfg.value_clip_eps)
        # Without an entropy bonus the entropy is a metric only: no gradient through it.
        ent = losses.entropy(logits if cfg.entropy_coef else jax.lax.stop_gradient(logits),
                             mb["rmask"], temp)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
        return loss, {**pm, **vm, "ppo/loss": loss, "ppo/entropy": ent}

    def update(params, opt_state, ref_params, batch, key):
        def minibatch_step(carry, idx_m):
            params, opt_state, batch = carry
            mb = jax.tree.map(lambda x: x[idx_m], batch)
            # Gradients w.r.t. the trained parameters only (argument 0): never of ref_params.
            (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref_params, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            m["ppo/grad_norm"] = optax.tree.norm(grads)
            params, opt_state = parallel.constrain(
                (optax.apply_updates(params, updates), opt_state), mesh)
            return (params, opt_state, batch), m

        def epoch_step(carry, key):
            perm = jax.random.permutation(key, b).reshape(n_mb, b // n_mb)
            return jax.lax.scan(minibatch_step, carry, perm)

        (params, opt_state, _), um = jax.lax.scan(
            epoch_step, (params, opt_state, jax.lax.stop_gradient(batch)),
            jax.random.split(key, cfg.ppo_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, um)

    def iteration(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt):
        key = jax.random.fold_in(state.key, state.iteration)
        k_sample, k_epochs = jax.random.split(key)
        batch, metrics, out = rollout(state, ref_params, rm_params, prompt_bt, prompt_mask_bt,
                                      k_sample)
        params, opt_state, um = update(state.params, state.opt_state, ref_params, batch,
                                       k_epochs)
        params, opt_state = parallel.constrain((params, opt_state), mesh)
        metrics.update(um)
        kl_ctl = rl.kl_controller_update(state.kl_ctl, metrics["objective/kl"], b)
        new_state = PPOState(params=params, opt_state=opt_state, kl_ctl=kl_ctl, key=state.key,
                             iteration=state.iteration + 1)
        return new_state, metrics, out.tokens, out.mask

    return PPOProgram(rollout=rollout, update=update, iteration=iteration)


def make_evaluate(cfg: PPOConfig, lm_def: nnx.GraphDef, reward: RewardScorer | None,
                  scfg: SamplingConfig) -> Callable:
    """``evaluate(policy, ref, rm, prompts, mask, key) -> dict`` (jitted) of ``[N]`` arrays:
    ``tokens``/``mask`` of the sampled responses, the reward-model ``score`` (absent when
    ``reward`` is None; ``rm`` is then ignored), and the KL to the reference per response by two
    estimators, ``kl_k1`` (Σ log π/π_ref, the papers' KL) and ``kl_k3`` (Σ of the non-negative k3
    estimate). Any policy can be evaluated this way (PPO, DPO, best-of-N's base)."""
    resp = response_positions(cfg.query_len, cfg.response_len)

    def evaluate(policy_params, ref_params, rm_params, prompt_bt, prompt_mask_bt, key):
        out = sample_split(lm_def, policy_params, prompt_bt, prompt_mask_bt, key, scfg)
        tokens, mask = concat_prompt_response(prompt_bt, prompt_mask_bt, out.tokens, out.mask)
        lp = [losses.token_logprobs(response_logits(lm_def, p, tokens, mask, resp)[0],
                                    out.tokens, cfg.temperature)
              for p in (policy_params, ref_params)]
        kl = {f"kl_{e}": masked_sum(rl.kl_estimate(lp[0], lp[1], e), out.mask, axis=1)
              for e in ("k1", "k3")}
        res = {"tokens": out.tokens, "mask": out.mask, **kl}
        if reward is not None:
            res["score"] = reward(rm_params, prompt_bt, prompt_mask_bt, out.tokens, out.mask)
        return res

    return jax.jit(evaluate)


def init_seed_states(cfg: PPOConfig, policy: nnx.Module, critic: nnx.Module,
                     tx: optax.GradientTransformation, seeds) -> PPOState:
    """States of independent runs stacked over a leading seed axis ``S``: the same initial
    parameters, each run its own base key (``jax.random.key(seed)``). Feed them to
    :func:`vmap_seeds` of a program."""
    return stack_seeds([init_state(dataclasses.replace(cfg, seed=int(s)), policy, critic, tx)
                        for s in seeds])


def stack_seeds(states: list[PPOState]) -> PPOState:
    """One state per seed stacked along a new leading seed axis ``S``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def vmap_seeds(program: PPOProgram) -> Callable:
    """``iteration(states, ref_params, rm_params, prompts_sbt, masks_sbt)``: the one-iteration
    program vmapped over seeds (states and prompts carry a leading ``S`` axis; the reference and
    reward model are shared). Seed ``s`` computes what the program computes for it alone."""
    return jax.vmap(program.iteration, in_axes=(0, None, None, 0, 0))
