"""The whole RLHF recipe on one task: SFT -> comparisons -> reward model -> PPO.

The embedded default task is positive-sentiment continuation of IMDB reviews (Ziegler et al.
2019), fully offline and sized for a 2-core CPU. Each stage writes its own folder under ``root``;
re-running the command skips finished stages and resumes an interrupted one from its checkpoint.

Run::

    make demo                                    # python -m experiments.pipeline --preset default
    python -m experiments.pipeline --preset tiny  # a smoke run of a few minutes
    python -m experiments.pipeline --preset default --ppo.iterations 200  # override any field

Outputs: ``<root>/{sft,collect,reward,ppo}/`` (see each stage's docstring), ``<root>/gold.pkl``
(the gold scorer), and ``<root>/summary.json`` + ``<root>/report.md`` with the headline figures.

A stage is one entry of :data:`STAGES`: its module (``Config``, ``PRESETS``, ``train(cfg)``,
``headline(summary)``), a function that wires its config into the pipeline's folders, and its
configs under the pipeline's presets.

Seeds: the default preset trains 3 reward models (``--reward.seeds``) and PPO optimises their
mean minus 5 times their variance (``ppo.reward_ensemble`` is wired to the other seeds'
``final/``; ``--ppo.reward-disagreement`` sets the 5, 0 for the plain mean), and it runs 5 PPO seeds
vmapped in one program (``--ppo.seeds``; :mod:`experiments.seeds`), so the headline is a mean with
its 95% confidence interval and every seed's value. ``--ppo.seeds 1`` runs :mod:`experiments.ppo`
(periodic evaluation, ``ppo.png``, ``gold_vs_kl.png``) instead.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import time
import types
from typing import Callable, NamedTuple

from experiments import collect, common, ppo, reward, seeds, sft
from rlhf_jax.runs import read_summary, write_summary


class Stage(NamedTuple):
    name: str
    module: object
    """Has ``Config``, ``PRESETS``, ``train(cfg) -> summary`` and ``headline(summary)``."""
    wire: Callable
    """``wire(stage_cfg, root: Path, pipeline_cfg) -> stage_cfg`` with folders under ``root``."""
    presets: dict | None = None
    """The stage's config under each pipeline preset (None: ``module.PRESETS``)."""


def _rep(**fields):
    return lambda c, r, p: dataclasses.replace(c, **{k: v(r, p) for k, v in fields.items()})


def _train_ppo(cfg: seeds.Config) -> dict:
    """``cfg.seeds`` PPO runs vmapped (:mod:`experiments.seeds`), or with one seed the plain run
    (:mod:`experiments.ppo`, which also evaluates along the way and plots its curves)."""
    return seeds.train(cfg) if cfg.seeds > 1 else ppo.train(cfg)


def _ppo_headline(summary: dict) -> list:
    return (seeds.headline if summary["stage"] == "ppo-seeds" else ppo.headline)(summary)


# The PPO stage: experiments.ppo's config plus `seeds`, trained by the one or the other.
PPO_STAGE = types.SimpleNamespace(Config=seeds.Config, PRESETS=seeds.PRESETS, train=_train_ppo,
                                  headline=_ppo_headline)


def _reward_ensemble(r: Path, p) -> tuple[str, ...]:
    """The reward stage's other seeds (its ``final/`` is the first), then ``--ppo.reward-
    ensemble``'s own bundles."""
    return (tuple(str(r / "reward" / f"seed{p.reward.seed + i}" / "final")
                  for i in range(1, p.reward.seeds)) + p.ppo.reward_ensemble)


def _reward_disagreement(r: Path, p) -> float:
    """``--ppo.reward-disagreement`` where there is an ensemble; with one reward model
    (``--reward.seeds 1`` and no ``--ppo.reward-ensemble``) there is no variance to penalise: 0."""
    return p.ppo.reward_disagreement if _reward_ensemble(r, p) else 0.0


