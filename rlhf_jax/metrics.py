"""Where metrics are written: one place for every experiment.

Metrics leave jit as a flat dict of scalars with namespaced keys (``objective/kl``,
``ppo/clipfrac``). :class:`MetricsWriter` appends them to ``metrics.jsonl``, TensorBoard event
files and (optionally) Weights & Biases, and feeds a progress bar that shows the key figures.
:func:`plot_curves` draws PNGs from ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np


def to_python(metrics: Mapping) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    import jax
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` rows to ``<workdir>/metrics.jsonl`` and TensorBoard.

    Args:
      workdir: the stage's output folder.
      total_steps: length of the progress bar (``None`` hides the bar).
      show: metric keys shown on the progress bar.
      desc: progress-bar label.
      initial_step: where the progress bar starts (a resumed run).
      keep_until: drop rows of an existing ``metrics.jsonl`` with a larger step first (a run
        killed after its last checkpoint wrote them; the resumed run writes them again).
      wandb: also log to Weights & Biases (the optional ``wandb`` package; ``WANDB_MODE``
        defaults to ``offline``: runs sync later with ``wandb sync``).
      config: the run's config, recorded by Weights & Biases.
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int | None = None,
                 show: Sequence[str] = (), desc: str = "", initial_step: int = 0,
                 keep_until: int | None = None, wandb: bool = False, config=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if keep_until is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(True)
                    if line.strip() and _step_of(line) <= keep_until]
            path.write_text("".join(kept), encoding="utf-8")
        self._jsonl = open(path, "a", encoding="utf-8")
        self._wandb = _wandb_run(self.workdir, desc, config) if wandb else None
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        self._show = tuple(show)
        self._bar = None
        if total_steps is not None:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                             mininterval=1.0)

    def write(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        row = to_python(metrics)
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(row, step=int(step))
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{row[k]:.3g}" for k in self._show if k in row}
            self._bar.set_postfix(shown, refresh=False)
        return row

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a line half-written when the run was killed: dropped with the rest


def _wandb_run(workdir: Path, name: str, config):
    """A Weights & Biases run in ``workdir/wandb`` (offline unless ``WANDB_MODE`` is set)."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb=True needs the optional wandb package: pip install wandb") from e
    import dataclasses
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return wandb.init(dir=str(workdir), name=name, config=cfg, reinit=True,
                      project=os.environ.get("WANDB_PROJECT", "rlhf_jax"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``metrics.jsonl``; when a resumed run rewrote steps, the last row for a step
    wins."""
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def plot_curves(rows: Sequence[Mapping], panels: Iterable[tuple[str, str | Sequence[str]]],
                out_png: str | os.PathLike, title: str = "", x: str = "step") -> Path:
    """One PNG with a panel per ``(y_label, keys)``; each key is a curve against ``x``.

    A panel whose ``x`` key is itself a metric (e.g. gold score against KL) is written as
    ``(y_label, keys)`` with ``x`` set by the caller. In a multi-process run only process 0
    writes.
    """
    import jax
    if jax.process_index() != 0:
        return Path(out_png)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(lab, [keys] if isinstance(keys, str) else list(keys)) for lab, keys in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r[x], r[key]) for r in rows if key in r and x in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(pts) < 60 else None, label=key)
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
