"""Checkpoints: the only module that imports orbax.

A checkpoint holds one pytree of arrays (params, optimiser state, PRNG key, KL-controller state, …)
and one JSON document (step, data-iterator state, config, anything small). Typed PRNG keys are
stored
as their raw key data and rebuilt on restore, so a resumed run draws the same numbers as an
uninterrupted one.

Start-up order (big_vision): **resume** from the newest checkpoint in the run's own folder, else
**init-from** another run's final checkpoint (e.g. PPO starting from the SFT policy), else
**scratch**.

Example::

    ckpt = Checkpointer(workdir / "ckpt", max_to_keep=2)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state)
    ...
    ckpt.save(step, state, {"step": step, "data": loader_state})
    ckpt.close()
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_KEY_TAG = "__prng_key_impl__"


def _is_prng_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode_keys(tree):
    """Typed PRNG keys -> {'data': uint32 array, tag: impl name} (orbax stores plain arrays
    only)."""

    def enc(x):
        if _is_prng_key(x):
            return {"data": jax.random.key_data(x), _KEY_TAG: np.asarray(0)}
        return x

    return jax.tree.map(enc, tree, is_leaf=_is_prng_key)


def _decode_keys(tree, template):
    """Inverse of :func:`_encode_keys`, guided by the (abstract) template's key leaves."""

    def dec(t, x):
        if _is_prng_key(t) or isinstance(t, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
                t.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(t) if _is_prng_key(t) else None
            return jax.random.wrap_key_data(x["data"], impl=impl)
        return x

    return jax.tree.map(dec, template, tree, is_leaf=_is_prng_key)


def _abstract(tree):
    def ab(x):
        if isinstance(x, (jax.Array, np.ndarray)):
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x

    return jax.tree.map(ab, tree)


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for (state, metadata) pairs."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
        """Writes ``state`` (a pytree of arrays) and ``metadata`` (JSON-able) at ``step``."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_encode_keys(state)),
            meta=ocp.args.JsonSave(metadata or {})))
        self._mngr.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the state at ``step`` (newest by default) into ``template``'s structure.

        ``template`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (shardings are honoured).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = _abstract(_encode_keys(_concrete_keys(template)))
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return _decode_keys(out["state"], template), dict(out["meta"] or {})

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _concrete_keys(template):
    """Abstract key leaves become concrete dummy keys so they can be encoded like real ones."""

    def conc(t):
        is_key = isinstance(t, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
            t.dtype, jax.dtypes.prng_key)
        if is_key:
            return jax.random.key(0)
        return t

    return jax.tree.map(conc, template)


def load_state(directory: str | os.PathLike, template: Any,
               step: int | None = None) -> tuple[Any, dict]:
    """One-shot restore (e.g. init-from: PPO reading the SFT run's final checkpoint)."""
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(template, step)
