"""The whole RLHF recipe on one task: SFT -> comparisons -> reward model -> PPO.

The embedded default task is positive-sentiment continuation of IMDB reviews (Ziegler et al.
2019), fully offline and sized for a 2-core CPU. Each stage writes its own folder under ``root``;
re-running the command skips finished stages and resumes an interrupted one from its checkpoint.

Run::

    make demo                                    # python -m experiments.pipeline --preset default
    python -m experiments.pipeline --preset tiny  # seconds-scale smoke run
    python -m experiments.pipeline --preset default --ppo.iterations 200  # override any field

Outputs: ``<root>/{sft,collect,reward,ppo}/`` (see each stage's docstring), ``<root>/gold.pkl``
(the gold scorer), and ``<root>/summary.json`` + ``<root>/report.md`` with the headline figures.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import time

from experiments import collect, common, ppo, reward, sft
from rlhf_jax.runs import read_summary, write_summary


@dataclasses.dataclass(frozen=True)
class Config:
    """The pipeline: a root folder and one config per stage (paths are rewired under ``root``)."""
    root: str = "runs/default"
    data_dir: str | None = None
    """TFDS data dir for IMDB (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    sft: sft.Config = sft.PRESETS["default"]
    collect: collect.Config = collect.PRESETS["default"]
    reward: reward.Config = reward.PRESETS["default"]
    ppo: ppo.Config = ppo.PRESETS["default"]


def _preset(name: str, root: str) -> Config:
    return Config(root=root, sft=sft.PRESETS[name], collect=collect.PRESETS[name],
                  reward=reward.PRESETS[name], ppo=ppo.PRESETS[name])


PRESETS: dict[str, Config] = {name: _preset(name, f"runs/{name}")
                              for name in ("default", "tiny", "smollm2")}


def stage_configs(cfg: Config):
    """Each stage's config with its folders under ``cfg.root`` and wired to the previous stage."""
    r = Path(cfg.root)
    rep = dataclasses.replace
    gold = str(r / "gold.pkl")
    return (
        rep(cfg.sft, workdir=str(r / "sft"), data_dir=cfg.data_dir),
        rep(cfg.collect, workdir=str(r / "collect"), data_dir=cfg.data_dir, gold_path=gold,
            policies=(str(r / "sft" / "final"), str(r / "sft" / "half"))),
        rep(cfg.reward, workdir=str(r / "reward"), sft_dir=str(r / "sft" / "final"),
            comparisons_dir=str(r / "collect")),
        rep(cfg.ppo, workdir=str(r / "ppo"), data_dir=cfg.data_dir, gold_path=gold,
            sft_dir=str(r / "sft" / "final"), reward_dir=str(r / "reward" / "final")),
    )


def train(cfg: Config) -> dict:
    """Runs every unfinished stage; returns the pipeline summary."""
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    stages = dict(zip(("sft", "collect", "reward", "ppo"), stage_configs(cfg)))
    modules = {"sft": sft, "collect": collect, "reward": reward, "ppo": ppo}
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() \
        else {}
    results = {}
    for name, scfg in stages.items():
        done = read_summary(scfg.workdir)
        if done is not None:
            print(f"== {name}: finished earlier ({scfg.workdir}/summary.json); skipped")
            results[name] = done
            continue
        print(f"== {name} -> {scfg.workdir}")
        t0 = time.perf_counter()
        results[name] = modules[name].train(scfg)
        if "stopped_at" in results[name]:
            print(f"== {name} stopped early; re-run the same command to resume")
            return results[name]
        timings[name] = round(time.perf_counter() - t0, 1)
        (root / "timings.json").write_text(json.dumps(timings, indent=2))
    summary = headline(results, timings)
    write_summary(root, summary)
    (root / "report.md").write_text(report_md(summary, root))
    print((root / "report.md").read_text())
    return summary


def headline(results: dict, timings: dict) -> dict:
    p, r, c, s = results["ppo"], results["reward"], results["collect"], results["sft"]
    return {
        "sft_eval_perplexity": s.get("eval_perplexity"),
        "gold_scorer_review_accuracy": c.get("gold_heldout_review_accuracy"),
        "labeler_gold_agreement": c.get("train_labeler_gold_pair_agreement"),
        "rm_heldout_accuracy_vs_labeler": r.get("eval/accuracy_vs_labeler"),
        "rm_heldout_accuracy_vs_gold": r.get("eval/accuracy_vs_gold"),
        "sft_gold_positive": p["sft"]["gold"],
        "ppo_gold_positive": p["ppo"]["gold"],
        "sft_rm_score": p["sft"]["rm_score"],
        "ppo_rm_score": p["ppo"]["rm_score"],
        "ppo_kl_to_sft": p["ppo"]["kl"],
        "eval_prompts": p.get("eval_prompts"),
        "stage_seconds": timings,
        "total_seconds": round(sum(timings.values()), 1) if timings else None,
    }


def report_md(h: dict, root: Path) -> str:
    def f(x, fmt=".3f"):
        return "n/a" if x is None else format(x, fmt)

    return "\n".join([
        f"# RLHF pipeline report ({root})", "",
        "| figure | value |", "|---|---|",
        f"| SFT held-out perplexity | {f(h['sft_eval_perplexity'], '.1f')} |",
        f"| gold scorer accuracy on held-out reviews | {f(h['gold_scorer_review_accuracy'])} |",
        f"| simulated labeler agreement with gold order | {f(h['labeler_gold_agreement'])} |",
        f"| reward model held-out pair accuracy vs labeler | "
        f"{f(h['rm_heldout_accuracy_vs_labeler'])} |",
        f"| reward model held-out pair accuracy vs gold | {f(h['rm_heldout_accuracy_vs_gold'])} |",
        f"| gold P(positive), SFT policy ({h['eval_prompts']} held-out prompts) | "
        f"{f(h['sft_gold_positive'])} |",
        f"| gold P(positive), PPO policy | {f(h['ppo_gold_positive'])} |",
        f"| reward-model score, SFT -> PPO | {f(h['sft_rm_score'], '.2f')} -> "
        f"{f(h['ppo_rm_score'], '.2f')} |",
        f"| KL(PPO ‖ SFT) per response (nats) | {f(h['ppo_kl_to_sft'], '.2f')} |",
        f"| wall time per stage (s) | {h['stage_seconds']} |", "",
        "Plots: `ppo/ppo.png`, `ppo/gold_vs_kl.png`, `reward/reward.png`, `sft/loss.png`; "
        "samples: `ppo/samples.md`.", ""])


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
