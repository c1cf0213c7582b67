"""Fixtures for the data tests: a tiny trained BPE and writers for files in each raw format."""
import json

import pytest

CORPUS = [
    "This movie was great fun, I loved every minute of it.",
    "A terrible film. The plot made no sense and the acting was wooden.",
    "SUBREDDIT: r/relationships TITLE: help POST: my friend forgot my birthday TL;DR:",
    "Human: what is the capital of France? Assistant: Paris is the capital of France.",
    "héllo wörld, naïve café — “quotes” 日本語",
]


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE with a dedicated pad token (so padding and EOS are distinguishable)."""
    from rlhf_jax.data.tokenizers import train_bpe
    return train_bpe(CORPUS * 3, vocab_size=400, pad_token="<pad>")


def write_jsonl(path, objs):
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n")
    return path
