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

The program is :func:`rlhf_jax.ppo.make_ppo`'s, with an :class:`~rlhf_jax.ppo.Assembly` that
builds the models from the adapters and the base, which takes the place of the reference's
parameters (a test checks that its rollout equals full fine-tuning's on the merged models):

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

from rlhf_jax.generation import SamplingConfig
from rlhf_jax.models import lora
from rlhf_jax.models.heads import ScalarHead, ScalarModel
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.ppo import Assembly, initial_state
from rlhf_jax.ppo import make_evaluate as _make_evaluate
from rlhf_jax.ppo import make_ppo, PPOConfig, PPOProgram, PPOState
from rlhf_jax.scoring import RewardScorer


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
    return initial_state(cfg, {"policy": policy_lora, "value": nnx.state(value_head)}, tx)


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
    """Builds the LoRA PPO program: :func:`rlhf_jax.ppo.make_ppo` with LoRA's
    :class:`~rlhf_jax.ppo.Assembly`, the shared base passed where full fine-tuning passes the
    reference's parameters.

    Args:
      cfg: the hyper-parameters; ``value_head_on_policy`` must be True.
      lm_def: the adapted policy's graph (:attr:`LoraPPOSetup.lm_def`).
      base_def: the base graph, the reference (:attr:`LoraPPOSetup.base_def`).
      value_def: graph of the critic, a :class:`ScalarHead` on the policy's hidden states.
      reward: the adapted reward model (:attr:`LoraPPOSetup.reward`).
      tx: the optimizer (:func:`rlhf_jax.ppo.make_optimizer`); it sees adapters and head only.
      scfg: the rollout sampler (:func:`rlhf_jax.ppo.sampling_config`).

    Returns:
      a :class:`rlhf_jax.ppo.PPOProgram` whose functions take the base as ``ref_params``:
      ``rollout(state, base, rm_params, prompt_bt, prompt_mask_bt, key)``,
      ``update(params, opt_state, base, batch, key)`` and
      ``iteration(state, base, rm_params, prompt_bt, prompt_mask_bt)``.

    Raises:
      ValueError: a separate value model (``value_head_on_policy=False``), or what
        :func:`~rlhf_jax.ppo.make_ppo` refuses.
    """
    if not cfg.value_head_on_policy:
        raise ValueError("invalid LoRA PPO config:\n  value_head_on_policy=False: LoRA PPO's "
                         "critic is a value head on the policy's hidden states; set it to True")
    assembly = Assembly(policy=lambda adapters, base: lora.join(adapters, base),
                        ref_def=base_def, reward=reward_state)
    return make_ppo(cfg, lm_def, value_def, reward, tx, scfg, assembly=assembly)


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