STAGES: tuple[Stage, ...] = (
    Stage("sft", sft, _rep(workdir=lambda r, p: str(r / "sft"), data_dir=lambda r, p: p.data_dir,
                           task=lambda r, p: p.task)),
    Stage("collect", collect, _rep(
        workdir=lambda r, p: str(r / "collect"), data_dir=lambda r, p: p.data_dir,
        task=lambda r, p: p.task, gold_path=lambda r, p: str(r / "gold.pkl"),
        policies=lambda r, p: (str(r / "sft" / "final"), str(r / "sft" / "half")))),
    Stage("reward", reward, _rep(workdir=lambda r, p: str(r / "reward"),
                                 sft_dir=lambda r, p: str(r / "sft" / "final"),
                                 comparisons_dir=lambda r, p: str(r / "collect")),
          {**reward.PRESETS, "default": dataclasses.replace(reward.PRESETS["default"], seeds=3)}),
    Stage("ppo", PPO_STAGE, _rep(
        workdir=lambda r, p: str(r / "ppo"), data_dir=lambda r, p: p.data_dir,
        task=lambda r, p: p.task, gold_path=lambda r, p: str(r / "gold.pkl"),
        sft_dir=lambda r, p: str(r / "sft" / "final"),
        reward_dir=lambda r, p: str(r / "reward" / "final"), reward_ensemble=_reward_ensemble,
        reward_disagreement=_reward_disagreement),
          {name: dataclasses.replace(c, seeds=5, reward_disagreement=5.0) if name == "default"
           else dataclasses.replace(c, seeds=1) for name, c in seeds.PRESETS.items()}),
)


def _presets(stage: Stage) -> dict:
    return stage.presets or stage.module.PRESETS


# The pipeline's config: a root folder, the task, and one config per stage (`--ppo.iterations`).
Config = dataclasses.make_dataclass(
    "Config",
    [("root", str, dataclasses.field(default="runs/default")),
     ("task", str, dataclasses.field(default="imdb")),
     ("data_dir", "str | None", dataclasses.field(default=None))]
    + [(s.name, s.module.Config, dataclasses.field(default=_presets(s)["default"]))
       for s in STAGES],
    frozen=True)
Config.__module__ = __name__
Config.__doc__ = ("The pipeline: a root folder, the task (``imdb`` or ``jsonl:PATH``), its TFDS "
                  "data dir, and one config per stage (folders are rewired under ``root``).")

PRESETS: dict[str, Config] = {
    name: Config(root=f"runs/{name}", **{s.name: _presets(s)[name] for s in STAGES})
    for name in ("default", "tiny", "smollm2")}


def stage_configs(cfg: Config) -> dict:
    """``{stage name: its config}`` with folders under ``cfg.root``, wired to earlier stages."""
    root = Path(cfg.root)
    return {s.name: s.wire(getattr(cfg, s.name), root, cfg) for s in STAGES}


def train(cfg: Config) -> dict:
    """Runs every unfinished stage; returns the pipeline summary."""
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    rows = []
    for stage, scfg in zip(STAGES, stage_configs(cfg).values()):
        done = read_summary(scfg.workdir)
        if done is not None:
            print(f"== {stage.name}: finished earlier ({scfg.workdir}/summary.json); skipped")
        else:
            print(f"== {stage.name} -> {scfg.workdir}")
            t0 = time.perf_counter()
            done = stage.module.train(scfg)
            if "stopped_at" in done:
                print(f"== {stage.name} stopped early; re-run the same command to resume")
                return done
            timings[stage.name] = round(time.perf_counter() - t0, 1)
            timings_path.write_text(json.dumps(timings, indent=2))
        rows += stage.module.headline(done)
    summary = {key: value for key, _, value, _ in rows}
    summary["stage_seconds"] = timings
    summary["total_seconds"] = round(sum(timings.values()), 1) if timings else None
    write_summary(root, summary)
    (root / "report.md").write_text(report_md(rows, timings, root))
    print((root / "report.md").read_text())
    return summary


def report_md(rows: list, timings: dict, root: Path) -> str:
    def f(x, fmt):
        if isinstance(x, list):  # one value per seed
            return " / ".join(f(v, fmt) for v in x)
        return "n/a" if x is None else format(x, fmt)

    plots = [f"`{p.relative_to(root)}`" for p in
             (root / "ppo" / n for n in ("ppo.png", "seeds.png", "gold_vs_kl.png"))
             if p.exists()] + ["`reward/reward.png`" if (root / "reward" / "reward.png").exists()
                               else "`reward/seed*/reward.png`", "`sft/loss.png`"]
    return "\n".join([f"# RLHF pipeline report ({root})", "", "| figure | value |", "|---|---|"]
                     + [f"| {label} | {f(value, fmt)} |" for _, label, value, fmt in rows]
                     + [f"| wall time per stage (s) | {timings} |", "",
                        f"Plots: {', '.join(plots)}; samples: `ppo/samples.md`.", ""])


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
