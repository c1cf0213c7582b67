"""rlhf_jax: RLHF (SFT -> Bradley-Terry reward model -> PPO with a KL penalty) in JAX/Flax."""
__version__ = "0.1.0"

from rlhf_jax.losses import (best_of_k_loss, bradley_terry_loss, dpo_loss, entropy, kl_penalty_loss,
                             lm_loss, ppo_policy_loss, ppo_value_loss, ranking_loss, ranking_pairs,
                             token_entropy, token_logprobs)
from rlhf_jax.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.rl import (adaptive_kl_controller, apply_missing_eos_penalty, explained_variance,
                         fixed_kl_controller, gae, grpo_advantages, kl_controller_update,
                         kl_estimate, kl_penalized_scores, kl_shaped_rewards, KLControllerState,
                         normalization_gain_bias, rloo_advantages, truncate_after_eos)

__all__ = [
    "KLControllerState", "adaptive_kl_controller", "apply_missing_eos_penalty", "best_of_k_loss",
    "bradley_terry_loss", "dpo_loss", "entropy", "explained_variance", "fixed_kl_controller",
    "gae", "grpo_advantages", "kl_controller_update", "kl_estimate", "kl_penalized_scores",
    "kl_penalty_loss", "kl_shaped_rewards", "lm_loss", "masked_mean", "rloo_advantages",
    "masked_sum", "masked_var", "masked_whiten", "normalization_gain_bias", "ppo_policy_loss",
    "ppo_value_loss", "ranking_loss", "ranking_pairs", "token_entropy", "token_logprobs",
    "truncate_after_eos",
]
