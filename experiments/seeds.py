"""PPO over several seeds at once: the PPO state stacked over a seed axis and the one-iteration
program vmapped over it (:func:`rlhf_jax.ppo.vmap_seeds`), so N small runs share one compiled
program. Reports each seed's held-out figures and their mean with a 95% confidence interval.

Seed ``s`` computes what ``experiments.ppo --seed s`` computes (its sampling and minibatch keys,
its own shuffle of the training prompts) up to floating-point order: batched matmuls round
differently, and over many PPO iterations the outcomes can drift apart like any two runs whose
arithmetic differs. The SFT and reward models are shared.

Run::

    python -m experiments.seeds --preset default --seeds 5

Outputs in the workdir: ``ckpt/`` (the stacked state), ``metrics.jsonl`` (seed means, and
``seed<i>/...`` per seed for the headline keys; held-out ``eval/...`` every ``eval_every``
iterations, as ``experiments.ppo``), ``seeds.png`` (each seed's curves, and its held-out gold
against KL), ``summary.json`` (per seed and mean ± CI of gold, RM score and KL).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import ppo as ppo_stage
from rlhf_jax import parallel, ppo, stats
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.loop import check_output_dir, StatefulBatches, TrainLoop
from rlhf_jax.metrics import read_metrics
from rlhf_jax.runs import load_params_into, save_bundle, write_samples, write_summary
from rlhf_jax.tasks import get_task

PER_SEED = ("objective/kl", "objective/scores", "objective/gold")


@dataclasses.dataclass(frozen=True)
class Config(ppo_stage.Config):
    """``experiments.ppo.Config`` plus the number of seeds (``seed``, ``seed + 1``, ...)."""
    workdir: str = "runs/default/ppo_seeds"
    seeds: int = 5


PRESETS: dict[str, Config] = {
    name: Config(**{**dataclasses.asdict(c), "workdir": c.workdir + "_seeds"})
    for name, c in ppo_stage.PRESETS.items()}


def train(cfg: Config) -> dict:
    """Runs (or resumes) ``cfg.seeds`` PPO seeds at once; returns the summary."""
    return run(cfg, "ppo-seeds", build_ppo)


def build_ppo(cfg: Config, policy, critic, reward, scfg, seeds):
    """The PPO program and its states stacked over ``seeds``."""
    tx = ppo.make_optimizer(cfg)
    program = ppo.make_ppo(cfg, nnx.graphdef(policy), nnx.graphdef(critic), reward, tx, scfg)
    return program, ppo.init_seed_states(cfg, policy, critic, tx, seeds)


def run(cfg: Config, stage: str, build) -> dict:
    """The seed loop of any one-iteration program with PPO's signature (PPO, RLOO/GRPO).

    ``build(cfg, policy, critic, reward, sampling_config, seeds) -> (program, stacked
    states)``. The policy of the first seed is saved as ``final/`` (with its Hugging Face export in
    ``final/hf/``) and ``samples.md``."""
    common.check(cfg, cfg.errors() + common.positive(cfg, "seeds"))
    workdir = check_output_dir(stage, cfg.workdir)
    mesh = parallel.make_mesh(cfg.num_devices)
    policy, rm, critic, mcfg, tok, reward = ppo_stage.load_models(cfg)
    lm_def, ref_params = nnx.split(policy)
    scfg = ppo.sampling_config(cfg, tok.pad_id, ppo_stage.stop_id(cfg, tok))
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    program, states = build(cfg, policy, critic, reward, scfg, seeds)
    ref_params = parallel.replicate(jax.tree.map(jnp.copy, ref_params), mesh)
    rm_params = parallel.replicate(nnx.state(rm), mesh)
    states = parallel.replicate(states, mesh)
    task = get_task(cfg.task, cfg.data_dir)
    streams = [StatefulBatches(task.prompt_batches(tok, cfg.query_len, cfg.batch_size, s))
               for s in seeds]
    gold = common.load_gold(cfg.gold_path)
    iteration = jax.jit(ppo.vmap_seeds(program), donate_argnums=(0,))
    evaluate = ppo.make_evaluate(cfg, lm_def, reward, scfg)
    eval_tokens, eval_mask, _ = task.prompt_set("eval", tok, cfg.query_len, cfg.eval_prompts)

    def gold_of(tokens, mask):
        if gold is None:
            return None
        return float(np.mean(gold.prob(decode_rows(tok, np.asarray(tokens), np.asarray(mask)))))

    def run_eval(policy_params, s):
        ev = jax.device_get(evaluate(policy_params, ref_params, rm_params, eval_tokens, eval_mask,
                                     jax.random.key(s + 1)))
        figures = {"gold": gold_of(ev["tokens"], ev["mask"]),
                   "rm_score": float(np.mean(ev["score"])), "kl": float(np.mean(ev["kl_k1"])),
                   "kl_k3": float(np.mean(ev["kl_k3"]))}
        return figures, ev["tokens"], ev["mask"]

    def run_evals():  # every seed's policy in the current state: [(figures, tokens, mask)]
        return [run_eval(jax.tree.map(lambda x: x[i], states.params["policy"]), s)
                for i, s in enumerate(seeds)]

    class Streams:  # the loop checkpoints every seed's prompt position together
        def get_state(self):
            return [s.get_state() for s in streams]

        def set_state(self, st):
            for s, x in zip(streams, st):
                s.set_state(x)

    loop = TrainLoop(stage, workdir, cfg.iterations, checkpoint_every=cfg.checkpoint_every,
                     stop_after=cfg.stop_after, config=cfg, unit="iteration",
                     fingerprint=ppo_stage.run_fingerprint(cfg, policy, rm),
                     show=("objective/scores", "objective/gold", "objective/kl"))
    states = loop.restore(states, data=Streams())
    sft, sft_tokens, sft_mask = run_eval(ref_params, cfg.seed)
    if loop.start == 0:
        loop.log(0, eval_row([sft] * len(seeds)), force=True)
    evals = None  # each seed's latest held-out evaluation: (figures, tokens, mask)
    for it in loop.steps():
        batches = [s.next() for s in streams]
        prompts = jnp.asarray(np.stack([b["tokens"] for b in batches]))
        masks = jnp.asarray(np.stack([b["mask"] for b in batches]))
        t0 = time.perf_counter()
        states, metrics, resp, rmask = iteration(states, ref_params, rm_params, prompts, masks)
        metrics = jax.device_get(metrics)
        row = {k: float(np.mean(v)) for k, v in metrics.items()}
        row["perf/iteration_seconds"] = time.perf_counter() - t0  # all seeds; the first compiles
        for i in range(len(seeds)):
            g = gold_of(resp[i], rmask[i])
            if g is not None:
                metrics.setdefault("objective/gold", np.zeros(len(seeds)))[i] = g
        if "objective/gold" in metrics:
            row["objective/gold"] = float(np.mean(metrics["objective/gold"]))
        row.update({f"seed{i}/{k}": float(metrics[k][i]) for k in PER_SEED if k in metrics
                    for i in range(len(seeds))})
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            t0 = time.perf_counter()
            evals = run_evals()
            row.update(eval_row([e[0] for e in evals]))
            row["perf/eval_seconds"] = time.perf_counter() - t0  # every seed's evaluation
        loop.log(it, row)
        loop.end_step(it, states, data=Streams())
    loop.close()
    if not loop.finished:
        return {"stage": stage, "stopped_at": loop.last}

    if evals is None:  # a re-run after the last checkpoint: nothing ran
        evals = run_evals()
    per_seed = [e[0] for e in evals]
    summary = {"stage": stage, "seeds": seeds, "eval_prompts": int(len(eval_tokens)), "sft": sft,
               "per_seed": per_seed, "ppo": stats.summarize_seeds(per_seed),
               "config": dataclasses.asdict(cfg)}
    load_params_into(policy, nnx.to_pure_dict(
        jax.device_get(jax.tree.map(lambda x: x[0], states.params["policy"]))))
    save_bundle(workdir / "final", policy, mcfg, tok, kind="lm",
                extra={"stage": stage, "seed": seeds[0]},
                hf_config={"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    n = 12
    write_samples(workdir / "samples.md", f"SFT vs {stage} (seed {seeds[0]}) responses to the "
                  "same held-out prompts", decode_rows(tok, eval_tokens[:n], eval_mask[:n]),
                  {"SFT": decode_rows(tok, sft_tokens[:n], sft_mask[:n]),
                   stage: decode_rows(tok, evals[0][1][:n], evals[0][2][:n])}, gold)
    plot_seeds(read_metrics(workdir / "metrics.jsonl"), len(seeds), workdir, stage)
    write_summary(workdir, summary)
    g = summary["ppo"].get("gold")
    if g:
        print(f"[{stage}] held-out gold P(positive) {g['mean']:.3f} ± {g['half_width']:.3f} "
              f"(95% CI, {len(seeds)} seeds: {[round(v, 3) for v in g['values']]})")
    return summary


def eval_row(figures: list[dict]) -> dict:
    """A metrics row of held-out figures: ``seed<i>/eval/<name>`` and their means over seeds
    (``eval/gold``, ``eval/scores``, ``eval/kl_k1``, ``eval/kl_k3``: ``experiments.ppo``'s keys)."""
    row = {}
    for name, key in (("gold", "eval/gold"), ("rm_score", "eval/scores"), ("kl", "eval/kl_k1"),
                      ("kl_k3", "eval/kl_k3")):
        values = [f[name] for f in figures]
        if any(v is None for v in values):  # no gold scorer
            continue
        row[key] = float(np.mean(values))
        row.update({f"seed{i}/{key}": float(v) for i, v in enumerate(values)})
    return row


def plot_seeds(rows: list[dict], n: int, workdir: Path, stage: str) -> Path | None:
    """``seeds.png``, one colour per seed: gold and KL by iteration on the training rollouts
    (thin) and on the held-out prompts (dots, every ``eval_every``), and the held-out gold against
    the held-out KL, the path each run traces towards the gold-vs-KL frontier. Process 0 writes.
    """
    if jax.process_index() != 0:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(x, y):  # (xs, ys) over the rows holding both keys
        pts = [(r[x], r[y]) for r in rows if x in r and y in r]
        return tuple(zip(*pts)) if pts else ((), ())

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i in range(n):
        c, held = f"C{i}", dict(ms=4, color=f"C{i}", label=f"seed {i}")
        for ax, train, held_out in ((axes[0], "objective/gold", "eval/gold"),
                                    (axes[1], "objective/kl", "eval/kl_k1")):
            ax.plot(*series("step", f"seed{i}/{train}"), color=c, lw=0.8, alpha=0.45)
            ax.plot(*series("step", f"seed{i}/{held_out}"), "o-", **held)
        axes[2].plot(*series(f"seed{i}/eval/kl_k1", f"seed{i}/eval/gold"), "o-", **held)
    for ax, (xlabel, ylabel) in zip(axes, (("iteration", "gold P(positive)"),
                                           ("iteration", "KL to SFT (nats, k1)"),
                                           ("held-out KL to SFT (nats, k1)",
                                            "held-out gold P(positive)"))):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{stage} over {n} seeds (vmapped): thin = training rollouts, dots = held-out "
                 "prompts")
    fig.tight_layout()
    out = workdir / "seeds.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    """The pipeline's rows for a seeds summary: the SFT policy's figures, then each PPO figure as
    the mean over seeds, its 95% CI half-width, and every seed's value (a list)."""
    s, n, seeds = summary["sft"], summary.get("eval_prompts"), summary["seeds"]
    rows = [("sft_gold_positive", f"gold P(positive), SFT policy ({n} held-out prompts)",
             s["gold"], ".3f"),
            ("sft_rm_score", "reward-model score, SFT", s["rm_score"], ".2f")]
    for key, label, name, fmt in (
            ("ppo_gold_positive", "gold P(positive), PPO policy", "gold", ".3f"),
            ("ppo_rm_score", "reward-model score, PPO", "rm_score", ".2f"),
            ("ppo_kl_to_sft", "KL(PPO ‖ SFT) per response (nats, k1)", "kl", ".2f")):
        fig = summary["ppo"].get(name)  # None without a gold scorer
        rows += [(key, f"{label}: mean of {len(seeds)} seeds", fig and fig["mean"], fmt),
                 (f"{key}_ci95", f"{label}: 95% CI half-width (t)", fig and fig["half_width"],
                  fmt),
                 (f"{key}_per_seed", f"{label}: seeds {seeds}", fig and fig["values"], fmt)]
    return rows + [("eval_prompts", "held-out evaluation prompts", n, "d")]


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
