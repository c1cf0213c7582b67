"""Run folders shared by the experiments: model bundles, the start-up order, summaries.

A stage's output folder holds ``ckpt/`` (orbax, for resuming), ``metrics.jsonl``, ``tensorboard/``,
``summary.json``, plots, and — once finished — ``final/``: a *model bundle* that the next stage
initialises from::

    final/model.json      {"kind": "lm"|"scalar", "config": ModelConfig fields, "head_init": ...}
    final/params/         orbax checkpoint of the parameters (a pure dict of arrays)
    final/tokenizer/      the tokenizer (rlhf_jax.data.tokenizers.Tokenizer.save)
    final/hf/             optional: the Hugging Face export (PPO's policy)

Start-up order (big_vision): resume from ``ckpt/`` > init-from a previous stage's ``final/`` >
scratch.

**All or nothing.** A bundle (with its Hugging Face export) is written into a temporary sibling
folder and renamed into place (:func:`writing_dir`), so ``final/`` is always one complete bundle of
one run, never a mix of an old and a new one. ``summary.json`` is written atomically and last: it
is the "finished" marker (the pipeline skips a stage that has one), and
:class:`rlhf_jax.loop.TrainLoop` removes it when a run (re)starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
import shutil
from typing import Any, Iterator, Mapping, Sequence

from flax import nnx
import jax

from rlhf_jax.checkpoint import Checkpointer, files_digest, tree_digest, write_text_atomic
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


@contextlib.contextmanager
def writing_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling of ``directory`` to write into; when the block ends
    without an error it replaces ``directory`` (renames), otherwise it is removed and
    ``directory`` is left as it was.

    Leftovers of a process killed while writing (``.<name>.tmp``, ``.<name>.old``) are removed.
    Replacing an existing folder takes two renames (old out, new in); a kill between them leaves
    no ``directory`` at all (and a ``.<name>.old``), never a mix of the two.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    old = directory.with_name(f".{directory.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def save_bundle(directory: str | os.PathLike, model: nnx.Module, cfg: ModelConfig, tokenizer,
                kind: str, head_init: str | None = None, extra: dict | None = None,
                hf_config: dict | None = None) -> Path:
    """Writes a model bundle (see the module docstring) and returns its folder.

    Everything is written into a temporary sibling folder that then replaces ``directory``
    (:func:`writing_dir`): the bundle is complete and of this call, or the old one is untouched.

    Args:
      hf_config: also export ``directory/hf`` in Hugging Face format (``config.json``,
        ``model.safetensors``, the tokenizer) with these keys merged into ``config.json`` (e.g.
        ``eos_token_id``); a model family without an HF mapping skips the export with a message.
    """
    directory = Path(directory)
    if jax.process_index() != 0:  # multi-process: process 0 writes, from the same host values
        return directory
    with writing_dir(directory) as tmp:
        with Checkpointer(tmp / "params", max_to_keep=1, local=True) as ckpt:
            ckpt.save(0, params_of(model))
        tokenizer.save(tmp / "tokenizer")
        if hf_config is not None:
            try:
                from rlhf_jax.models.hf import save_pretrained
                save_pretrained(model, cfg, tmp / "hf", extra_config=hf_config)
                tokenizer.save(tmp / "hf")  # tokenizer.json + tokenizer_config.json
            except (ImportError, ValueError) as e:  # a convenience; the bundle is the result
                shutil.rmtree(tmp / "hf", ignore_errors=True)
                print(f"[{directory}] Hugging Face export skipped: {e}")
        meta = {"kind": kind, "config": dataclasses.asdict(cfg), "head_init": head_init,
                **(extra or {})}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    return directory


def bundle_digest(directory: str | os.PathLike) -> str:
    """A content hash of a bundle: its parameters' values (not the orbax files, which carry
    timestamps) and its tokenizer files; the same model saved twice has the same digest."""
    directory = Path(directory)
    model, _, _, _ = load_bundle(directory)
    tok_files = [p for p in (directory / "tokenizer").rglob("*") if p.is_file()]
    return tree_digest(params_of(model)) + files_digest(tok_files, directory)[:8]


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
    with Checkpointer(directory / "params", max_to_keep=1, local=True) as ckpt:
        params, _ = ckpt.restore(template)
    load_params_into(model, params)
    kind = kind or stored
    if (stored, kind) == ("lm", "scalar"):
        model = ScalarModel.from_lm(model, head_init="reward", rngs=nnx.Rngs(params=0))
    elif stored != kind:
        raise ValueError(f"{directory}: a {stored!r} bundle cannot be loaded as {kind!r}")
    return model, cfg, Tokenizer.load(directory / "tokenizer"), meta


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Writes ``workdir/summary.json`` atomically (a temporary file renamed over it). A stage
    writes it last, after every other output: it marks the stage as finished. In a
    multi-process run only process 0 writes."""
    path = Path(workdir) / "summary.json"
    if jax.process_index() != 0:
        return path
    return write_text_atomic(path, json.dumps(jax.tree.map(_plain, summary), indent=2) + "\n")


def md_cell(text: str) -> str:
    """``text`` as one Markdown table cell: ``|`` escaped, newlines as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_samples(path: str | os.PathLike, title: str, prompts: Sequence[str],
                  responses: Mapping[str, Sequence[str]], gold=None) -> Path:
    """A Markdown table of several policies' responses to the same prompts (``samples.md``).

    Args:
      title: the heading.
      prompts: ``N`` prompt texts.
      responses: ``{policy name: N response texts}``, one pair of columns each.
      gold: a scorer with ``prob(texts)`` (the gold P(positive) column), or None (``nan``).
    """
    if jax.process_index() != 0:  # multi-process: process 0 writes
        return Path(path)

    cols = {name: (list(texts), gold.prob(texts) if gold else [float("nan")] * len(texts))
            for name, texts in responses.items()}
    lines = [f"# {title}", "", "Gold = the gold scorer's P(positive) of the response.", "",
             "| prompt | " + " | ".join(f"{md_cell(name)} response | gold" for name in cols) + " |",
             "|---|" + "---|---|" * len(cols)]
    for i, p in enumerate(prompts):
        lines.append(f"| {md_cell(p)} | " + " | ".join(f"{md_cell(t[i])} | {g[i]:.2f}"
                                                       for t, g in cols.values()) + " |")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def read_summary(workdir: str | os.PathLike) -> dict | None:
    path = Path(workdir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _plain(x):
    try:
        return x.item()
    except AttributeError:
        return x
