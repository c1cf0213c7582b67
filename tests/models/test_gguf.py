"""GGUF import: a tiny Llama GGUF written here with gguf.GGUFWriter must read back as the HF tensors
it was made from, Q/K un-permuted exactly; the embedded tokenizer must equal its source."""
import numpy as np
import pytest

from rlhf_jax.data import tokenizers as tk
from rlhf_jax.models import gguf as gg

gguf = pytest.importorskip("gguf")

L, D, N, KV, F = 2, 64, 4, 2, 96
HD = D // N
THETA, EPS = 5000.0, 1e-6
TEXTS = [
    "hello world, hello tokens!", "ünïcödé 🤗 and 12345 digits",
    "<|im_start|>user\nhi<|im_end|>"
]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, written out independently."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape))


@pytest.fixture(scope="module")
def source_tokenizer():
    corpus = ["hello world, hello tokens! the cat sat on the mat."] * 10 + TEXTS * 5
    return tk.train_bpe(corpus, vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>",
                                                                "<|im_end|>"))


@pytest.fixture(scope="module")
def hf_tensors(source_tokenizer):
    rng = np.random.default_rng(0)
    V = source_tokenizer.vocab_size

    def r(*shape):
        return rng.normal(0.0, 0.2, size=shape).astype(np.float32)

    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D),
         "lm_head.weight": r(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(N * HD, D),
                  p + "self_attn.k_proj.weight": r(KV * HD, D),
                  p + "self_attn.v_proj.weight": r(KV * HD, D),
                  p + "self_attn.o_proj.weight": r(D, N * HD),
                  p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
                  p + "mlp.down_proj.weight": r(D, F),
                  p + "input_layernorm.weight": 1 + r(D),
                  p + "post_attention_layernorm.weight": 1 + r(D)})
    return t


