"""The over-optimisation frontier: gold score against KL as the proxy (reward model) is
optimised, for PPO at several KL targets, the critic-free GRPO/RLOO and DPO at several β, and
best-of-N, each over seeds (Gao et al. 2022, *Scaling Laws for Reward Model Overoptimization*).

Needs a finished pipeline root (``sft/final``, ``reward/final``, ``collect/``, ``gold.pkl``).
Every method is evaluated on the same held-out prompts: gold P(positive), reward-model score and
KL to the SFT policy (k1, nats per response). Best-of-N uses the analytic KL ``log N − (N−1)/N``
and the unbiased order-statistics estimate over M samples per prompt. Gao et al.'s forms are fitted
with ``d = √KL`` to the gain over the SFT policy: best-of-N ``R(d) = d(α − β d)``, RL
``R(d) = d(α − β log d)`` (PPO, GRPO, RLOO); the over-optimisation point is where gold peaks while
the proxy keeps rising.

Run::

    python -m experiments.frontier --root runs/default --kl-targets 2 5 10 20 --seeds 3 \
        --methods ppo bon dpo grpo

Outputs in ``<root>/frontier``: ``frontier.png``, ``frontier.md`` (table, fits, command),
``frontier.json``, ``bon_seed<s>.json`` (best-of-N curves, reused when their settings match) and one
folder per run (``ppo_kl<t>/``, ``grpo_beta<b>/``, ``rloo_beta<b>/``, ``dpo_beta<b>_seed<s>/``); a
finished run's summary is reused, so adding a method or a setting re-runs only what is new.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import sys

from flax import nnx
import jax
import numpy as np
from tqdm import tqdm

from experiments import common
from experiments import dpo as dpo_stage
from experiments import grpo as grpo_stage
from experiments import ppo as ppo_stage
from experiments import seeds as seeds_stage
from rlhf_jax import best_of_n, ppo, stats
from rlhf_jax.checkpoint import write_text_atomic
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.labelers import GoldSentimentScorer
from rlhf_jax.runs import load_bundle, read_summary
from rlhf_jax.scoring import RewardScorer
from rlhf_jax.tasks import get_task


@dataclasses.dataclass(frozen=True)
class Config:
    """Methods, settings and seeds of the frontier."""
    root: str = "runs/default"
    """A finished pipeline: ``sft/final``, ``reward/final``, ``collect/``, ``gold.pkl``."""
    preset: str = "default"
    """The stage presets the runs start from (``tiny`` for a smoke run)."""
    kl_targets: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)
    """PPO's adaptive-controller KL targets (nats)."""
    critic_free_betas: tuple[float, ...] = (0.03, 0.3, 1.0)
    """GRPO's and RLOO's fixed KL coefficients β. (An adaptive controller on GRPO's k3 loss term
    does not hold its target: at target 2 nats the KL rose to ~19 and ended at ~12.)"""
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.3)
    seeds: int = 3
    bon_prompts: int = 128
    """Held-out prompts for best-of-N (the first of PPO's evaluation prompts)."""
    bon_samples: int = 256
    """M samples per prompt; best-of-n for n = 1, 2, 4, …, ≤ M."""
    methods: tuple[str, ...] = ("ppo", "bon", "dpo", "grpo")
    """Any of ``ppo``, ``bon``, ``dpo``, ``grpo`` (KL as a k3 loss), ``rloo`` (KL in the
    reward)."""
    data_dir: str | None = None
    iterations: int | None = None
    """Override PPO's iterations (None: the preset's)."""


METHODS = ("ppo", "bon", "dpo", "grpo", "rloo")
PRESETS = {"default": Config(),
           "tiny": Config(root="runs/tiny", preset="tiny", kl_targets=(1.0, 4.0),
                          critic_free_betas=(0.1, 1.0),
                          dpo_betas=(0.1,), seeds=2, bon_prompts=8, bon_samples=16)}


# PPO's points: the adaptive controller at each KL target, starting from this β (whatever the
# stage preset's own KL penalty is).
PPO_INIT_KL_COEF = 0.1


def ppo_config(cfg: Config, out: Path, kl_target: float) -> seeds_stage.Config:
    """The seed runner's config of PPO's point at ``kl_target``: the stage preset with the
    adaptive KL controller (target ``kl_target``, initial β :data:`PPO_INIT_KL_COEF`)."""
    r = Path(cfg.root)
    return dataclasses.replace(
        seeds_stage.PRESETS[cfg.preset], workdir=str(out / f"ppo_kl{kl_target:g}"),
        adaptive_kl=True, kl_coef=PPO_INIT_KL_COEF, kl_target=kl_target, seeds=cfg.seeds,
        sft_dir=str(r / "sft/final"), reward_dir=str(r / "reward/final"),
        gold_path=str(r / "gold.pkl"), data_dir=cfg.data_dir,
        **({"iterations": cfg.iterations} if cfg.iterations else {}))


