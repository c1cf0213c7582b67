"""Hugging Face weights in and out: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM.

The mapping is a pure key table (:func:`param_table`): one row per parameter of our
:class:`~rlhf_jax.models.transformer.Transformer`, naming the HF tensor(s) it comes from and the two
array functions converting between layouts. Loading and saving both walk the same table, so they
cannot drift apart, and expected HF shapes are derived from it for error messages.

Layout facts the table encodes:

* GPT-2's ``Conv1D`` weights are stored ``[in, out]``; ``c_attn`` fuses q, k, v along ``out``.
* Llama/Qwen2 ``nn.Linear`` weights are stored ``[out, in]``; q/k/v are separate, and Qwen2 adds
  q/k/v biases. Our fused ``qkv[D, N + 2K, H]`` concatenates them along the head axis.
* RoPE weights are in HF's rotate-half layout, which is what our RoPE uses (GGUF files are
  converted by :func:`rlhf_jax.models.gguf.read_gguf`).

torch is never imported here: tensors are read and written with ``safetensors.numpy``.

Malformed checkpoints end in an error that names the file (``config.json``, the safetensors file
or shard, the index) and what was expected: a missing or non-JSON ``config.json``, a missing or
wrongly typed config key, an unsupported architecture, a truncated or corrupt safetensors file, a
shard the index lists but the directory lacks, a missing tensor, a tensor of the wrong shape.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPE_TO_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                       "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter of ours <-> one or more HF tensors.

    Attributes:
      path: dotted attribute path in :class:`Transformer` (``"blocks.0.attn.qkv"``).
      hf_names: the HF tensor names (without the ``transformer.``/``model.`` prefix handling, which
        :func:`param_table` already applied).
      to_ours: ``(*hf_arrays) -> ours``.
      to_hf: ``ours -> tuple of hf_arrays`` (same order as ``hf_names``).
    """
    path: str
    hf_names: tuple[str, ...]
    to_ours: Callable[..., Any]
    to_hf: Callable[[Any], tuple]


def _same(name: str, path: str) -> Row:
    return Row(path, (name,), lambda w: w, lambda w: (w,))


def _transposed(name: str, path: str) -> Row:
    return Row(path, (name,), lambda w: w.T, lambda w: (w.T,))


def architecture(hf_config: Mapping[str, Any]) -> str:
    """The HF architecture name of a ``config.json`` dict; raises if we do not support it."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(hf_config.get("model_type", ""), None)
    if arch not in SUPPORTED_ARCHITECTURES:
        found = archs[0] if archs else f"model_type={hf_config.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {found}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _get(hf_config: Mapping[str, Any], key: str, default: Any = KeyError, kind: type = int):
    """``hf_config[key]`` checked to be a ``kind`` (int or float); ``default`` if absent/null.

    Raises:
      ValueError: the key is missing (and has no default) or has the wrong type.
    """
    value = hf_config.get(key)
    if value is None:
        if default is KeyError:
            raise ValueError(f"config key {key!r} is missing; expected "
                             f"{'an integer' if kind is int else 'a number'}")
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise ValueError(f"config key {key!r} = {value!r}; expected "
                         f"{'an integer' if kind is int else 'a number'}")
    return kind(value)


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
    """RoPE base from either transformers-5 ``rope_parameters`` or the older flat keys."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported (only 'default')")
    if "rope_theta" in params:
        return _get(params, "rope_theta", kind=float)
    return _get(hf_config, "rope_theta", 10000.0, float)


