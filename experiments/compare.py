"""Seed runs side by side: held-out gold, KL and reward-model score of several runs of
:mod:`experiments.seeds` (or :mod:`experiments.grpo`), e.g. PPO variants on the same SFT and
reward models, in one table and one figure.

Run::

    python -m experiments.compare --runs runs/default/ppo runs/default/ppo_fixed01 \
        --labels "adaptive β" "fixed β 0.1" --out runs/default/compare

Writes ``<out>/compare.md``: one row per run with gold P(positive), KL to the SFT policy (k1, nats
per response) and reward-model score as mean ± 95% CI over its seeds and every seed's value, then
what each run's config changes from the first run's (``field: first → this``); and
``<out>/compare.png``: held-out gold against held-out KL, on the left each run's mean over seeds at
every evaluation (a path from the SFT policy at the origin; runs that evaluated only at the end
show their final points alone), on the right the ends: every seed and the mean ± 95% CI on both
axes. Only finished runs (a ``summary.json`` with every seed's figures) are compared; runs without
a gold scorer are in the table, not in the figure.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import shlex
import sys

import numpy as np

from experiments import common
from rlhf_jax import stats
from rlhf_jax.loop import fingerprint_changes
from rlhf_jax.metrics import read_metrics
from rlhf_jax.runs import md_cell, read_summary


@dataclasses.dataclass(frozen=True)
class Config:
    """The runs to compare and where the table and figure go."""
    runs: tuple[str, ...] = ()
    """Folders of finished seed runs (each holds ``summary.json`` and ``metrics.jsonl``)."""
    labels: tuple[str, ...] = ()
    """One label per run (default: the folder names)."""
    out: str = "runs/default/compare"


PRESETS = {"default": Config()}
FIGURES = (("gold", "gold P(positive)", ".3f"), ("kl", "KL to SFT (nats)", ".2f"),
           ("rm_score", "RM score", ".2f"))
# Fields that name where a run lives rather than what it does.
NOT_COMPARED = ("workdir",)
_MISSING = object()


def load_run(path: str | Path) -> dict:
    """A finished seed run: its summary and its held-out evaluations (metrics rows holding
    ``eval/gold``). Raises ``ValueError`` naming the file and what it lacks."""
    path = Path(path)
    file, summary = path / "summary.json", read_summary(path)
    if summary is None:
        raise ValueError(f"{file}: not found; expected a finished seed run "
                         f"(python -m experiments.seeds ... --workdir {path})")
    missing = [k for k in ("seeds", "per_seed", "config", "sft") if k not in summary]
    if missing:
        raise ValueError(f"{file}: no {', '.join(missing)}; expected the summary of a finished "
                         f"seed run (experiments.seeds), got stage {summary.get('stage')!r}")
    metrics = path / "metrics.jsonl"
    evals = [r for r in read_metrics(metrics) if "eval/gold" in r] if metrics.exists() else []
    return {"path": str(path), "summary": summary, "evals": evals}


def _resolved(v):
    """An existing path (or a list of them) as its real absolute path, so that the same folder
    named relative in one run and absolute in another compares equal; anything else unchanged."""
    if isinstance(v, list):
        return [_resolved(x) for x in v]
    if isinstance(v, str) and v and Path(v).exists():
        return os.path.realpath(v)
    return v


def table(runs: list[dict], labels: list[str]) -> list[dict]:
    """One row per run: label, seeds, each figure's :func:`rlhf_jax.stats.mean_ci` over seeds,
    and its config changes from the first run."""
    def changes(a: dict, b: dict) -> list[str]:  # shown as written, compared as resolved
        keys = sorted((set(a) | set(b)) - set(NOT_COMPARED))
        diff = [k for k in keys if _resolved(a.get(k, _MISSING)) != _resolved(b.get(k, _MISSING))]
        return fingerprint_changes({"config": {k: a[k] for k in diff if k in a}},
                                   {"config": {k: b[k] for k in diff if k in b}})

    base = runs[0]["summary"]["config"]
    rows = []
    for run, label in zip(runs, labels):
        s = run["summary"]
        row = {"label": label, "path": run["path"], "seeds": s["seeds"],
               "changes": changes(base, s["config"])}
        for name, _, _ in FIGURES:
            values = [p.get(name) for p in s["per_seed"]]
            row[name] = None if None in values else stats.mean_ci(values)
        rows.append(row)
    return rows


def markdown(rows: list[dict], argv: list[str]) -> str:
    def cell(fig, fmt):
        if fig is None:
            return "—", "—"
        spread = "" if fig["n"] < 2 else f" ± {fig['half_width']:{fmt}}"
        return (f"{fig['mean']:{fmt}}{spread}", " / ".join(f"{v:{fmt}}" for v in fig["values"]))

    head = ["run", "seeds"] + [f"{title}{part}" for _, title, _ in FIGURES
                               for part in ("", ", per seed")]
    lines = ["# Seed runs compared", "",
             f"Command: `python -m experiments.compare {shlex.join(argv)}`", "",
             "Held-out figures at the end of each run; mean ± 95% CI (Student's t) over seeds.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [md_cell(r["label"]), str(len(r["seeds"]))]
        for name, _, fmt in FIGURES:
            cells += cell(r[name], fmt)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Config changes from the first run ({md_cell(rows[0]['label'])}, "
              f"`{rows[0]['path']}`):",
              ""]
    for r in rows[1:]:
        lines.append(f"- **{md_cell(r['label'])}** (`{r['path']}`): "
                     + ("; ".join(f"`{c}`" for c in r["changes"]) or "none"))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], rows: list[dict], out: Path) -> Path:
    """``compare.png``: held-out gold against held-out KL. Left, each run's path (the mean over
    seeds at every evaluation) and each seed's end; right, the ends only: every seed and the mean
    with its 95% CI on both axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "o^sDvP*Xh<>p"
    for i, (run, row) in enumerate(zip(runs, rows)):
        if row["gold"] is None or row["kl"] is None:  # no gold scorer: nothing to place
            continue
        c, m = f"C{i % 10}", markers[i % len(markers)]
        kl, gold = row["kl"]["values"], row["gold"]["values"]
        if run["evals"]:
            left.plot([r["eval/kl_k1"] for r in run["evals"]],
                      [r["eval/gold"] for r in run["evals"]], "-", marker=m, color=c, ms=4,
                      lw=1, alpha=0.7, label=f"{row['label']} ({len(kl)} seeds)")
        else:
            left.plot([], [], marker=m, color=c, label=f"{row['label']} ({len(kl)} seeds)")
        left.scatter(kl, gold, color=c, marker=m, s=10, alpha=0.5)
        right.scatter(kl, gold, color=c, marker=m, s=16, alpha=0.45)
        err = [[0 if np.isnan(f["half_width"]) else f["half_width"]]
               for f in (row["kl"], row["gold"])]
        right.errorbar(row["kl"]["mean"], row["gold"]["mean"], xerr=err[0], yerr=err[1],
                       marker=m, color=c, ms=9, mec="k", mew=0.6, capsize=3, lw=1.2)
    for ax in (left, right):
        ax.set_xlabel("held-out KL to SFT (nats per response, k1)")
        ax.set_ylabel("held-out gold P(positive)")
        ax.grid(alpha=0.3)
    left.set_title("each run's mean over seeds at every evaluation; small: each seed's end",
                   fontsize=9)
    right.set_title("the ends: each seed, and the mean ± 95% CI (t) on both axes", fontsize=9)
    left.legend(fontsize=7)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train(cfg: Config, argv: list[str] | None = None) -> dict:
    """Reads the runs, writes ``compare.md``, ``compare.json`` and ``compare.png``; returns the
    table rows."""
    if not cfg.runs:
        raise SystemExit("compare: no runs given; e.g. --runs runs/default/ppo "
                         "runs/default/ppo_fixed01")
    if cfg.labels and len(cfg.labels) != len(cfg.runs):
        raise SystemExit(f"compare: {len(cfg.labels)} labels for {len(cfg.runs)} runs; give one "
                         "label per run or none")
    labels = list(cfg.labels or [Path(r).name for r in cfg.runs])
    try:
        runs = [load_run(r) for r in cfg.runs]
    except ValueError as e:
        raise SystemExit(f"compare: {e}") from None
    rows = table(runs, labels)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    (out / "compare.md").write_text(markdown(rows, argv))
    (out / "compare.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    plot(runs, rows, out)
    print(markdown(rows, argv))
    return {"rows": rows}


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
