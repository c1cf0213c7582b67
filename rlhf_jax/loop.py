"""The training-loop skeleton every stage shares: start-up order, checkpoints, metrics, progress,
and the run's guarantees (same-run resume, finite values, a writable output folder).

A stage writes into its own ``workdir``::

    fp = fingerprint(cfg, exclude=("steps",), data={"texts": text_digest(texts)})
    loop = TrainLoop("sft", workdir, total_steps=cfg.steps, checkpoint_every=200, log_every=20,
                     show=("lm/loss",), fingerprint=fp)
    state = loop.restore(state, data=loader)       # resume > the state given (init-from/scratch)
    for step in loop.steps():
        state, metrics = train_step(state, next_batch(loader))
        loop.check_finite(step, metrics, ("lm/loss", "lm/grad_norm"))   # NonFiniteError
        loop.log(step, metrics)                    # every log_every steps and at the last
        loop.end_step(step, state, data=loader)    # progress bar; periodic orbax checkpoint
    loop.close()
    if not loop.finished: ...                      # stop_after ended the run early; re-run resumes

Start-up order (big_vision): **resume** from the newest checkpoint in ``workdir/ckpt`` (the
parameters, optimizer state, PRNG key and data-iterator position: a resumed run continues
bit-identically), else the state the caller built (**init-from** a previous stage's bundle, or
**scratch**). Metrics go to ``metrics.jsonl``, TensorBoard and, optionally, Weights & Biases
(:class:`rlhf_jax.metrics.MetricsWriter`); rows a killed run wrote after its last checkpoint are
dropped on resume, so every step appears once.

Guarantees:

* **Same run only.** Every checkpoint stores the run's *fingerprint* (:func:`fingerprint`: the
  config fields that shape the results and content hashes of the inputs). A checkpoint with another
  fingerprint is never resumed: :class:`RunMismatchError` names each changed field (old → new) and
  how to start fresh. The step count (``steps``/``iterations``) is the one field that may change:
  a longer run continues from the last checkpoint.
* **Kills.** Checkpoint writes are atomic; a save a kill interrupted is removed and reported, and a
  checkpoint that cannot be read is skipped for the previous one (reported too).
* **Finite values.** :meth:`TrainLoop.check_finite` stops the run at the first NaN/inf loss,
  gradient norm, reward or KL with a :class:`NonFiniteError` naming the stage, step, metric and the
  last good checkpoint, before anything of that step is saved.
* **Output folder.** :func:`check_output_dir` (run by the loop and at every stage's start) fails
  before the first step when the folder cannot be created or written, or its disk is nearly full.
* **Finished marker.** ``summary.json`` marks a finished stage; the loop removes it when a run
  (re)starts, and the stage writes it again last, after its final outputs.
* **Several processes** (:mod:`rlhf_jax.launch`, a cluster): every process runs the loop and
  saves the (global) checkpoints with orbax; only process 0 writes metrics and removes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rlhf_jax import parallel
from rlhf_jax.checkpoint import Checkpointer, write_text_atomic
from rlhf_jax.metrics import MetricsWriter, to_python

MIN_FREE_BYTES = 64 << 20
"""Default free disk space an output folder must have at the start of a run (64 MiB)."""

NOT_FINGERPRINTED = ("workdir", "checkpoint_every", "log_every", "eval_every", "wandb",
                     "stop_after", "mesh")
"""Config fields that never enter a fingerprint: where and how often a run writes, not what it
computes (``mesh``: a run may resume on another mesh). A stage adds its step count
(``steps``/``iterations``/``epochs``) and the paths whose content it hashes."""


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or infinite loss, gradient norm, reward or KL."""


class RunMismatchError(ValueError):
    """The output folder holds a checkpoint of a different run (config or input data)."""


class OutputDirError(OSError):
    """The output folder cannot be created or written, or its disk is (nearly) full."""


def check_output_dir(stage: str, workdir: str | os.PathLike,
                     min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Creates ``workdir``, writes and removes a small probe file in it, and checks that its disk
    has ``min_free_bytes`` free; returns the folder.

    Raises:
      OutputDirError: the folder cannot be created or written (e.g. a path under a regular file,
        a read-only file system), or less than ``min_free_bytes`` are free.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"[{stage}] cannot write to the output folder {workdir}: "
                             f"{e.strerror or e} ({e.filename or workdir}); choose a writable "
                             "--workdir") from e
    free = shutil.disk_usage(workdir).free
    if free < min_free_bytes:
        raise OutputDirError(f"[{stage}] the disk of the output folder {workdir} is full: "
                             f"{free / 2**20:.1f} MiB free, at least {min_free_bytes / 2**20:.1f} "
                             "MiB needed for checkpoints and outputs; free space or choose "
                             "another --workdir")
    return workdir


