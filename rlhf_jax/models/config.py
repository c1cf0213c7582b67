"""Model configuration for the decoder-only transformers (GPT-2 and Llama families).

One :class:`ModelConfig` describes both families; ``family`` switches the few places where they
differ (positions, norm, MLP, biases). Qwen2 is the Llama family with ``qkv_bias=True``.
"""
from __future__ import annotations

import dataclasses

FAMILIES = ("gpt2", "llama")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    Attributes:
      family: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP, biases everywhere) or ``"llama"``
        (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases unless ``qkv_bias``).
      vocab_size: V, rows of the token embedding.
      num_layers: number of transformer blocks.
      d_model: D, width of the residual stream.
      num_heads: N, query heads.
      num_kv_heads: key/value heads; ``== num_heads`` for GPT-2, fewer for grouped-query attention.
      mlp_dim: hidden width of the MLP.
      max_seq_len: size of GPT-2's learned position table; the context limit for Llama.
      norm_eps: epsilon of LayerNorm / RMSNorm.
      rope_theta: RoPE base frequency (Llama only).
      tie_embeddings: whether the LM head reuses the token embedding matrix.
      qkv_bias: bias on the query/key/value projections for the Llama family (Qwen2). GPT-2 always
        has biases.
      compute_dtype: ``"float32"`` or ``"bfloat16"``; with bf16 matmul inputs are cast to bf16 and
        accumulated in f32. Parameters, norms, softmax and returned logits stay f32.
      remat: per-layer rematerialisation: a block's activations are recomputed in the backward
        pass instead of stored (``jax.checkpoint`` around each block of a forward without a KV
        cache): activation memory of one block instead of all, about a third more compute.
        The outputs and gradients are unchanged.
    """
    family: str
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    qkv_bias: bool = False
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}; expected one of {FAMILIES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"ModelConfig.compute_dtype={self.compute_dtype!r}; expected one of "
                             f"{COMPUTE_DTYPES}")
        if self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.family == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"gpt2 family needs num_kv_heads == num_heads, got "
                             f"{self.num_kv_heads} != {self.num_heads}")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        """H, width of one attention head."""
        return self.d_model // self.num_heads

    @property
    def num_groups(self) -> int:
        """Query heads sharing one key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(family="gpt2", vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                        num_kv_heads=4, mlp_dim=256, max_seq_len=128),
    "tiny-llama": ModelConfig(family="llama", vocab_size=512, num_layers=2, d_model=64,
                              num_heads=4, num_kv_heads=2, mlp_dim=192, max_seq_len=128,
                              rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True),
    # GPT-2 small (124M), Radford et al. 2019.
    "gpt2": ModelConfig(family="gpt2", vocab_size=50257, num_layers=12, d_model=768, num_heads=12,
                        num_kv_heads=12, mlp_dim=3072, max_seq_len=1024, norm_eps=1e-5),
    # SmolLM2-135M (HuggingFaceTB), Llama architecture with grouped-query attention.
    "smollm2-135m": ModelConfig(family="llama", vocab_size=49152, num_layers=30, d_model=576,
                                num_heads=9, num_kv_heads=3, mlp_dim=1536, max_seq_len=8192,
                                rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
}