def ppo_points(cfg: Config, out: Path) -> tuple[list[dict], dict]:
    rows = []
    for t in cfg.kl_targets:
        scfg = ppo_config(cfg, out, t)
        s = read_summary(scfg.workdir) or seeds_stage.train(scfg)
        rows += [{"method": "PPO", "setting": f"KL target {t:g}", "seed": seed, **p}
                 for seed, p in zip(s["seeds"], s["per_seed"])]
        sft = s["sft"]
    return rows, sft


def dpo_points(cfg: Config, out: Path) -> list[dict]:
    r = Path(cfg.root)
    rows = []
    for b in cfg.dpo_betas:
        for seed in range(cfg.seeds):
            dcfg = dataclasses.replace(
                dpo_stage.PRESETS[cfg.preset], workdir=str(out / f"dpo_beta{b:g}_seed{seed}"),
                beta=b, seed=seed, sft_dir=str(r / "sft/final"),
                comparisons_dir=str(r / "collect"), reward_dir=str(r / "reward/final"),
                gold_path=str(r / "gold.pkl"), data_dir=cfg.data_dir)
            s = read_summary(dcfg.workdir) or dpo_stage.train(dcfg)
            rows.append({"method": "DPO", "setting": f"β {b:g}", "seed": seed, **s["dpo"]})
    return rows


def critic_free_points(cfg: Config, out: Path, advantage: str) -> tuple[list[dict], dict]:
    """GRPO (KL as a k3 loss) or RLOO (KL in the reward) at each fixed β, seeds vmapped."""
    r = Path(cfg.root)
    rows = []
    for b in cfg.critic_free_betas:
        gcfg = dataclasses.replace(
            grpo_stage.PRESETS[cfg.preset], workdir=str(out / f"{advantage}_beta{b:g}"),
            advantage=advantage, kl_in="reward" if advantage == "rloo" else "loss",
            adaptive_kl=False, kl_coef=b, seeds=cfg.seeds, sft_dir=str(r / "sft/final"),
            reward_dir=str(r / "reward/final"), gold_path=str(r / "gold.pkl"),
            data_dir=cfg.data_dir, **({"iterations": cfg.iterations} if cfg.iterations else {}))
        s = read_summary(gcfg.workdir) or grpo_stage.train(gcfg)
        rows += [{"method": advantage.upper(), "setting": f"β {b:g}", "seed": seed, **p}
                 for seed, p in zip(s["seeds"], s["per_seed"])]
        sft = s["sft"]
    return rows, sft


def bon_points(cfg: Config, out: Path) -> list[dict]:
    """Best-of-n rows for n = 1, 2, 4, … ≤ M, per seed: M fresh samples per prompt of the SFT
    policy for each seed (each seed's curve is cached in ``bon_seed<s>.json`` with the settings
    that made it)."""
    settings = {"prompts": cfg.bon_prompts, "samples": cfg.bon_samples, "preset": cfg.preset}
    rows, todo = [], []
    for seed in range(cfg.seeds):
        cache = out / f"bon_seed{seed}.json"
        saved = json.loads(cache.read_text()) if cache.exists() else {}
        if saved.get("settings") == settings:
            rows += saved["rows"]
        else:
            todo.append(seed)
    if todo:
        sample_curve = _bon_sampler(cfg)
        for seed in todo:
            curve = sample_curve(seed)
            seed_rows = [{"method": "best-of-N", "setting": f"N={x['n']}", "seed": seed,
                          "kl": x["kl"], "gold": x["gold"], "rm_score": x["proxy"]}
                         for x in curve]
            write_json(out / f"bon_seed{seed}.json", {"settings": settings, "rows": seed_rows})
            rows += seed_rows
    return sorted(rows, key=lambda x: (int(x["setting"][2:]), x["seed"]))


