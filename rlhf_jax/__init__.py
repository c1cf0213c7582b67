"""rlhf_jax: RLHF (SFT -> Bradley-Terry reward model -> PPO with a KL penalty) in JAX/Flax."""
__version__ = "0.1.0"

from rlhf_jax.losses import (best_of_k_loss, bradley_terry_loss, entropy, lm_loss, ppo_policy_loss,
                             ppo_value_loss, ranking_loss, ranking_pairs, token_entropy,
                             token_logprobs)
from rlhf_jax.rl import (adaptive_kl_controller, apply_missing_eos_penalty, explained_variance,
                         fixed_kl_controller, gae, kl_controller_update, kl_estimate,
                         kl_shaped_rewards, KLControllerState, masked_mean, masked_sum, masked_var,
                         masked_whiten, normalization_gain_bias, truncate_after_eos)

__all__ = [
    "KLControllerState", "adaptive_kl_controller", "apply_missing_eos_penalty", "best_of_k_loss",
    "bradley_terry_loss", "entropy", "explained_variance", "fixed_kl_controller", "gae",
    "kl_controller_update", "kl_estimate", "kl_shaped_rewards", "lm_loss", "masked_mean",
    "masked_sum", "masked_var", "masked_whiten", "normalization_gain_bias", "ppo_policy_loss",
    "ppo_value_loss", "ranking_loss", "ranking_pairs", "token_entropy", "token_logprobs",
    "truncate_after_eos",
]
