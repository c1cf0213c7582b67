"""Pieces the experiment files share: command-line parsing, model presets, LM initialisation.

Kept deliberately small; anything that becomes library-grade moves to ``rlhf_jax``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import sys
from typing import TypeVar

from flax import nnx
import jax
import numpy as np

from rlhf_jax.checkpoint import write_text_atomic
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
    """``--preset NAME`` picks the defaults; every other flag overrides one field (tyro).

    A process started by ``python -m rlhf_jax.launch`` (or on a cluster) joins the others here,
    before any other JAX call."""
    import tyro

    from rlhf_jax import parallel
    parallel.initialize_distributed()
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
    trained here (``tokenizer_spec == "bpe"``) is cached in ``workdir/tokenizer`` (written all at
    once, with a digest of the texts and the vocabulary size it was trained for) so a resumed run
    uses the identical vocabulary; a cache trained for other texts or another size is refused.
    """
    from rlhf_jax.checkpoint import text_digest
    from rlhf_jax.data import tokenizers
    from rlhf_jax.loop import RunMismatchError
    from rlhf_jax.runs import load_bundle, writing_dir

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
        source = {"texts": text_digest(texts), "vocab_size": vocab_size}
        if (tok_dir / "tokenizer.json").exists():
            cached = json.loads((tok_dir / "source.json").read_text()) \
                if (tok_dir / "source.json").exists() else source
            if cached != source:
                raise RunMismatchError(
                    f"{tok_dir} holds a tokenizer trained for another run ({cached} → {source}); "
                    f"to start fresh, delete {workdir} or choose another --workdir")
            tok = tokenizers.Tokenizer.load(tok_dir)
        else:
            tok = tokenizers.train_bpe(texts, vocab_size)  # deterministic: same on every process
        if jax.process_index() == 0 and not (tok_dir / "tokenizer.json").exists():
            with writing_dir(tok_dir) as tmp:  # all or nothing: a kill leaves no half tokenizer
                tok.save(tmp)
                (tmp / "source.json").write_text(json.dumps(source) + "\n")
    else:
        tok = tokenizers.load_tokenizer(tokenizer_spec)
    if model not in MODELS:
        raise ValueError(f"unknown model preset {model!r}; choose one of {sorted(MODELS)}")
    cfg = MODELS[model].replace(vocab_size=tok.vocab_size, compute_dtype=compute_dtype)
    return Transformer(cfg, rngs=nnx.Rngs(params=seed)), cfg, tok


# ------------------------------------------------------------------------------------------------
# Config validation: every stage checks its config before loading data or compiling, and reports
# every bad field at once.

def positive(cfg, *fields: str) -> list[str]:
    return [f"{f}={getattr(cfg, f)!r}: expected a positive integer" for f in fields
            if not isinstance(getattr(cfg, f), int) or getattr(cfg, f) < 1]


def finite_positive(cfg, *fields: str) -> list[str]:
    return [f"{f}={getattr(cfg, f)!r}: expected a finite positive number" for f in fields
            if not math.isfinite(getattr(cfg, f)) or getattr(cfg, f) <= 0]


def one_of(cfg, field: str, choices) -> list[str]:
    v = getattr(cfg, field)
    return [] if v in choices else [f"{field}={v!r}: expected one of {tuple(choices)}"]


def check(cfg, errors: list[str]) -> None:
    """Raises one ``ValueError`` listing every invalid field of a stage's config."""
    if errors:
        raise ValueError(f"invalid {type(cfg).__module__.split('.')[-1]} config:\n  " +
                         "\n  ".join(errors))


_GOLD: dict = {}


def load_gold(path: str | None):
    """The gold scorer at ``path``, or None where there is none. Loaded once per file (path, size
    and modification time): PPO's oracle reward and its held-out gold share one load."""
    if not (path and Path(path).exists()):
        return None
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _GOLD:
        from rlhf_jax.labelers import GoldSentimentScorer
        _GOLD.clear()  # one scorer held at a time
        _GOLD[key] = GoldSentimentScorer.load(path)
    return _GOLD[key]


def remember_memory(workdir, name: str, report: dict | None) -> dict | None:
    """A compiled step's memory report (``parallel.compile_with_memory``), kept in
    ``<workdir>/memory.json`` when it is first made, so a run resumed with no step left still
    reports it. ``report=None`` reads it back (None if never made)."""
    path = Path(workdir) / "memory.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if report is None:
        return saved.get(name)
    if jax.process_index() == 0 and saved.get(name) != report:
        write_text_atomic(path, json.dumps({**saved, name: report}, indent=1))
    return report