def config_from_hf(hf_config: Mapping[str, Any], compute_dtype: str = "float32") -> ModelConfig:
    """Our :class:`ModelConfig` from a HF ``config.json`` dict.

    Raises:
      ValueError: an unsupported architecture or setting, or a size key that is missing or not an
        integer (the message names the key).
    """
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"expected a config.json object, got {type(hf_config).__name__}")
    arch = architecture(hf_config)
    if arch == "GPT2LMHeadModel":
        act = hf_config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function={act!r} is not supported (tanh GELU only)")
        d = _get(hf_config, "n_embd")
        return ModelConfig(family="gpt2", vocab_size=_get(hf_config, "vocab_size"),
                           num_layers=_get(hf_config, "n_layer"), d_model=d,
                           num_heads=_get(hf_config, "n_head"),
                           num_kv_heads=_get(hf_config, "n_head"),
                           mlp_dim=_get(hf_config, "n_inner", None) or 4 * d,
                           max_seq_len=_get(hf_config, "n_positions"),
                           norm_eps=_get(hf_config, "layer_norm_epsilon", 1e-5, float),
                           tie_embeddings=hf_config.get("tie_word_embeddings", True),
                           compute_dtype=compute_dtype)
    d, n = _get(hf_config, "hidden_size"), _get(hf_config, "num_attention_heads")
    if d <= 0 or n <= 0 or d % n:
        raise ValueError(f"hidden_size={d}, num_attention_heads={n}; expected positive integers, "
                         "hidden_size a multiple of num_attention_heads")
    if hf_config.get("head_dim") not in (None, d // n):
        raise ValueError(f"head_dim={hf_config['head_dim']} != hidden_size / num_attention_heads "
                         f"= {d // n} is not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config['hidden_act']!r} is not supported (silu only)")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError("Llama attention_bias/mlp_bias=True is not supported")
    return ModelConfig(family="llama", vocab_size=_get(hf_config, "vocab_size"),
                       num_layers=_get(hf_config, "num_hidden_layers"), d_model=d, num_heads=n,
                       num_kv_heads=_get(hf_config, "num_key_value_heads", None) or n,
                       mlp_dim=_get(hf_config, "intermediate_size"),
                       max_seq_len=_get(hf_config, "max_position_embeddings", 2048),
                       norm_eps=_get(hf_config, "rms_norm_eps", 1e-6, float),
                       rope_theta=_rope_theta(hf_config),
                       tie_embeddings=hf_config.get("tie_word_embeddings", False),
                       qkv_bias=arch == "Qwen2ForCausalLM", compute_dtype=compute_dtype)


def param_table(cfg: ModelConfig, prefix: str | None = None) -> list[Row]:
    """The key table between our parameters and HF tensor names for ``cfg``'s family.

    Args:
      cfg: the model config.
      prefix: the base-model prefix of HF names; default ``"transformer."`` (GPT-2) or ``"model."``
        (Llama/Qwen2). The LM head (``lm_head.weight``) never has a prefix.
    """
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows: list[Row] = []
    if cfg.family == "gpt2":
        p = "transformer." if prefix is None else prefix
        rows += [_same(p + "wte.weight", "embed"), _same(p + "wpe.weight", "pos_embed")]
        for i in range(cfg.num_layers):
            hf, ours = f"{p}h.{i}.", f"blocks.{i}."
            rows += [
                _same(hf + "ln_1.weight", ours + "attn_norm.scale"),
                _same(hf + "ln_1.bias", ours + "attn_norm.bias"),
                # Conv1D [D, 3D] with out = (q|k|v, N, H) -> [D, 3N, H].
                Row(ours + "attn.qkv", (hf + "attn.c_attn.weight",),
                    lambda w: w.reshape(d, 3 * n, h), lambda w: (w.reshape(d, 3 * d),)),
                Row(ours + "attn.qkv_bias", (hf + "attn.c_attn.bias",),
                    lambda b: b.reshape(3 * n, h), lambda b: (b.reshape(3 * d),)),
                Row(ours + "attn.out", (hf + "attn.c_proj.weight",),
                    lambda w: w.reshape(n, h, d), lambda w: (w.reshape(d, d),)),
                _same(hf + "attn.c_proj.bias", ours + "attn.out_bias"),
                _same(hf + "ln_2.weight", ours + "mlp_norm.scale"),
                _same(hf + "ln_2.bias", ours + "mlp_norm.bias"),
                _same(hf + "mlp.c_fc.weight", ours + "mlp.up"),
                _same(hf + "mlp.c_fc.bias", ours + "mlp.up_bias"),
                _same(hf + "mlp.c_proj.weight", ours + "mlp.down"),
                _same(hf + "mlp.c_proj.bias", ours + "mlp.down_bias"),
            ]
        rows += [_same(p + "ln_f.weight", "final_norm.scale"),
                 _same(p + "ln_f.bias", "final_norm.bias")]
    else:
        p = "model." if prefix is None else prefix
        rows.append(_same(p + "embed_tokens.weight", "embed"))
        for i in range(cfg.num_layers):
            hf, ours = f"{p}layers.{i}.", f"blocks.{i}."
            qkv = tuple(hf + f"self_attn.{x}_proj.weight" for x in "qkv")
            rows += [
                _same(hf + "input_layernorm.weight", ours + "attn_norm.scale"),
                # Linear [N*H, D], [K*H, D], [K*H, D] -> [D, N + 2K, H].
                Row(ours + "attn.qkv", qkv,
                    lambda q, kk, v: jnp.concatenate(
                        [q.T.reshape(d, n, h), kk.T.reshape(d, k, h), v.T.reshape(d, k, h)], 1),
                    lambda w: (w[:, :n].reshape(d, n * h).T, w[:, n:n + k].reshape(d, k * h).T,
                               w[:, n + k:].reshape(d, k * h).T)),
                Row(ours + "attn.out", (hf + "self_attn.o_proj.weight",),
                    lambda w: w.T.reshape(n, h, d), lambda w: (w.reshape(n * h, d).T,)),
                _same(hf + "post_attention_layernorm.weight", ours + "mlp_norm.scale"),
                _transposed(hf + "mlp.gate_proj.weight", ours + "mlp.gate"),
                _transposed(hf + "mlp.up_proj.weight", ours + "mlp.up"),
                _transposed(hf + "mlp.down_proj.weight", ours + "mlp.down"),
            ]
            if cfg.qkv_bias:
                rows.append(Row(ours + "attn.qkv_bias",
                                tuple(hf + f"self_attn.{x}_proj.bias" for x in "qkv"),
                                lambda q, kk, v: jnp.concatenate(
                                    [q.reshape(n, h), kk.reshape(k, h), v.reshape(k, h)], 0),
                                lambda b: (b[:n].reshape(-1), b[n:n + k].reshape(-1),
                                           b[n + k:].reshape(-1))))
        rows.append(_same(p + "norm.weight", "final_norm.scale"))
    if not cfg.tie_embeddings:
        rows.append(_transposed("lm_head.weight", "lm_head"))
    return rows


def _variable(model: nnx.Module, path: str) -> nnx.Variable:
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _detect_prefix(cfg: ModelConfig, names) -> str:
    """HF checkpoints may or may not carry the base-model prefix (GPT2Model vs GPT2LMHeadModel)."""
    embed = "wte.weight" if cfg.family == "gpt2" else "embed_tokens.weight"
    for prefix in (("transformer.", "") if cfg.family == "gpt2" else ("model.", "")):
        if prefix + embed in names:
            return prefix
    return "transformer." if cfg.family == "gpt2" else "model."


def from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
            compute_dtype: str = "float32", where: str | None = None,
            tensor_files: Mapping[str, str] | None = None) -> tuple[ModelConfig, Transformer]:
    """Build a :class:`Transformer` from HF config + tensors (keyed by HF names).

    Args:
      hf_config: a ``config.json`` dict.
      tensors: HF name -> array.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` matmuls.
      where: the checkpoint the tensors came from; prefixes the messages of tensor errors.
      tensor_files: HF name -> the file holding it (sharded checkpoints); named instead of
        ``where`` in the message about that tensor.

    Raises:
      ValueError: unsupported architecture (names it and the supported ones), a missing tensor
        (names it), or a tensor whose shape disagrees with the config (name, expected, got).
    """
    cfg = config_from_hf(hf_config, compute_dtype)
    tensor_files = tensor_files or {}

    def at(name: str | None = None) -> str:
        place = tensor_files.get(name, where) if name else where
        return f"{place}: " if place else ""
    # Abstract model: parameter shapes without spending time on a random init.
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    for row in param_table(cfg, _detect_prefix(cfg, tensors.keys())):
        var = _variable(model, row.path)
        expected = jax.eval_shape(row.to_hf, jax.ShapeDtypeStruct(var.shape, jnp.float32))
        arrays = []
        for name, want in zip(row.hf_names, expected):
            if name not in tensors:
                raise ValueError(f"{at()}missing tensor {name!r} for a {architecture(hf_config)} "
                                 f"with {cfg.num_layers} layers (tie_embeddings="
                                 f"{cfg.tie_embeddings}); expected shape {want.shape}")
            arr = np.asarray(tensors[name])
            if arr.shape != want.shape:
                raise ValueError(f"{at(name)}tensor {name!r} has shape {arr.shape}; expected "
                                 f"{want.shape} from the config")
            arrays.append(jnp.asarray(arr, jnp.float32))
        var.set_value(jnp.asarray(row.to_ours(*arrays), jnp.float32))
    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        if not isinstance(leaf[...], jax.Array):  # a parameter the key table does not cover
            raise RuntimeError(f"parameter {'.'.join(map(str, path))} was not loaded")
    return cfg, model


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict transformers understands for ``cfg``'s family."""
    if cfg.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None,
                "eos_token_id": None, "torch_dtype": "float32"}
    qwen = cfg.qkv_bias
    out = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen else "llama", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
           "torch_dtype": "float32"}
    if qwen:
        out["use_sliding_window"] = False
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def to_hf_tensors(model: Transformer, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters as f32 NumPy arrays keyed by HF names (the inverse of :func:`from_hf`)."""
    tensors = {}
    for row in param_table(cfg):
        value = _variable(model, row.path)[...]
        for name, arr in zip(row.hf_names, row.to_hf(value)):
            tensors[name] = np.ascontiguousarray(np.asarray(arr, np.float32))
    return tensors


def save_pretrained(model: Transformer, cfg: ModelConfig, path: str | os.PathLike, *,
                    extra_config: Mapping[str, Any] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``AutoModelForCausalLM``.

    Args:
      model: the model to save (parameters written as f32).
      cfg: its config; the family picks GPT2LMHeadModel, LlamaForCausalLM or (``qkv_bias``)
        Qwen2ForCausalLM.
      path: output directory (created).
      extra_config: keys merged into ``config.json``, e.g. ``{"eos_token_id": 50256}``.
    """
    from safetensors.numpy import save_file
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_dict(cfg), **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_hf_tensors(model, cfg), str(path / "model.safetensors"),
              metadata={"format": "pt"})


