"""Pieces the experiment files share: command-line parsing, model presets, LM initialisation, data.

Kept deliberately small; anything that becomes library-grade moves to ``rlhf_jax``.
"""
from __future__ import annotations

from pathlib import Path
import sys
from typing import TypeVar

from flax import nnx
import jax
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.config import PRESETS as MODEL_PRESETS
from rlhf_jax.models.transformer import Transformer

C = TypeVar("C")

# Architectures trained from scratch on the embedded task (vocab_size is set from the tokenizer).
MODELS: dict[str, ModelConfig] = {
    **MODEL_PRESETS,
    "imdb-small": ModelConfig(family="gpt2", vocab_size=4096, num_layers=4, d_model=192,
                              num_heads=4, num_kv_heads=4, mlp_dim=768, max_seq_len=128),
    "tiny-imdb": ModelConfig(family="gpt2", vocab_size=512, num_layers=2, d_model=64,
                             num_heads=4, num_kv_heads=4, mlp_dim=256, max_seq_len=128),
}


def parse(config_cls: type[C], presets: dict[str, C], argv: list[str] | None = None) -> C:
    """``--preset NAME`` picks the defaults; every other flag overrides one field (tyro)."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    name = "default"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--preset="):
            name = a.split("=", 1)[1]
            del argv[i]
            break
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return tyro.cli(config_cls, default=presets[name], args=argv,
                    description=sys.modules[config_cls.__module__].__doc__)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_lm(model: str, init_from: str | None, tokenizer_spec: str, vocab_size: int,
            texts: list[str], compute_dtype: str, seed: int, workdir: Path):
    """The LM a stage starts from: ``(model, cfg, tokenizer)``.

    ``init_from`` (weights) wins over ``model`` (an architecture trained from scratch). A tokenizer
    trained here (``tokenizer_spec == "bpe"``) is cached in ``workdir/tokenizer`` so a resumed run
    uses the identical vocabulary.
    """
    from rlhf_jax.data import tokenizers
    from rlhf_jax.runs import load_bundle

    if init_from:
        if (Path(init_from) / "model.json").exists():
            lm, cfg, tok, _ = load_bundle(init_from, kind="lm", compute_dtype=compute_dtype)
            return lm, cfg, tok
        from rlhf_jax.models import hf
        path = init_from
        if init_from == "smollm2":
            from rlhf_jax.models.gguf import smollm2_path
            path = str(smollm2_path())
        cfg, lm = hf.load_pretrained(path, compute_dtype=compute_dtype)
        return lm, cfg, tokenizers.load_tokenizer(path if init_from != "smollm2" else "smollm2")

    tok_dir = workdir / "tokenizer"
    if tokenizer_spec == "bpe":
        if (tok_dir / "tokenizer.json").exists():
            tok = tokenizers.Tokenizer.load(tok_dir)
        else:
            tok = tokenizers.train_bpe(texts, vocab_size)
            tok.save(tok_dir)
    else:
        tok = tokenizers.load_tokenizer(tokenizer_spec)
    if model not in MODELS:
        raise ValueError(f"unknown model preset {model!r}; choose one of {sorted(MODELS)}")
    cfg = MODELS[model].replace(vocab_size=tok.vocab_size, compute_dtype=compute_dtype)
    return Transformer(cfg, rngs=nnx.Rngs(params=seed)), cfg, tok


# ------------------------------------------------------------------------------------------------
# The embedded default task's data: IMDB reviews (rlhf_jax.data.imdb, built offline on first use).

def imdb_sources(data_dir: str | None = None) -> dict:
    """``{"lm", "prompts", "eval"}`` TFDS data sources of the offline IMDB dataset."""
    from rlhf_jax.data.imdb import build_imdb
    return build_imdb(data_dir)[1]


def spread(n_total: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n_total)`` (all when None).

    The built splits keep the CSV's order, which is sorted by label: a prefix would be one-sided.
    """
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, limit).round().astype(int)


def texts_of(source, limit: int | None = None) -> list[str]:
    from rlhf_jax.data.tfds_utils import decode
    return [decode(source[int(i)])["text"] for i in spread(len(source), limit)]


def labels_of(source, limit: int | None = None) -> np.ndarray:
    from rlhf_jax.data.tfds_utils import decode
    return np.array([int(decode(source[int(i)])["label"]) for i in spread(len(source), limit)])


class StatefulBatches:
    """An endless iterator over :class:`rlhf_jax.data.batching.Batches` whose position can be
    saved in a checkpoint's JSON metadata and restored (a resumed run continues at the same
    example)."""

    def __init__(self, batches):
        from rlhf_jax.data import batching
        self._batching = batching
        self.batches = batches
        self._it = iter(batches)

    def next(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._batching.iterator_state(self._it)

    def set_state(self, state: dict) -> None:
        self._it = self._batching.iterate(self.batches, state)


def prompt_set(source, tokenizer, query_len: int, n: int | None = None):
    """``n`` prompts spread over a split, in a fixed order: ``(tokens [N,Tq], mask, texts)``."""
    from rlhf_jax.data import batching
    b = batching.prompt_batches([source[int(i)] for i in spread(len(source), n)], tokenizer,
                                max_len=query_len,
                                cfg=batching.LoaderConfig(batch_size=1, shuffle=False,
                                                          drop_remainder=False,
                                                          shard_by_process=False),
                                keep="first")
    rows = list(b)
    return (np.concatenate([r["tokens"] for r in rows]), np.concatenate([r["mask"] for r in rows]),
            [str(r["text"][0]) for r in rows])
