"""Seed runs side by side: held-out gold, KL and reward-model score of several runs of
:mod:`experiments.seeds` (or :mod:`experiments.grpo`), e.g. PPO variants on the same SFT and
reward models, in one table and one figure.

Run::

    python -m experiments.compare --runs runs/default/ppo runs/default/ppo_fixed01 \
        --labels "adaptive β" "fixed β 0.1" --out runs/default/compare

Writes ``<out>/compare.md``: one row per run with gold P(positive), KL to the SFT policy (k1, nats
per response) and reward-model score as mean ± 95% CI over its seeds and every seed's value, then
what each run's config changes from the first run's (``field: first → this``); and
``<out>/compare.png``: held-out gold against held-out KL, each run's mean over seeds at every
evaluation (a path from the SFT policy at the origin) and each seed's final point. Runs that
evaluated only at the end show their final points alone. Only finished runs (a ``summary.json``
with every seed's figures) are compared.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import sys

import numpy as np

from experiments import common
from rlhf_jax import stats
from rlhf_jax.loop import fingerprint_changes
from rlhf_jax.metrics import read_metrics
from rlhf_jax.runs import read_summary


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
    def fields(s):
        return {"config": {k: _resolved(v) for k, v in s["config"].items()
                           if k not in NOT_COMPARED}}

    base = fields(runs[0]["summary"])
    rows = []
    for run, label in zip(runs, labels):
        s = run["summary"]
        row = {"label": label, "path": run["path"], "seeds": s["seeds"],
               "changes": fingerprint_changes(base, fields(s))}
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
             f"Command: `python -m experiments.compare {' '.join(argv)}`", "",
             "Held-out figures at the end of each run; mean ± 95% CI (Student's t) over seeds.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['label']}", str(len(r["seeds"]))]
        for name, _, fmt in FIGURES:
            cells += cell(r[name], fmt)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Config changes from the first run ({rows[0]['label']}, `{rows[0]['path']}`):",
              ""]
    for r in rows[1:]:
        lines.append(f"- **{r['label']}** (`{r['path']}`): "
                     + ("; ".join(f"`{c}`" for c in r["changes"]) or "none"))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], labels: list[str], out: Path) -> Path:
    """``compare.png``: held-out gold against held-out KL, each run's mean path over seeds and
    each seed's final point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (run, label) in enumerate(zip(runs, labels)):
        c, s = f"C{i}", run["summary"]
        if run["evals"]:
            ax.plot([r["eval/kl_k1"] for r in run["evals"]],
                    [r["eval/gold"] for r in run["evals"]], "o-", color=c, ms=3, lw=1,
                    alpha=0.6)
        kl = [p["kl"] for p in s["per_seed"]]
        gold = [p["gold"] for p in s["per_seed"]]
        ax.scatter(kl, gold, color=c, s=14, alpha=0.8)
        ax.plot(np.mean(kl), np.mean(gold), "*", color=c, ms=12, mec="k", mew=0.5,
                label=f"{label} ({len(kl)} seeds)")
    ax.set_xlabel("held-out KL to SFT (nats per response, k1)")
    ax.set_ylabel("held-out gold P(positive)")
    ax.set_title("lines: mean over seeds at each evaluation; dots: each seed's end; stars: mean",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=120)
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
    plot(runs, labels, out)
    print(markdown(rows, argv))
    return {"rows": rows}


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
