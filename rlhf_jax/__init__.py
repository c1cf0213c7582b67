"""rlhf_jax: RLHF (SFT -> Bradley-Terry reward model -> PPO with a KL penalty) in JAX/Flax."""
__version__ = "0.1.0"

from rlhf_jax.losses import best_of_k_loss
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.losses import entropy
from rlhf_jax.losses import lm_loss
from rlhf_jax.losses import ppo_policy_loss
from rlhf_jax.losses import ppo_value_loss
from rlhf_jax.losses import ranking_loss
from rlhf_jax.losses import ranking_pairs
from rlhf_jax.losses import token_entropy
from rlhf_jax.losses import token_logprobs
from rlhf_jax.rl import adaptive_kl_controller
from rlhf_jax.rl import apply_missing_eos_penalty
from rlhf_jax.rl import explained_variance
from rlhf_jax.rl import fixed_kl_controller
from rlhf_jax.rl import gae
from rlhf_jax.rl import kl_controller_update
from rlhf_jax.rl import kl_estimate
from rlhf_jax.rl import kl_shaped_rewards
from rlhf_jax.rl import KLControllerState
from rlhf_jax.rl import masked_mean
from rlhf_jax.rl import masked_sum
from rlhf_jax.rl import masked_var
from rlhf_jax.rl import masked_whiten
from rlhf_jax.rl import normalization_gain_bias
from rlhf_jax.rl import truncate_after_eos
