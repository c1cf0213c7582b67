"""A chat task on IMDB: a chat model is asked for a short movie review that begins with the
opening of a real review, and writes the rest.

Every example is one IMDB review (the splits of :class:`~rlhf_jax.tasks.imdb.ImdbTask`) cut after
its first ``opening_words`` words. The prompt is a conversation in SmolLM2's chat template
(ChatML) whose assistant turn is already started with the opening::

    <|im_start|>system
    You write short movie reviews.<|im_end|>
    <|im_start|>user
    Write a short movie review that begins: "I rented this movie because"<|im_end|>
    <|im_start|>assistant
    I rented this movie because

and the response is the rest of the review, cut after its last whole sentence within
``response_words`` words (a short review that ends where a sentence ends; a review with no
sentence end in reach gives no demonstration). SFT target: the response tokens and the
``<|im_end|>`` that closes the turn, never the prompt. Gold: the IMDB sentiment scorer of
:class:`ImdbTask`, applied to the response only, as in the IMDB task.

The template is rendered here (:func:`chat_prompt`), so the task needs no tokenizer; it is the
string SmolLM2's own template renders (a test compares them). :data:`CHAT_TEMPLATE` is that
template, for tokenizers trained without one (:func:`chat_bpe`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from rlhf_jax.data.tfds_utils import decode
from rlhf_jax.tasks.imdb import ImdbTask

SYSTEM = "You write short movie reviews."
"""The system turn (shorter than SmolLM2's default one: fewer prompt tokens to process)."""
INSTRUCTION = 'Write a short movie review that begins: "{opening}"'
"""The user turn; ``{opening}`` is the review's first words."""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: SmolLM2-135M-Instruct's chat template (ChatML with a default system turn), as its GGUF holds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
_SPACE = re.compile(r"\s+")


def messages(opening: str) -> list[dict]:
    """The conversation that asks for a review beginning with ``opening``."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": INSTRUCTION.format(opening=opening)}]


def chat_prompt(opening: str) -> str:
    """The rendered prompt: :func:`messages` in ChatML, the assistant turn opened and begun with
    ``opening``."""
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages(opening))
    return f"{turns}{IM_START}assistant\n{opening}"


def split_review(text: str, opening_words: int) -> tuple[str, str]:
    """``(opening, rest)``: the first ``opening_words`` words of a review (whitespace, line breaks
    included, collapsed to single spaces) and the rest, with its leading space (so ``opening +
    rest`` is the whole review)."""
    words = _SPACE.sub(" ", text).strip().split(" ")
    opening = " ".join(words[:opening_words])
    rest = " ".join(words[opening_words:])
    return opening, (" " + rest if rest else "")


def short_response(rest: str, max_words: int) -> str:
    """``rest`` cut after its last sentence end (``.``, ``!``, ``?``, optionally followed by a
    quote or bracket) within ``max_words`` words; all of it if it is that short; ``""`` when no
    sentence ends in reach."""
    words = rest.split()
    if len(words) <= max_words:
        return rest
    ends = [i for i, w in enumerate(words[:max_words]) if re.search(r"[.!?][\"')]*$", w)]
    return " " + " ".join(words[:ends[-1] + 1]) if ends else ""


class _Mapped(Sequence):
    """A random-access view of ``source`` with ``fn`` applied to each decoded example."""

    def __init__(self, source, fn: Callable[[Mapping[str, Any]], dict]):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.fn(decode(self.source[int(i)]))


class ChatImdbTask(ImdbTask):
    """IMDB reviews as chat turns (module docstring); ``data_dir`` is IMDB's TFDS folder.

    Records: ``prompt_source`` gives ``{"text": chat prompt}``; ``sft_source`` gives
    ``{"prompt", "response", "text" = prompt + response}`` (a response-only SFT reads
    ``prompt``/``response`` with :func:`rlhf_jax.data.batching.sft_batches`).
    """
    name = "chat-imdb"
    prompt_keep = "last"

    def __init__(self, data_dir: str | None = None, opening_words: int = 6,
                 response_words: int = 24):
        super().__init__(data_dir)
        for name, v in (("opening_words", opening_words), ("response_words", response_words)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        self.opening_words, self.response_words = opening_words, response_words

    def record(self, review: str) -> dict:
        """``{"prompt", "response", "text"}`` of one review (``response`` may be empty: see the
        module docstring)."""
        opening, rest = split_review(review, self.opening_words)
        rest = short_response(rest, self.response_words)
        prompt = chat_prompt(opening)
        return {"prompt": prompt, "response": rest, "text": prompt + rest}

    def sft_source(self, split: str, limit: int | None = None):
        if limit is None:
            return _Mapped(self._split("sft", split), lambda ex: self.record(ex["text"]))
        return [self.record(t) for t in self.texts(self._split("sft", split), limit)]

    def prompt_source(self, split: str):
        return _Mapped(self._split("prompt", split),
                       lambda ex: {"text": self.record(ex["text"])["prompt"]})


def chat_bpe(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` with ChatML's special tokens and
    :data:`CHAT_TEMPLATE`: ``<|im_end|>`` is its EOS (and pad), ``<|im_start|>`` its BOS, as in
    SmolLM2. For small models trained from scratch on this task (tests, the ``tiny`` preset)."""
    from rlhf_jax.data.tokenizers import EOS_TOKEN, Tokenizer, train_bpe

    tok = train_bpe(texts, vocab_size, special_tokens=(EOS_TOKEN, IM_START, IM_END))
    return Tokenizer(tok.backend, eos_token=IM_END, bos_token=IM_START,
                     chat_template=CHAT_TEMPLATE)