GGUF_NAMES = {  # HF block suffix -> GGUF block suffix (llama.cpp's tensor names)
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def to_gguf_tensors(hf):
    """HF names/layout -> GGUF names/layout, as llama.cpp's converter does it."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(L):
        for hf_suffix, g_suffix in GGUF_NAMES.items():
            w = hf[f"model.layers.{i}.{hf_suffix}"]
            if g_suffix == "attn_q.weight":
                w = llama_cpp_permute(w, N)
            elif g_suffix == "attn_k.weight":
                w = llama_cpp_permute(w, KV)
            out[f"blk.{i}.{g_suffix}"] = w
    return out


def write_gguf(path, tensors, tokenizer, *, pre="gpt2", q8_embedding=False):
    data = tokenizer.backend.to_str()
    import json
    model = json.loads(data)["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HD)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(TEMPLATE)
    for name, arr in tensors.items():
        if q8_embedding and name == "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, hf_tensors, source_tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(path, to_gguf_tensors(hf_tensors), source_tokenizer)


def test_config_from_metadata(tiny_gguf, source_tokenizer):
    cfg, _ = gg.read_gguf(tiny_gguf)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    expected = {"vocab_size": source_tokenizer.vocab_size, "hidden_size": D,
                "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": N,
                "num_key_value_heads": KV, "head_dim": HD, "max_position_embeddings": 128,
                "tie_word_embeddings": False}
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rope_theta"] == THETA
    assert cfg["rms_norm_eps"] == pytest.approx(EPS, rel=1e-6)  # stored as float32
    assert cfg["eos_token_id"] == source_tokenizer.token_to_id("<|im_end|>")


def test_tensors_round_trip_exactly(tiny_gguf, hf_tensors):
    _, tensors = gg.read_gguf(tiny_gguf)
    assert set(tensors) == set(hf_tensors)
    for name, want in hf_tensors.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    # The permutation is not the identity, so the equality above really checks its inverse.
    q = hf_tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, N), q)


def test_permutations_are_inverse():
    w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    there = gg.permute_rope_hf_to_gguf(w, 6)
    np.testing.assert_array_equal(gg.permute_rope_gguf_to_hf(there, 6), w)
    np.testing.assert_array_equal(gg.permute_rope_hf_to_gguf(w, 6), llama_cpp_permute(w, 6))
    with pytest.raises(ValueError, match="heads of even size"):
        gg.permute_rope_gguf_to_hf(np.zeros((6 * 3, 2)), 6)


def rope_rotate_half(x, pos, theta):
    """HF Llama RoPE: rotate pairs (i, i + H/2). x [T, H]."""
    h = x.shape[-1]
    inv = theta**(-np.arange(0, h, 2) / h)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rot = np.concatenate([-x[:, h // 2:], x[:, :h // 2]], -1)
    return x * cos + rot * sin


def rope_interleaved(x, pos, theta):
    """llama.cpp RoPE (mode 0): rotate adjacent pairs (2i, 2i + 1). x [T, H]."""
    h = x.shape[-1]
    inv = theta**(-np.arange(0, h, 2) / h)
    ang = pos[:, None] * inv[None, :]
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[:, 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def test_interleaved_rope_on_gguf_rows_equals_rotate_half_on_hf_rows():
    """The reason for the permutation: attention scores agree between the two RoPE conventions."""
    rng = np.random.default_rng(1)
    wq, wk = rng.normal(size=(HD, D)), rng.normal(size=(HD, D))  # one head
    x, pos = rng.normal(size=(5, D)), np.arange(5.0) * 3
    hf_scores = rope_rotate_half(x @ wq.T, pos, THETA) @ rope_rotate_half(x @ wk.T, pos, THETA).T
    gq, gk = gg.permute_rope_hf_to_gguf(wq, 1), gg.permute_rope_hf_to_gguf(wk, 1)
    cpp_scores = rope_interleaved(x @ gq.T, pos, THETA) @ rope_interleaved(x @ gk.T, pos, THETA).T
    np.testing.assert_allclose(cpp_scores, hf_scores, rtol=1e-10, atol=1e-10)
    wrong = rope_interleaved(x @ wq.T, pos, THETA) @ rope_interleaved(x @ wk.T, pos, THETA).T
    assert not np.allclose(wrong, hf_scores, atol=1e-3)


def test_tied_and_quantised_embedding(tmp_path, hf_tensors, source_tokenizer):
    tied = {k: v for k, v in hf_tensors.items() if k != "lm_head.weight"}
    path = write_gguf(tmp_path / "q8.gguf", to_gguf_tensors(tied), source_tokenizer,
                      q8_embedding=True)
    cfg, tensors = gg.read_gguf(path)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    emb, want = tensors["model.embed_tokens.weight"], hf_tensors["model.embed_tokens.weight"]
    assert emb.shape == want.shape and emb.dtype == np.float32
    # Q8_0: blocks of 32 values share a scale d = max|w|/127 stored in float16; error <= d/2 for
    # the rounding + 127 * d * 2^-11 for the float16 scale.
    step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    err = np.abs(emb - want).reshape(-1, 32)
    assert np.all(err <= (0.5 + 127 * 2.0**-11) * step + 1e-7)
    assert np.any(err > 0)  # it really went through the quantiser


def test_missing_tensor_is_named(tmp_path, hf_tensors, source_tokenizer):
    g = to_gguf_tensors(hf_tensors)
    del g["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", g, source_tokenizer)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
        gg.read_gguf(path)


def test_wrong_shape_is_named(tmp_path, hf_tensors, source_tokenizer):
    g = to_gguf_tensors(hf_tensors)
    g["blk.0.attn_k.weight"] = g["blk.0.attn_k.weight"][:HD]
    path = write_gguf(tmp_path / "shape.gguf", g, source_tokenizer)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_k\.weight.*\(16, 64\).*\(32, 64\)"):
        gg.read_gguf(path)


def test_tokenizer_from_gguf_equals_source(tiny_gguf, source_tokenizer):
    tok = tk.from_gguf(tiny_gguf)
    assert tok.vocab_size == source_tokenizer.vocab_size
    assert tok.eos_id == source_tokenizer.token_to_id("<|im_end|>")
    assert tok.bos_id == source_tokenizer.token_to_id("<|im_start|>")
    assert tok.pad_id == source_tokenizer.token_to_id("<|endoftext|>")
    for text in TEXTS:
        assert tok.encode(text) == source_tokenizer.encode(text), text
        assert tok.decode(tok.encode(text), skip_special=False) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt)[0] == tok.bos_id
    assert tok.decode(tok.encode(prompt)) == "user\nhi\nassistant\n"  # specials skipped
    assert tk.load_tokenizer(str(tiny_gguf)).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_smollm_pre_tokenizer_splits_digits(tmp_path, hf_tensors, source_tokenizer):
    path = write_gguf(tmp_path / "smol.gguf", to_gguf_tensors(hf_tensors), source_tokenizer,
                      pre="smollm")
    tok = tk.from_gguf(path)
    ids = tok.encode("year 2024!")
    assert [tok.decode([i]) for i in ids][-5:] == ["2", "0", "2", "4", "!"]
    assert tok.decode(ids) == "year 2024!"
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='llama-bpe'"):
        tk.from_gguf(write_gguf(tmp_path / "l3.gguf", to_gguf_tensors(hf_tensors),
                                source_tokenizer, pre="llama-bpe"))


def test_logits_equal_hf_named_load(tiny_gguf, hf_tensors):
    hf = pytest.importorskip("rlhf_jax.models.hf")
    import jax.numpy as jnp
    cfg, tensors = gg.read_gguf(tiny_gguf)
    mcfg_a, model_a = hf.from_hf(cfg, tensors)
    mcfg_b, model_b = hf.from_hf(cfg, hf_tensors)
    assert mcfg_a == mcfg_b
    assert (mcfg_a.num_kv_heads, mcfg_a.rope_theta) == (KV, THETA)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 7)),
                         jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    mask = jnp.ones((2, 7), bool)
    la = model_a(tokens, positions, mask)[0]
    lb = model_b(tokens, positions, mask)[0]
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert np.isfinite(np.asarray(la)).all()


@pytest.mark.slow
def test_smollm2_says_paris():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, greedy: 'What is the capital of France?'."""
    from rlhf_jax import chat
    path = gg.smollm2_path()
    tok = tk.from_gguf(path)
    assert tok.chat_template and tok.eos_id == tok.token_to_id("<|im_end|>")
    for text in TEXTS + ["Numbers 1234 split; tabs\tand  spaces"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text
    reply = chat.chat(["What is the capital of France?"], model="smollm2", max_new_tokens=24)[0]
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    """Our Flax port of the dequantised GGUF == transformers' LlamaForCausalLM, same tensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from rlhf_jax import chat
    cfg, tensors = gg.read_gguf(gg.smollm2_path())
    _, lm, tok = chat.load("smollm2")
    ids = tok.encode("The movie was a delight from start to finish, and the score 10/10.")
    t = len(ids)
    ours = np.asarray(lm(jnp.asarray([ids], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
                         jnp.ones((1, t), bool))[0][0])
    ref_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.items() if not k.startswith("_")})).eval()
    result = ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                       strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys  # tied
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