def _bon_sampler(cfg: Config):
    """``curve(seed)``: the best-of-n curve from ``bon_samples`` fresh samples per prompt."""
    r = Path(cfg.root)
    pcfg = ppo_stage.PRESETS[cfg.preset]
    policy, _, tok, _ = load_bundle(r / "sft/final", kind="lm", compute_dtype=pcfg.compute_dtype)
    rm, _, _, meta = load_bundle(r / "reward/final", kind="scalar",
                                 compute_dtype=pcfg.compute_dtype)
    reward = RewardScorer(nnx.graphdef(rm), tok.eos_id, meta.get("pool", "last"))
    gold = GoldSentimentScorer.load(r / "gold.pkl")
    tokens, mask, _ = get_task(pcfg.task, cfg.data_dir).prompt_set(
        "eval", tok, pcfg.query_len, cfg.bon_prompts)
    lm_def, params = nnx.split(policy)
    scfg = ppo.sampling_config(pcfg, tok.pad_id, None)
    sample = jax.jit(best_of_n.sample_scored, static_argnums=(0, 2, 7, 8))

    def curve(seed: int) -> list[dict]:
        proxy, gold_scores = [], []
        for i in tqdm(range(len(tokens)), desc=f"best-of-{cfg.bon_samples}, seed {seed}"):
            # one prompt at a time: its M samples in one batch
            key = jax.random.fold_in(jax.random.key(seed), i)
            t, m, s = jax.device_get(sample(lm_def, params, reward, nnx.state(rm),
                                            tokens[i:i + 1], mask[i:i + 1], key, scfg,
                                            cfg.bon_samples))
            proxy.append(s[0])
            gold_scores.append(gold.prob(decode_rows(tok, t[0], m[0])))
        return best_of_n.curve(np.array(proxy), np.array(gold_scores),
                               ns=[2 ** k for k in range(9) if 2 ** k <= cfg.bon_samples])

    return curve


def train(cfg: Config, argv: list[str] | None = None) -> dict:
    bad = [m for m in cfg.methods if m not in METHODS]
    common.check(cfg, [f"methods={cfg.methods!r}: {m!r} is not one of {METHODS}" for m in bad]
                 + common.positive(cfg, "seeds", "bon_prompts", "bon_samples"))
    out = Path(cfg.root) / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    rows, sft = [], None
    if "ppo" in cfg.methods:
        ppo_rows, sft = ppo_points(cfg, out)
        rows += ppo_rows
    if "bon" in cfg.methods:
        rows += bon_points(cfg, out)
    if "dpo" in cfg.methods:
        rows += dpo_points(cfg, out)
    for advantage in ("grpo", "rloo"):
        if advantage in cfg.methods:
            cf_rows, sft = critic_free_points(cfg, out, advantage)
            rows += cf_rows
    # the SFT policy on the evaluation prompts (any RL run evaluates it); else best-of-1
    start = sft or {k: np.mean([x[k] for x in rows if x["setting"] == "N=1"])
                    for k in ("gold", "rm_score")}
    g0, r0 = float(start["gold"]), float(start["rm_score"])
    fits = fit_forms(rows, g0, r0)
    result = {"rows": rows, "sft": {"gold": g0, "rm_score": r0}, "fits": fits,
              "table": table(rows), "command": command(argv)}
    write_json(out / "frontier.json", result)
    plot(rows, fits, g0, r0, out / "frontier.png")
    (out / "frontier.md").write_text(markdown(result))
    print((out / "frontier.md").read_text())
    return result


def fit_forms(rows, g0, r0) -> dict:
    """Gao et al.'s forms fitted to the gain over SFT, with ``d = √KL``; over-optimisation
    points."""
    fits = {}
    forms = [("best-of-N", "bon", stats.fit_bon, stats.peak_bon)] + [
        (m, "rl", stats.fit_rl, stats.peak_rl) for m in ("PPO", "GRPO", "RLOO")]
    for method, form, fit, peak in forms:
        pts = [x for x in rows if x["method"] == method and x["kl"] > 0]
        if len({x["setting"] for x in pts}) < 2:
            continue  # one setting (or none with KL > 0): nothing to fit a curve to
        d = np.sqrt([x["kl"] for x in pts])
        for key, base in (("gold", g0), ("rm_score", r0)):
            if method == "best-of-N":  # its own N=1 (its prompts are a subset of the eval set)
                base = float(np.mean([x[key] for x in rows
                                      if x["method"] == method and x["setting"] == "N=1"]))
            try:
                a, b = fit(d, np.array([x[key] for x in pts]) - base)
            except ValueError as e:  # e.g. every point at the same KL
                print(f"[frontier] {method}/{key}: not fitted ({e})")
                continue
            fits[f"{method}/{key}"] = {"form": form, "alpha": a, "beta": b, "base": base,
                                       "peak_sqrt_kl": peak(a, b)}
        # the peak of the mean curve over seeds (one point per setting)
        means = [[np.mean([x[k] for x in pts if x["setting"] == st])
                  for k in ("kl", "gold", "rm_score")]
                 for st in dict.fromkeys(x["setting"] for x in pts)]
        fits[f"{method}/overoptimization_kl"] = stats.overoptimization_point(*zip(*means))
    return fits


