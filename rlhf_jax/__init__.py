"""rlhf_jax: RLHF (SFT -> Bradley-Terry reward model -> PPO with a KL penalty) in JAX/Flax."""
__version__ = "0.1.0"
