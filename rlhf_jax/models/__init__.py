"""Decoder transformers (GPT-2 / Llama families), KV cache, scalar heads, HF weights in/out,
LoRA adapters."""
from rlhf_jax.models.config import ModelConfig, PRESETS
from rlhf_jax.models.heads import ScalarHead, ScalarModel
from rlhf_jax.models.hf import from_hf, load_pretrained, save_pretrained
from rlhf_jax.models.lora import (apply_lora, load_adapters, LoraConfig, LoraParam, merge_lora,
                                  save_adapters)
from rlhf_jax.models.transformer import init_cache, KVCache, positions_from_mask, Transformer

__all__ = [
    "ModelConfig", "PRESETS", "KVCache", "Transformer", "init_cache", "positions_from_mask",
    "ScalarHead", "ScalarModel", "from_hf", "load_pretrained", "save_pretrained",
    "LoraConfig", "LoraParam", "apply_lora", "merge_lora", "save_adapters", "load_adapters",
]
