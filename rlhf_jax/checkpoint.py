"""Checkpoints: the only module that imports orbax.

A checkpoint holds one pytree of arrays (params, optimiser state, PRNG key, KL-controller state, …)
and one JSON document (step, data-iterator state, the run's fingerprint, anything small). Typed PRNG
keys are stored as their raw key data and rebuilt on restore, so a resumed run draws the same
numbers as an uninterrupted one.

Writes are atomic: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` when complete, so a run killed while saving leaves only that temporary folder
(:meth:`Checkpointer.incomplete` lists it; the next save of that step replaces it). Saving over an
existing step replaces it (orbax alone would silently keep the old one).

The digests (:func:`tree_digest`, :func:`files_digest`, :func:`text_digest`) identify a run's
inputs by content; :class:`rlhf_jax.loop.TrainLoop` stores them with every checkpoint.

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

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

_KEY_TAG = "__prng_key_impl__"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


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
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for (state, metadata) pairs.

    In a multi-process run every process calls ``save``/``restore`` with the same global arrays
    (orbax writes each process's shards and coordinates the processes), unless ``local``: then
    this process reads or writes alone (model bundles, which process 0 writes from host arrays
    and every process reads whole).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, local: bool = False):
        self.directory = Path(directory).absolute()
        if jax.process_count() > 1:
            _use_coordination_barriers()
        mp, create = ocp.options.MultiprocessingOptions(), True
        if local and jax.process_count() > 1:
            me = jax.process_index()
            mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                    barrier_sync_key_prefix=f"local{me}")
            create = False  # orbax leaves the folder to us when only some processes take part
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                 enable_async_checkpointing=False,
                                                 multiprocessing_options=mp))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step, oldest first."""
        return sorted(self._mngr.all_steps())

    def incomplete(self) -> list[Path]:
        """Folders of saves that never finished (a run killed while writing a checkpoint)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _TMP_SUFFIX in p.name)

    def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
        """Writes ``state`` (a pytree of arrays) and ``metadata`` (JSON-able) at ``step``.

        An existing checkpoint at ``step`` is replaced (deleted first; the write itself is
        atomic). Saving a step older than the newest one is allowed.

        Raises:
          RuntimeError: orbax did not write the step (the save is never skipped silently).
        """
        if step in self._mngr.all_steps():
            self._mngr.delete(step)
        saved = self._mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_encode_keys(state)),
            meta=ocp.args.JsonSave(metadata or {})))
        self._mngr.wait_until_finished()
        if not saved or step not in self._mngr.all_steps():
            raise RuntimeError(f"{self.directory}: the checkpoint of step {step} was not written "
                               f"(orbax skipped the save; steps present: {self.all_steps()})")

    def delete(self, step: int) -> None:
        self._mngr.delete(step)

    def restore_meta(self, step: int) -> dict:
        """Only the JSON document saved with ``step`` (cheap: no arrays are read)."""
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

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


def _use_coordination_barriers() -> None:
    """Orbax's barriers between processes wait on the ``jax.distributed`` coordination service
    instead of a device collective (whose CPU/gloo set-up gives up when processes arrive more than
    30 s apart, e.g. one still writing a bundle on a loaded machine)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` through a hidden temporary sibling renamed over it, so a
    process killed while writing leaves the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def tree_digest(tree: Any) -> str:
    """A content hash (16 hex digits of sha256) of a pytree of arrays: every leaf's path, dtype,
    shape and bytes. Equal trees give equal digests on any machine; typed PRNG keys hash by their
    key data."""
    h = hashlib.sha256()
    host = jax.device_get(_encode_keys(tree))
    for path, leaf in jax.tree_util.tree_leaves_with_path(host):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def files_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """A content hash of files (sorted; each named relative to ``root`` or by its base name)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update((str(p.relative_to(root)) if root is not None else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def text_digest(texts: Iterable[str]) -> str:
    """A content hash of a sequence of strings (order matters)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]