def table(rows) -> list[dict]:
    """One row per method and setting: mean ± 95% CI over seeds of KL, gold and RM score."""
    out = []
    for key in dict.fromkeys((x["method"], x["setting"]) for x in rows):
        runs = [x for x in rows if (x["method"], x["setting"]) == key]
        s = stats.summarize_seeds([{k: x[k] for k in ("kl", "gold", "rm_score")} for x in runs])
        out.append({"method": key[0], "setting": key[1], "n": len(runs), **s})
    return out


def _fmt(s) -> str:
    if s["n"] == 1 or not np.isfinite(s["half_width"]):
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['half_width']:.3f}"


def markdown(result) -> str:
    lines = ["# Over-optimisation frontier", "", f"Command: `{result['command']}`", "",
             f"SFT policy: gold {result['sft']['gold']:.3f}, RM score "
             f"{result['sft']['rm_score']:.2f}. Mean ± 95% CI over seeds (n runs).", "",
             "| method | setting | n | KL (nats) | gold P(positive) | RM score |",
             "|---|---|---|---|---|---|"]
    for t in result["table"]:
        lines.append(f"| {t['method']} | {t['setting']} | {t['n']} | {_fmt(t['kl'])} | "
                     f"{_fmt(t['gold'])} | {_fmt(t['rm_score'])} |")
    lines += ["", "Fits of the gain over the starting point (SFT; best-of-N: its own N=1), "
              "d = √KL: best-of-N d(α − βd), RL d(α − β log d)", "",
              "| curve | α | β | d at the peak |", "|---|---|---|---|"]
    for k, f in result["fits"].items():
        if isinstance(f, dict):
            lines.append(f"| {k} | {f['alpha']:.4f} | {f['beta']:.4f} | "
                         f"{f['peak_sqrt_kl']:.2f} |")
    for k, f in result["fits"].items():
        if not isinstance(f, dict):
            lines.append(f"\n{k.split('/')[0]} over-optimisation point (gold peaks, RM still "
                         f"rising): {'none in range' if f is None else f'KL {f:.2f} nats'}")
    return "\n".join(lines) + "\n"


def plot(rows, fits, g0, r0, path: Path) -> None:
    """Each run as a faint dot, each setting's mean over seeds with its 95% CI, and the fits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"PPO": "C0", "best-of-N": "C1", "DPO": "C2", "GRPO": "C3", "RLOO": "C4"}
    means = table(rows)
    for ax, key, base, label in ((axes[0], "gold", g0, "gold P(positive)"),
                                 (axes[1], "rm_score", r0, "reward-model score")):
        for method, c in colors.items():
            pts = [x for x in rows if x["method"] == method]
            if not pts:
                continue
            d = np.sqrt(np.maximum([x["kl"] for x in pts], 0))
            ax.scatter(d, [x[key] for x in pts], color=c, s=8, alpha=0.3)
            m = sorted((t for t in means if t["method"] == method), key=lambda t: t["kl"]["mean"])
            half = [0 if t["n"] < 2 else t[key]["half_width"] for t in m]
            ax.errorbar(np.sqrt(np.maximum([t["kl"]["mean"] for t in m], 0)),
                        [t[key]["mean"] for t in m], yerr=half, color=c, marker="o", ms=4,
                        lw=0 if f"{method}/{key}" in fits else 0.8, elinewidth=0.8, capsize=2,
                        label=method)
            f = fits.get(f"{method}/{key}")
            if f:
                grid = np.linspace(1e-3, d.max() * 1.1, 100)
                form = stats.gao_bon if f["form"] == "bon" else stats.gao_rl
                ax.plot(grid, f["base"] + form(grid, f["alpha"], f["beta"]), color=c, lw=1)
        ax.axhline(base, color="gray", lw=0.6, ls=":")
        ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Gold vs proxy as the reward model is optimised (mean ± 95% CI over seeds; "
                 "lines: Gao et al. fits)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float))


def command(argv) -> str:
    return "python -m experiments.frontier " + " ".join(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
