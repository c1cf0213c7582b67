"""Run folders shared by the experiments: model bundles, the start-up order, summaries.

A stage's output folder holds ``ckpt/`` (orbax, for resuming), ``metrics.jsonl``, ``tensorboard/``,
``summary.json``, plots, and — once finished — ``final/``: a *model bundle* that the next stage
initialises from::

    final/model.json      {"kind": "lm"|"scalar", "config": ModelConfig fields, "head_init": ...}
    final/params/         orbax checkpoint of the parameters (a pure dict of arrays)
    final/tokenizer/      the tokenizer (rlhf_jax.data.tokenizers.Tokenizer.save)

Start-up order (big_vision): resume from ``ckpt/`` > init-from a previous stage's ``final/`` >
scratch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from flax import nnx
import jax

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import Transformer


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a pure nested dict of arrays (what checkpoints store)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params_into(model: nnx.Module, pure: dict) -> nnx.Module:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def build_model(kind: str, cfg: ModelConfig, seed: int = 0, head_init: str = "reward"):
    rngs = nnx.Rngs(params=seed)
    if kind == "lm":
        return Transformer(cfg, rngs=rngs)
    if kind == "scalar":
        return ScalarModel(cfg, head_init=head_init, rngs=rngs)
    raise ValueError(f"model kind {kind!r}; expected 'lm' or 'scalar'")


def save_bundle(directory: str | os.PathLike, model: nnx.Module, cfg: ModelConfig, tokenizer,
                kind: str, head_init: str | None = None, extra: dict | None = None) -> Path:
    """Writes a model bundle (see the module docstring) and returns its folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        ckpt.save(0, params_of(model))
    tokenizer.save(directory / "tokenizer")
    meta = {"kind": kind, "config": dataclasses.asdict(cfg), "head_init": head_init,
            **(extra or {})}
    (directory / "model.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_bundle(directory: str | os.PathLike, kind: str | None = None,
                compute_dtype: str | None = None):
    """Reads a model bundle: ``(model, cfg, tokenizer, meta)``.

    ``kind`` converts where it makes sense: an ``"lm"`` bundle loaded as ``"scalar"`` gives a
    :class:`ScalarModel` whose backbone is the LM (reward model / critic initialised from SFT).
    """
    from rlhf_jax.data.tokenizers import Tokenizer

    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not a finished stage's model bundle "
                                f"(no model.json); run that stage first")
    meta = json.loads(meta_path.read_text())
    cfg = ModelConfig(**meta["config"])
    if compute_dtype:
        cfg = cfg.replace(compute_dtype=compute_dtype)
    stored = meta["kind"]
    model = build_model(stored, cfg, head_init=meta.get("head_init") or "reward")
    template = params_of(model)
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        params, _ = ckpt.restore(template)
    load_params_into(model, params)
    kind = kind or stored
    if (stored, kind) == ("lm", "scalar"):
        model = ScalarModel.from_lm(model, head_init="reward", rngs=nnx.Rngs(params=0))
    elif stored != kind:
        raise ValueError(f"{directory}: a {stored!r} bundle cannot be loaded as {kind!r}")
    return model, cfg, Tokenizer.load(directory / "tokenizer"), meta


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    path = Path(workdir) / "summary.json"
    path.write_text(json.dumps(jax.tree.map(_plain, summary), indent=2) + "\n")
    return path


def read_summary(workdir: str | os.PathLike) -> dict | None:
    path = Path(workdir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _plain(x):
    try:
        return x.item()
    except AttributeError:
        return x