def _json(x: Any) -> Any:
    """``x`` as JSON reads it back (tuples become lists): what a checkpoint's metadata holds."""
    return json.loads(json.dumps(x))


def fingerprint(cfg: Any, exclude: Sequence[str] = (), data: Mapping[str, str] | None = None
                ) -> dict:
    """A run's identity: ``{"config": the fields that shape its results, "data": digests}``.

    Args:
      cfg: the stage's config dataclass; every field except :data:`NOT_FINGERPRINTED` and
        ``exclude`` is recorded.
      exclude: further fields to leave out: the step count (a run may be extended) and paths whose
        content ``data`` hashes (moving an input does not change the run).
      data: content digests of the inputs (:func:`rlhf_jax.checkpoint.tree_digest`,
        ``files_digest``, ``text_digest``; :func:`rlhf_jax.runs.bundle_digest`), by name.
    """
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in NOT_FINGERPRINTED and k not in exclude}
    return _json({"config": fields, "data": dict(data or {})})


def fingerprint_changes(old: Mapping | None, new: Mapping) -> list[str]:
    """``"field: old → new"`` for every difference between two fingerprints (empty: same run)."""
    if old is None:
        return ["(the old run recorded no fingerprint: it was made by an older version)"]
    lines = []
    for part, label in (("config", ""), ("data", "input ")):
        a, b = dict(old.get(part, {})), dict(new.get(part, {}))
        for k in sorted(set(a) | set(b)):
            if a.get(k, _MISSING) != b.get(k, _MISSING):
                lines.append(f"{label}{k}: {_show(a.get(k, _MISSING))} → "
                             f"{_show(b.get(k, _MISSING))}")
    return lines


_MISSING = object()


def _show(v: Any) -> str:
    return "(not set)" if v is _MISSING else repr(v)


def refuse_other_run(stage: str, where: str | os.PathLike, workdir: str | os.PathLike,
                     changes: Sequence[str]) -> None:
    """Raises :class:`RunMismatchError` listing ``changes`` and how to start fresh."""
    raise RunMismatchError(
        f"[{stage}] {where} was made by a different run; resuming would mix its results with "
        "this one's. What changed:\n  " + "\n  ".join(changes) +
        f"\nTo start fresh, delete the folder (rm -rf {workdir}) or choose another --workdir. "
        "(Only the step count may change: a longer run continues from the last checkpoint.)")


def guard_outputs(stage: str, workdir: str | os.PathLike, fp: Mapping,
                  outputs: Sequence[str | os.PathLike]) -> None:
    """For a stage without checkpoints (e.g. collect) whose finished ``outputs`` are kept when it
    is re-run: refuses (:class:`RunMismatchError`) if any of them exists and was made with
    another fingerprint (stored in ``workdir/fingerprint.json``); otherwise records ``fp`` there.
    """
    workdir = Path(workdir)
    path = workdir / "fingerprint.json"
    fp = _json(fp)
    if any(Path(o).exists() for o in outputs):
        old = json.loads(path.read_text()) if path.exists() else None
        changes = fingerprint_changes(old, fp)
        if changes:
            done = ", ".join(Path(o).name for o in outputs if Path(o).exists())
            refuse_other_run(stage, f"{workdir} ({done})", workdir, changes)
    write_text_atomic(path, json.dumps(fp, indent=2) + "\n")