def _read_json_object(file: pathlib.Path) -> dict[str, Any]:
    """The JSON object in ``file``; a ``ValueError`` naming the file if it is anything else."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start}); expected a JSON object") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         "expected a JSON object") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _safetensors_problem(file: pathlib.Path) -> str | None:
    """What is wrong with the layout of a safetensors file (u64 header length, JSON header,
    tensor bytes), or None if the layout looks right."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return (f"truncated: expected an 8-byte header length, the file has {size} bytes")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            lfs = " (a Git LFS pointer: fetch the file with `git lfs pull`)" \
                if head.startswith(b"version ") else ""
            return (f"truncated or not a safetensors file: the first 8 bytes announce a "
                    f"{n}-byte JSON header, the file has {size} bytes{lfs}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt: the header is not JSON"
    if not isinstance(header, dict):
        return "corrupt: the header is not a JSON object"
    spans = [(v["data_offsets"][1], k) for k, v in header.items()
             if isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
             and len(v["data_offsets"]) == 2]
    if spans:
        end, name = max(spans)
        if 8 + n + end > size:
            return (f"truncated: expected {end} bytes of tensor data (up to the end of tensor "
                    f"{name!r}), the file has {size - 8 - n}")
    return None


def _load_safetensors_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file`` with errors that name the file and the expected layout."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(file))
    except (SafetensorError, ValueError, TypeError) as e:
        problem = _safetensors_problem(file)
        if problem is None:
            problem = (f"cannot be read ({type(e).__name__}: {e}); expected a safetensors file "
                       "(8-byte header length, JSON header, tensor bytes)")
        raise ValueError(f"{file}: {problem}") from e


def _read_safetensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """``(tensors, {name: file}, where)`` of a HF directory; ``where`` names the checkpoint (the
    single file or the index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard "
                             "file name")
        shards = sorted(set(weight_map.values()))
        tensors: dict[str, np.ndarray] = {}
        files: dict[str, str] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{index} lists shard {shard!r}, which is missing "
                                        f"from {path}")
            loaded = _load_safetensors_file(path / shard)
            tensors.update(loaded)
            files.update(dict.fromkeys(loaded, str(path / shard)))
        return tensors, files, str(index)
    single = path / "model.safetensors"
    if single.exists():
        return _load_safetensors_file(single), {}, str(single)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                            f"model.safetensors.index.json (found: "
                            f"{sorted(p.name for p in path.iterdir())}); only safetensors "
                            f"checkpoints are supported")


def load_pretrained(path: str | os.PathLike, *,
                    compute_dtype: str = "float32") -> tuple[ModelConfig, Transformer]:
    """Load a HF model directory (``config.json`` + safetensors, single or sharded) or a ``.gguf``.

    Args:
      path: a directory written by ``save_pretrained`` (ours or transformers'), or a ``.gguf`` file.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` matmuls (parameters are f32 either way).

    Raises:
      FileNotFoundError: no such directory/file, no ``config.json``, no safetensors file, or a
        shard the index lists is missing.
      ValueError: ``"{file}: ..."``: ``config.json`` is not a JSON object, lacks a key or names an
        unsupported architecture; a safetensors file is truncated or corrupt; a tensor is missing
        or has the wrong shape (name, expected and actual shape); see
        :func:`rlhf_jax.models.gguf.read_gguf` for GGUF files.
    """
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        from rlhf_jax.models.gguf import read_gguf
        hf_config, tensors = read_gguf(path)
        return from_hf(hf_config, tensors, compute_dtype=compute_dtype, where=str(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face model "
                                f"directory or a .gguf file")
    hf_config = _read_json_object(config_file)
    try:  # fail on an unsupported or incomplete config before reading the weights
        config_from_hf(hf_config, compute_dtype)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    tensors, files, where = _read_safetensors(path)
    return from_hf(hf_config, tensors, compute_dtype=compute_dtype, where=where,
                   tensor_files=files)
