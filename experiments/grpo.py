"""Stage 4, critic-free — RLOO or GRPO against the reward model with a KL penalty to the SFT
policy: K responses per prompt, each baselined by its own group, no value model
(:mod:`rlhf_jax.grpo`). Runs ``--seeds N`` seeds at once like :mod:`experiments.seeds` (one seed
by default), on the same SFT and reward models as PPO.

Run::

    python -m experiments.grpo --preset default --advantage grpo          # GRPO: KL as a k3 loss
    python -m experiments.grpo --preset default --advantage rloo --kl-in reward   # RLOO

``--batch-size`` counts prompts: the default 16 prompts × 4 samples is PPO's 64 responses per
iteration. Outputs in the workdir: ``ckpt/``, ``metrics.jsonl``, ``seeds.png``, ``samples.md``,
``summary.json`` (per seed and mean ± CI of held-out gold, RM score and KL to SFT) and
``final/`` (the first seed's policy bundle).
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from experiments import common
from experiments import ppo as ppo_stage
from experiments import seeds as seeds_stage
from rlhf_jax import grpo


@dataclasses.dataclass(frozen=True)
class Config(seeds_stage.Config, grpo.GRPOConfig):
    """RLOO/GRPO (``rlhf_jax.grpo.GRPOConfig``) with the PPO stage's paths and evaluation."""
    workdir: str = "runs/default/grpo"
    seeds: int = 1
    batch_size: int = 16
    """Prompts per iteration (× ``num_samples`` responses)."""
    value_head_on_policy: bool = True
    """Unused (no critic); True avoids loading a second copy of the reward model as a critic."""

    def errors(self) -> list[str]:
        return super().errors() + self.group_errors()


def _preset(name: str, **changes) -> Config:
    base = ppo_stage.PRESETS[name]
    workdir = base.workdir.rsplit("/", 1)[0] + "/grpo"
    return Config(**{**dataclasses.asdict(base), "workdir": workdir, "value_head_on_policy": True,
                     "batch_size": base.batch_size // 4, "seeds": 1, **changes})


PRESETS: dict[str, Config] = {"default": _preset("default"),
                              "tiny": _preset("tiny", num_samples=2)}


def build(cfg: Config, policy, critic, reward, scfg, seeds):
    """The RLOO/GRPO program and its states stacked over ``seeds`` (the critic is unused)."""
    tx = grpo.make_optimizer(cfg)
    program = grpo.make_grpo(cfg, nnx.graphdef(policy), reward, tx, scfg)
    return program, grpo.init_seed_states(cfg, policy, tx, seeds)


def train(cfg: Config) -> dict:
    """Runs (or resumes) RLOO/GRPO over ``cfg.seeds`` seeds; returns the summary."""
    return seeds_stage.run(cfg, cfg.advantage, build)


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