class StatefulBatches:
    """An endless iterator over :class:`rlhf_jax.data.batching.Batches` whose position can be
    saved in a checkpoint's JSON metadata and restored (a resumed run continues at the same
    example). The state carries the batches' report too, so a resumed run's
    ``batches.report.summary()`` counts every example of the run, not only those read since
    the resume."""

    def __init__(self, batches):
        from rlhf_jax.data import batching
        self._batching = batching
        self.batches = batches
        self._it = iter(batches)

    def next(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return {"iterator": self._batching.iterator_state(self._it),
                "report": self.batches.report.get_state()}

    def set_state(self, state: dict) -> None:
        if "iterator" not in state:  # a checkpoint written before reports were saved
            self._it = self._batching.iterate(self.batches, state)
            return
        self._it = self._batching.iterate(self.batches, state["iterator"])
        self.batches.report.set_state(state["report"])


class TrainLoop:
    """Resume, step range, metrics, progress bar and checkpoints of one stage.

    Constructing the loop checks the output folder (:func:`check_output_dir`) and the newest
    readable checkpoint's fingerprint and step, so a refusal comes before any work.

    Args:
      stage: the stage's name (messages, progress bar).
      workdir: the stage's output folder (``ckpt/``, ``metrics.jsonl``, ``tensorboard/``).
      total_steps: the run's length; ``steps()`` ends there.
      checkpoint_every: save every N steps (and at the last step of this run).
      log_every: write metrics every N steps (and at the last step).
      show: metric keys on the progress bar.
      stop_after: end this run after N steps (a time-limited job slot); re-running resumes.
      wandb: also log to Weights & Biases (``pip install wandb``; offline unless
        ``WANDB_MODE`` says otherwise).
      config: the run's config (recorded by Weights & Biases).
      fingerprint: the run's identity (:func:`fingerprint`), stored with every checkpoint; a
        checkpoint with another one is refused (:class:`RunMismatchError`). None: ``{}``.
      unit: what a step is called in messages (``"iteration"`` for PPO).
      min_free_bytes: free disk space the output folder must have at the start.

    Raises:
      OutputDirError: the output folder is not writable or its disk is full.
      RunMismatchError: the newest checkpoint is of another run, or of a longer one.
    """

    def __init__(self, stage: str, workdir: str | os.PathLike, total_steps: int, *,
                 checkpoint_every: int, log_every: int = 1, show: Sequence[str] = (),
                 stop_after: int | None = None, wandb: bool = False, config: Any = None,
                 fingerprint: Mapping | None = None, unit: str = "step",
                 min_free_bytes: int = MIN_FREE_BYTES):
        for name, v in (("total_steps", total_steps), ("checkpoint_every", checkpoint_every),
                        ("log_every", log_every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"[{stage}] {name}={v!r}: expected a positive integer")
        self.stage, self.workdir, self.total = stage, Path(workdir), total_steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.show, self.stop_after, self.wandb, self.config = tuple(show), stop_after, wandb, config
        self.fingerprint, self.unit = _json(dict(fingerprint or {})), unit
        check_output_dir(stage, self.workdir, min_free_bytes)
        self.ckpt = Checkpointer(self.workdir / "ckpt")
        self.start = 0
        self.last_saved: int | None = None
        """The newest checkpoint of this run (resumed from or saved); None before the first."""
        self.writer: MetricsWriter | None = None
        for tmp in self.ckpt.incomplete() if parallel.is_main() else ():
            shutil.rmtree(tmp)
            print(f"[{stage}] removed {tmp.name}: a checkpoint whose writing was interrupted")
        parallel.sync(f"{stage}-loop-start")
        self._candidates = list(self._readable_checkpoints())
        if self._candidates:
            self._check_resumable(*self._candidates[0])

    @property
    def last(self) -> int:
        """The last step this run executes."""
        if self.stop_after is None:
            return self.total
        return min(self.total, self.start + self.stop_after)

    @property
    def finished(self) -> bool:
        """Whether this run reaches ``total_steps`` (False when ``stop_after`` ends it early)."""
        return self.last >= self.total

    def _readable_checkpoints(self) -> Iterator[tuple[int, dict]]:
        """``(step, metadata)`` of every checkpoint whose metadata reads, newest first."""
        for step in reversed(self.ckpt.all_steps()):
            try:
                yield step, self.ckpt.restore_meta(step)
            except Exception as e:  # noqa: BLE001 - any reader error means "incomplete"
                print(f"[{self.stage}] checkpoint {self.ckpt.directory}/{step} is incomplete or "
                      f"unreadable ({type(e).__name__}: {e}); falling back to the one before")

    def _check_resumable(self, step: int, meta: Mapping) -> None:
        where = f"{self.ckpt.directory}/{step}"
        changes = fingerprint_changes(meta.get("fingerprint"), self.fingerprint)
        if changes:
            refuse_other_run(self.stage, f"the checkpoint {where}", self.workdir, changes)
        if step > self.total:
            raise RunMismatchError(
                f"[{self.stage}] the checkpoint {where} is at {self.unit} {step}, beyond this "
                f"run's {self.total}: a run can be extended but not shortened. To start fresh, "
                f"delete the folder (rm -rf {self.workdir}) or choose another --workdir.")

    def restore(self, state: Any, data: StatefulBatches | None = None) -> Any:
        """The newest complete checkpoint's state (and data position) if there is one, else
        ``state``.

        ``state`` is the pytree built by init-from or scratch; it is also the restore template
        (shapes, dtypes and shardings are honoured). A checkpoint whose arrays cannot be read is
        skipped for the previous one, with a message. A stale ``summary.json`` (the finished
        marker of an earlier run) is removed: the stage writes it again when this run ends.

        Raises:
          RunMismatchError: a fallback checkpoint is of another run.
          RuntimeError: checkpoints exist but none can be read.
        """
        failures = []
        for step, meta in self._candidates:
            self._check_resumable(step, meta)
            try:
                restored, meta = self.ckpt.restore(state, step)
            except Exception as e:  # noqa: BLE001 - any reader error means "incomplete"
                failures.append(f"{step}: {type(e).__name__}: {e}")
                print(f"[{self.stage}] checkpoint {self.ckpt.directory}/{step} is incomplete or "
                      f"unreadable ({type(e).__name__}: {e}); falling back to the one before")
                continue
            state, self.start, self.last_saved = restored, int(meta["step"]), step
            if data is not None:
                data.set_state(meta["data"])
            note = f" (not the newest, {self.ckpt.all_steps()[-1]}: unreadable)" \
                if step != self.ckpt.all_steps()[-1] else ""
            print(f"[{self.stage}] resumed from {self.unit} {self.start}{note}")
            break
        else:
            if failures or self.ckpt.all_steps():
                raise RuntimeError(f"[{self.stage}] no checkpoint in {self.ckpt.directory} can be "
                                   "read:\n  " + "\n  ".join(failures) + f"\nDelete the folder "
                                   f"(rm -rf {self.workdir}) or choose another --workdir.")
        summary = self.workdir / "summary.json"
        parallel.sync(f"{self.stage}-restored")  # every process has seen the old summary
        if summary.exists() and parallel.is_main():
            summary.unlink()
            if self.start < self.total:
                print(f"[{self.stage}] {self.workdir} held the outputs of a run finished at "
                      f"{self.unit} {self.start}; this run goes on to {self.total} and rewrites "
                      "final outputs and summary.json")
        # Rows after the resumed step were written by a killed run and come again; without a
        # checkpoint every row does (e.g. PPO's step-0 evaluation).
        keep = self.start if self.last_saved is not None else -1
        if not parallel.is_main():
            self.writer = _NoWriter()
            return state
        self.writer = MetricsWriter(self.workdir, total_steps=self.total, initial_step=self.start,
                                    desc=self.stage, show=self.show, keep_until=keep,
                                    wandb=self.wandb, config=self.config)
        return state

    def steps(self) -> range:
        """``start + 1 … last``."""
        if self.writer is None:
            raise RuntimeError("TrainLoop.restore() must be called before steps()")
        return range(self.start + 1, self.last + 1)

    def check_finite(self, step: int, metrics: Mapping[str, Any], keys: Sequence[str]) -> None:
        """Stops the run if any of ``metrics[keys]`` (those present) is NaN or infinite.

        Call it every step, right after the compiled step and before anything of the step is
        logged or saved; ``keys`` in order of diagnosis (the first non-finite one is named: e.g.
        the reward before the loss it poisons). The values are the ones the compiled step already
        computed; only these scalars leave the device.

        Raises:
          NonFiniteError: naming the stage, the step, the metric and its value, the other
            non-finite ones, and the last good checkpoint (none is written for this step).
        """
        present = [k for k in keys if k in metrics]
        host = parallel.to_host({k: metrics[k] for k in present})
        values = {k: float(np.asarray(host[k])) for k in present}
        bad = [k for k in present if not math.isfinite(values[k])]
        if not bad:
            return
        others = f" (also non-finite: {', '.join(bad[1:])})" if bad[1:] else ""
        if self.last_saved is None:
            good = "no checkpoint was written yet"
        else:
            good = (f"the last good checkpoint is {self.unit} {self.last_saved} "
                    f"({self.ckpt.directory}/{self.last_saved})")
        self._abort()
        raise NonFiniteError(
            f"[{self.stage}] {self.unit} {step}: {bad[0]} = {values[bad[0]]} is not finite"
            f"{others}. The run stopped before saving anything of {self.unit} {step}; {good}. "
            "Look for a NaN/inf in the inputs (data, the models' parameters) or a too-large "
            "learning rate.")

    def log(self, step: int, metrics: Mapping[str, Any], force: bool = False) -> dict | None:
        """Writes ``metrics`` at ``step`` if it is a logging step (or ``force``)."""
        if force or step % self.log_every == 0 or step == self.total:
            return self.writer.write(step, parallel.to_host(dict(metrics)))
        return None

    def end_step(self, step: int, state: Any, data: StatefulBatches | None = None,
                 meta: Mapping | None = None) -> None:
        """Advances the progress bar and saves a checkpoint (with the fingerprint) every
        ``checkpoint_every`` steps and at the last step of this run."""
        self.writer.advance()
        if step % self.checkpoint_every == 0 or step == self.last:
            m = {"step": step, **(meta or {}), "fingerprint": self.fingerprint}
            if data is not None:
                m["data"] = data.get_state()
            self.ckpt.save(step, state, m)
            self.last_saved = step

    def _abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.ckpt.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()
        if not self.finished:
            print(f"[{self.stage}] stopped after {self.unit} {self.last} of {self.total}; re-run "
                  "the same command to resume")


class _NoWriter:
    """The metrics writer of processes other than 0: rows are formed, nothing is written."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        return to_python(metrics)

    def advance(self) -> None:
        pass

    def close(self) -> None:
        pass
