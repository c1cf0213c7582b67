"""HF weight import/export: parity with transformers (torch) on tiny random models, and errors."""
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import hf
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.transformer import positions_from_mask, Transformer

B, T, VOCAB = 3, 10, 256


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """GPUs default to TF32 for f32 matmuls (~1e-2 logit error); CPU is unaffected."""
    with jax.default_matmul_precision("highest"):
        yield


def _forward(model, tokens, mask):
    """Jitted functional forward (split once, merge inside jit)."""
    graphdef, state = nnx.split(model)
    pos = positions_from_mask(jnp.asarray(mask))
    fn = jax.jit(lambda s, t, p, m: nnx.merge(graphdef, s)(t, p, m)[0])
    return np.asarray(fn(state, jnp.asarray(tokens), pos, jnp.asarray(mask)))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (B, T))
    mask = np.ones((B, T), bool)
    mask[0, :4] = False  # left padding
    mask[1, :1] = False
    return tokens, mask


def _max_err(a, b, mask):
    return float(np.max(np.abs(a - b)[mask]))


# --- errors (no torch needed) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_tensors():
    cfg = PRESETS["tiny-llama"]
    return cfg, hf.hf_config_dict(cfg), hf.to_hf_tensors(Transformer(cfg, rngs=nnx.Rngs(0)), cfg)


def test_unsupported_architecture_is_named(tiny_llama_tensors):
    _, config, tensors = tiny_llama_tensors
    with pytest.raises(ValueError, match=r"BertForMaskedLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        hf.from_hf(dict(config, architectures=["BertForMaskedLM"]), tensors)


def test_missing_tensor_is_named(tiny_llama_tensors):
    _, config, tensors = tiny_llama_tensors
    name = "model.layers.1.self_attn.k_proj.weight"
    partial = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        hf.from_hf(config, partial)


def test_shape_mismatch_is_named(tiny_llama_tensors):
    _, config, tensors = tiny_llama_tensors
    name = "model.layers.0.mlp.up_proj.weight"
    bad = dict(tensors, **{name: tensors[name].T})
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(64, 192\); expected \(192, 64\)"):
        hf.from_hf(config, bad)
    # A config that disagrees with the weights also names the first offending tensor.
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        hf.from_hf(dict(config, vocab_size=500), tensors)


def test_from_hf_inverts_to_hf_tensors(tiny_llama_tensors, tmp_path):
    cfg, _, tensors = tiny_llama_tensors
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hf.save_pretrained(model, cfg, tmp_path, extra_config={"eos_token_id": 2})
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 2
    cfg2, loaded = hf.load_pretrained(tmp_path)
    assert cfg2 == cfg
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(model)),
                                nnx.to_flat_state(nnx.state(loaded))):
        assert pa == pb
        np.testing.assert_array_equal(a[...], b[...])
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path / "nope")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)


def test_bf16_checkpoint_loads_as_f32(tiny_llama_tensors, tmp_path):
    """Released checkpoints are often bf16: they load, upcast exactly, into f32 parameters."""
    from safetensors.numpy import save_file
    cfg, config, tensors = tiny_llama_tensors
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
    save_file(bf16, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, model = hf.load_pretrained(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    assert model.blocks[0].mlp.down[...].dtype == jnp.float32
    np.testing.assert_array_equal(model.blocks[0].mlp.down[...],
                                  bf16[name].astype(np.float32).T)


def test_gpt2_keys_without_transformer_prefix():
    cfg = PRESETS["tiny"]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tensors = {k.removeprefix("transformer."): v for k, v in hf.to_hf_tensors(model, cfg).items()}
    tensors["h.0.attn.bias"] = np.zeros((1, 1, 4, 4), np.float32)  # old causal-mask buffer
    _, loaded = hf.from_hf(hf.hf_config_dict(cfg), tensors)
    np.testing.assert_array_equal(loaded.blocks[1].attn.qkv[...], model.blocks[1].attn.qkv[...])


# --- parity with transformers -------------------------------------------------------------------

def _hf_models():
    """Tiny random HF models of the three supported architectures (config, tied embeddings?)."""
    import transformers
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, **common)
    return {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_positions=64, n_embd=64, n_layer=2, n_head=4, **common)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            rope_theta=5000.0, tie_word_embeddings=False, **llama)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            rope_theta=10000.0, tie_word_embeddings=True, **llama)),
    }


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory, batch):
    """Each HF model randomised (biases and norm scales too), saved, with its torch logits."""
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0")
    torch.manual_seed(0)
    tokens, mask = batch
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = {}
    for name, model in _hf_models().items():
        model.eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                is_norm = p.ndim == 1 and ("ln" in pname or "norm" in pname) and "bias" not in pname
                p.copy_((1.0 if is_norm else 0.0) + 0.2 * torch.randn_like(p))
            logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask).long(),
                           position_ids=torch.tensor(position_ids)).logits.numpy()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        sharded = tmp_path_factory.mktemp(name + "_sharded")
        model.save_pretrained(sharded, max_shard_size="40KB")
        out[name] = (model, path, sharded, logits)
    return out


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_logits_match_transformers_with_left_padding(hf_saved, batch, name):
    tokens, mask = batch
    _, path, _, want = hf_saved[name]
    cfg, model = hf.load_pretrained(path)
    assert cfg.family == ("gpt2" if name == "gpt2" else "llama")
    assert cfg.qkv_bias == (name == "qwen2") and cfg.tie_embeddings == (name != "llama")
    assert float(np.abs(want[mask]).std()) > 0.1  # logits far from trivially small
    assert _max_err(_forward(model, tokens, mask), want, mask) < 1e-4


@pytest.mark.torch
def test_sharded_checkpoint_loads(hf_saved, batch):
    tokens, mask = batch
    _, _, sharded, want = hf_saved["llama"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, model = hf.load_pretrained(sharded)
    assert _max_err(_forward(model, tokens, mask), want, mask) < 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_save_pretrained_round_trips_through_transformers(hf_saved, batch, tmp_path, name):
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0")
    import transformers
    tokens, mask = batch
    _, path, _, _ = hf_saved[name]
    cfg, model = hf.load_pretrained(path)
    # Move away from the HF weights so the round trip cannot pass by reading the original files.
    model.blocks[0].mlp.down[...] = model.blocks[0].mlp.down[...] * 1.5
    ours = _forward(model, tokens, mask)
    hf.save_pretrained(model, cfg, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == hf.architecture(hf.hf_config_dict(cfg))
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask).long(),
                          position_ids=torch.tensor(position_ids)).logits.numpy()
    assert _max_err(ours, theirs, mask) < 1e-4
