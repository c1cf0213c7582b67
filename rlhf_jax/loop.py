"""The training-loop skeleton every stage shares: start-up order, checkpoints, metrics, progress.

A stage writes into its own ``workdir``::

    loop = TrainLoop("sft", workdir, total_steps=cfg.steps, checkpoint_every=200, log_every=20,
                     show=("lm/loss",))
    state = loop.restore(state, data=loader)       # resume > the state given (init-from/scratch)
    for step in loop.steps():
        state, metrics = train_step(state, next_batch(loader))
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
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.metrics import MetricsWriter


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


class TrainLoop:
    """Resume, step range, metrics, progress bar and checkpoints of one stage.

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
    """

    def __init__(self, stage: str, workdir: str | os.PathLike, total_steps: int, *,
                 checkpoint_every: int, log_every: int = 1, show: Sequence[str] = (),
                 stop_after: int | None = None, wandb: bool = False, config: Any = None):
        for name, v in (("total_steps", total_steps), ("checkpoint_every", checkpoint_every),
                        ("log_every", log_every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"[{stage}] {name}={v!r}: expected a positive integer")
        self.stage, self.workdir, self.total = stage, Path(workdir), total_steps
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.show, self.stop_after, self.wandb, self.config = tuple(show), stop_after, wandb, config
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt = Checkpointer(self.workdir / "ckpt")
        self.start = 0
        self.writer: MetricsWriter | None = None

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

    def restore(self, state: Any, data: StatefulBatches | None = None) -> Any:
        """The newest checkpoint's state (and data position) if there is one, else ``state``.

        ``state`` is the pytree built by init-from or scratch; it is also the restore template
        (shapes, dtypes and shardings are honoured).
        """
        if self.ckpt.latest_step() is not None:
            state, meta = self.ckpt.restore(state)
            self.start = int(meta["step"])
            if data is not None:
                data.set_state(meta["data"])
            print(f"[{self.stage}] resumed from step {self.start}")
        self.writer = MetricsWriter(self.workdir, total_steps=self.total, initial_step=self.start,
                                    desc=self.stage, show=self.show, keep_until=self.start,
                                    wandb=self.wandb, config=self.config)
        return state

    def steps(self) -> range:
        """``start + 1 … last``."""
        if self.writer is None:
            raise RuntimeError("TrainLoop.restore() must be called before steps()")
        return range(self.start + 1, self.last + 1)

    def log(self, step: int, metrics: Mapping[str, Any], force: bool = False) -> dict | None:
        """Writes ``metrics`` at ``step`` if it is a logging step (or ``force``)."""
        if force or step % self.log_every == 0 or step == self.total:
            return self.writer.write(step, metrics)
        return None

    def end_step(self, step: int, state: Any, data: StatefulBatches | None = None,
                 meta: Mapping | None = None) -> None:
        """Advances the progress bar and saves a checkpoint every ``checkpoint_every`` steps and at
        the last step of this run."""
        self.writer.advance()
        if step % self.checkpoint_every == 0 or step == self.last:
            m = {"step": step, **(meta or {})}
            if data is not None:
                m["data"] = data.get_state()
            self.ckpt.save(step, state, m)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()
        if not self.finished:
            print(f"[{self.stage}] stopped after step {self.last} of {self.total}; re-run the "
                  f"same command to resume")
