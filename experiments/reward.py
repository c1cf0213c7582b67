"""Stage 3 — the reward model: Bradley–Terry loss over every pair a ranking implies.

The reward model is the SFT backbone with a scalar head (lm-human-preferences init), scoring
``prompt + response + EOS`` at the EOS. Loss: InstructGPT's all-pairs Bradley–Terry loss with each
prompt weighted once (``loss=ranking``), or lm-human-preferences' best-of-K softmax
(``loss=best_of_k``). After training, the head's gain/bias are set so the scores of the SFT
policy's samples have mean 0 and std 1 (reward normalisation).

Run::

    python -m experiments.reward --preset default
    python -m experiments.reward --preset default --seeds 3 --workdir runs/default/reward_seeds

Reports held-out pairwise accuracy against the labeler's ranks and against the gold scorer's order.
Outputs: ``ckpt/``, ``metrics.jsonl``, ``tensorboard/``, ``reward.png``, ``summary.json``,
``final/``.
"""
from __future__ import annotations

import dataclasses
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from rlhf_jax import losses, parallel, rl, stats
from rlhf_jax.checkpoint import files_digest, tree_digest
from rlhf_jax.loop import check_output_dir, fingerprint, StatefulBatches, TrainLoop
from rlhf_jax.metrics import plot_curves, read_metrics
from rlhf_jax.runs import (load_bundle, load_params_into, params_of, read_summary, save_bundle,
                           write_summary, writing_dir)
from rlhf_jax.scoring import POOLS, RewardScorer


@dataclasses.dataclass(frozen=True)
class Config:
    """Reward-model training."""
    workdir: str = "runs/default/reward"
    sft_dir: str = "runs/default/sft/final"
    """Backbone initialisation (an SFT run's ``final/``)."""
    comparisons_dir: str = "runs/default/collect"
    """Folder with ``train.jsonl`` / ``eval.jsonl`` comparisons (or ``.jsonl.gz``)."""
    normalize_policy: str = "sft/final"
    """Responses whose scores are normalised to mean 0, std 1: the comparisons' policy names
    starting with this (the SFT policy's samples)."""
    loss: str = "ranking"
    """``ranking`` (all K(K-1)/2 pairs, InstructGPT) or ``best_of_k`` (lm-human-preferences)."""
    pool: str = "last"
    """How the per-token head outputs become one score: ``last`` reads the EOS after the response
    (InstructGPT); ``mean`` averages over the response tokens and the EOS — a bag-of-tokens reward
    that a small model learns from few comparisons. PPO scores rollouts the same way."""
    max_len: int = 48
    """Tokens of prompt + response + EOS."""
    batch_size: int = 32
    """Prompts per step (each with K responses)."""
    epochs: int = 2
    """Passes over the comparisons: 2 over the default's 6 responses per prompt take the time 3
    took over 4."""
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    compute_dtype: str = "float32"
    checkpoint_every: int = 100
    log_every: int = 10
    wandb: bool = False
    """Also log to Weights & Biases (offline; needs ``pip install wandb``)."""
    seed: int = 0
    seeds: int = 1
    """Independent reward models (seeds ``seed``, ``seed + 1``, …: head initialisation and
    data order), trained one after another into ``<workdir>/seed<s>/``; the workdir's
    ``summary.json`` then gives each seed's held-out accuracies and their mean ± 95% CI, and
    ``final/`` is the first seed's model. 1: one model in the workdir itself."""
    mesh: str | None = None
    """Device mesh, e.g. ``data=2,fsdp=4`` (axes ``data``, ``fsdp``, ``tensor``: parameters and
    optimizer state sharded over ``fsdp``, batches over ``data × fsdp``); None: every device on
    the data axis, parameters replicated."""

    def errors(self) -> list[str]:
        return (parallel.mesh_errors(self.mesh)
                + common.positive(self, "max_len", "batch_size", "epochs", "checkpoint_every",
                                  "log_every", "seeds")
                + common.finite_positive(self, "learning_rate")
                + common.one_of(self, "loss", ("ranking", "best_of_k"))
                + common.one_of(self, "pool", POOLS)
                + common.one_of(self, "compute_dtype", ("float32", "bfloat16")))


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(workdir="runs/tiny/reward", sft_dir="runs/tiny/sft/final",
                   comparisons_dir="runs/tiny/collect", max_len=24, batch_size=8, epochs=2,
                   checkpoint_every=2, log_every=1, compute_dtype="float32"),
    "smollm2": Config(workdir="runs/smollm2/reward", sft_dir="runs/smollm2/sft/final",
                      comparisons_dir="runs/smollm2/collect", max_len=80, batch_size=16,
                      learning_rate=1e-5, compute_dtype="bfloat16"),
}


def make_steps(graphdef, tx, loss: str, pool: str = "last", eos_id: int = 0, mesh=None):
    """``(train_step, score_fn)`` for ``tokens/mask/response_mask [B, K, T]`` + ``ranks/valid
    [B, K]`` batches; scores come from :class:`rlhf_jax.scoring.RewardScorer`, the definition
    PPO and evaluation use too. With a ``mesh``, parameters and optimizer state keep the
    partition rules' shardings."""
    scorer = RewardScorer(graphdef, eos_id, pool)

    def scores(params, tokens_bkt, mask_bkt, response_mask_bkt):
        b, k, t = tokens_bkt.shape
        flat = [x.reshape(b * k, t) for x in (tokens_bkt, mask_bkt, response_mask_bkt)]
        return scorer.score_tokens(params, *flat).reshape(b, k)

    def loss_fn(params, batch):
        r_bk = scores(params, batch["tokens"], batch["mask"], batch["response_mask"])
        if loss == "ranking":
            return losses.ranking_loss(r_bk, batch["ranks"], batch["valid"])
        best = jnp.argmin(jnp.where(batch["valid"], batch["ranks"], jnp.iinfo(jnp.int32).max), 1)
        return losses.best_of_k_loss(r_bk, best, batch["valid"])

    def train_step(params, opt_state, batch):
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        m["rm/grad_norm"] = optax.tree.norm(grads)
        return parallel.constrain((optax.apply_updates(params, updates), opt_state), mesh) + (m,)

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(scores)


def score_split(score_fn, params, source, tok, cfg: Config, mesh,
                progress: str | None = None) -> tuple[np.ndarray, list]:
    """RM scores ``[N, K]`` of every example of a comparisons split, in order, and the records
    (``score_fn`` may return more axes, e.g. features ``[B, K, D]``). ``progress``: a label for a
    progress bar."""
    from rlhf_jax.data import batching, comparisons
    n_dev = parallel.batch_devices(mesh)
    bs = max(n_dev, cfg.batch_size - cfg.batch_size % n_dev)
    b = batching.comparison_batches(source, tok, max_len=cfg.max_len, overlong="truncate",
                                    cfg=batching.LoaderConfig(bs, shuffle=False,
                                                              drop_remainder=False,
                                                              shard_by_process=False))
    out = []
    if progress:
        from tqdm.auto import tqdm
        b = tqdm(b, desc=progress, total=-(-len(source) // bs), dynamic_ncols=True)
    for batch in b:
        x = batching.arrays_only(batch)
        n = len(x["tokens"])
        pad = (-n) % n_dev
        t, m, r = (np.concatenate([x[k], x[k][:1].repeat(pad, 0)])
                   for k in ("tokens", "mask", "response_mask"))
        out.append(parallel.to_host(score_fn(params, *parallel.shard_batch((t, m, r), mesh)))[:n])
    records = [comparisons.decode_comparison(source[i]) for i in range(len(source))]
    return np.concatenate(out), records


def pairwise_accuracy(scores_nk: np.ndarray, order_nk: np.ndarray, higher_is_better: bool) -> float:
    """Fraction of untied pairs ordered like ``order`` (ranks: lower better; gold: higher)."""
    i, j = np.triu_indices(scores_nk.shape[1], 1)
    o = order_nk if higher_is_better else -order_nk
    untied = o[:, i] != o[:, j]
    agree = (scores_nk[:, i] > scores_nk[:, j]) == (o[:, i] > o[:, j])
    return float(agree[untied].mean())


ACCURACIES = ("eval/accuracy_vs_labeler", "eval/accuracy_vs_gold", "train/accuracy_vs_labeler",
              "train/accuracy_vs_gold")


def train(cfg: Config) -> dict:
    """Trains (or resumes) the reward model, or ``cfg.seeds`` of them; returns the summary."""
    common.check(cfg, cfg.errors())
    return train_seeds(cfg) if cfg.seeds > 1 else _train(cfg)


def train_seeds(cfg: Config) -> dict:
    """``cfg.seeds`` reward models, one after another (a finished seed is kept), and the
    summary of their held-out accuracies: per seed, and mean ± 95% CI (whose means are also the
    summary's top-level figures, so the pipeline's headline reads them)."""
    workdir = check_output_dir("reward-seeds", cfg.workdir)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    runs = []
    for s in seeds:
        one = dataclasses.replace(cfg, seed=s, seeds=1, workdir=str(workdir / f"seed{s}"))
        runs.append(read_summary(one.workdir) or _train(one))
    per_seed = [{k: r[k] for k in ACCURACIES if k in r} for r in runs]
    across = stats.summarize_seeds(per_seed)
    summary = {"stage": "reward-seeds", "seeds": seeds, "per_seed": per_seed, "reward": across,
               **{k: v["mean"] for k, v in across.items()}, "config": dataclasses.asdict(cfg)}
    with writing_dir(workdir / "final") as tmp:
        shutil.copytree(workdir / f"seed{seeds[0]}" / "final", tmp, dirs_exist_ok=True)
    write_summary(workdir, summary)
    for k, v in across.items():
        print(f"[reward] {k}: {v['mean']:.3f} ± {v['half_width']:.3f} (95% CI, {len(seeds)} "
              f"seeds: {[round(x, 3) for x in v['values']]})")
    return summary


def _train(cfg: Config) -> dict:
    from rlhf_jax.data import batching, comparisons  # grain/TFDS: only needed to train

    workdir = check_output_dir("reward", cfg.workdir)
    mesh = parallel.make_mesh(spec=cfg.mesh)
    rm, mcfg, tok, _ = load_bundle(cfg.sft_dir, kind="scalar", compute_dtype=cfg.compute_dtype)
    # The run's identity: the config (not the epochs) + the comparisons + the initial weights.
    files = [f for fs in comparisons.split_files(cfg.comparisons_dir).values() for f in fs]
    fp = fingerprint(cfg, exclude=("epochs", "sft_dir", "comparisons_dir"),
                     data={"comparisons": files_digest(files), "sft": tree_digest(params_of(rm))})
    for first in (True, False):  # process 0 builds the dataset; the others then reuse it
        if parallel.is_main() == first:
            _, sources = comparisons.build_comparisons(cfg.comparisons_dir, str(workdir / "tfds"))
        parallel.sync(f"reward-comparisons-{first}")
    # Every ranking tied would train to loss 0 and save an untrained model: refuse instead.
    comparisons.require_untied_pairs(sources["train"], f"{cfg.comparisons_dir}/train")
    train_src = sources["train"]
    k = len(comparisons.decode_comparison(train_src[0])["responses"])
    loader = StatefulBatches(batching.comparison_batches(
        train_src, tok, max_len=cfg.max_len, num_responses=k, overlong="truncate",
        cfg=batching.LoaderConfig(cfg.batch_size, seed=cfg.seed, num_epochs=None)))
    steps = max(1, cfg.epochs * len(train_src) // cfg.batch_size)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(steps, cfg.warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))
    graphdef, params = nnx.split(rm)
    params = parallel.shard(params, mesh)
    opt_state = parallel.shard(tx.init(params), mesh)
    train_step, score_fn = make_steps(graphdef, tx, cfg.loss, cfg.pool, tok.eos_id, mesh)

    loop = TrainLoop("reward", workdir, steps, checkpoint_every=cfg.checkpoint_every,
                     log_every=cfg.log_every, show=("rm/loss", "rm/accuracy"), wandb=cfg.wandb,
                     config=cfg, fingerprint=fp)
    params, opt_state = loop.restore((params, opt_state), data=loader)
    memory = None
    for step in loop.steps():
        batch = batching.arrays_only(loader.next())
        batch = parallel.shard_batch({key: batch[key] for key in ("tokens", "mask",
                                                                  "response_mask", "ranks",
                                                                  "valid")}, mesh)
        if memory is None:  # compiled once, with XLA's per-device memory analysis
            train_step, memory = parallel.compile_with_memory(train_step, params, opt_state,
                                                              batch)
            common.remember_memory(workdir, "train_step", memory)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        loop.check_finite(step, metrics, ("rm/loss", "rm/grad_norm"))
        loop.log(step, metrics)
        loop.end_step(step, (params, opt_state), data=loader)
    loop.close()
    parallel.sync("reward-trained")  # process 0 has written every metrics row
    print(loader.batches.report.summary())

    # Held-out accuracy, then reward normalisation on the SFT policy's samples.
    summary = {"stage": "reward", "steps": steps, "loss": cfg.loss,
               "config": dataclasses.asdict(cfg),
               "memory": {"train_step": common.remember_memory(workdir, "train_step", memory)}}
    for split in sources:
        s, recs = score_split(score_fn, params, sources[split], tok, cfg, mesh)
        ranks = np.array([r["ranks"] for r in recs])
        summary[f"{split}/accuracy_vs_labeler"] = pairwise_accuracy(s, ranks, False)
        if all("gold_scores" in r for r in recs):
            gold = np.array([r["gold_scores"] for r in recs])
            summary[f"{split}/accuracy_vs_gold"] = pairwise_accuracy(s, gold, True)
        if split == "train":
            cols = [j for j, p in enumerate(recs[0]["policies"])
                    if p.startswith(cfg.normalize_policy)]
            ref = s[:, cols or list(range(s.shape[1]))].reshape(-1)
    params = parallel.to_host(params)
    head = params["head"]
    gain, bias = rl.normalization_gain_bias(jnp.asarray(ref), head["gain"][...], head["bias"][...])
    summary["normalization"] = {"before_mean": float(ref.mean()), "before_std": float(ref.std()),
                                "gain": float(gain), "bias": float(bias)}
    pure = nnx.to_pure_dict(params)
    pure["head"]["gain"], pure["head"]["bias"] = np.asarray(gain), np.asarray(bias)
    load_params_into(rm, pure)
    save_bundle(workdir / "final", rm, mcfg, tok, kind="scalar", head_init="reward",
                extra={"stage": "reward", "pool": cfg.pool})
    rows = read_metrics(workdir / "metrics.jsonl")
    plot_curves(rows, [("Bradley–Terry loss", "rm/loss"), ("train pair accuracy", "rm/accuracy")],
                workdir / "reward.png", title="reward model")
    write_summary(workdir, summary)
    print(f"[reward] held-out accuracy vs labeler {summary.get('eval/accuracy_vs_labeler', 0):.3f}"
          f", vs gold {summary.get('eval/accuracy_vs_gold', float('nan')):.3f}")
    return summary


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    """Held-out pair accuracy vs labeler and vs gold; over seeds, their means and every seed's."""
    rows = []
    for key, label, metric in (
            ("rm_heldout_accuracy_vs_labeler", "reward model held-out pair accuracy vs labeler",
             "eval/accuracy_vs_labeler"),
            ("rm_heldout_accuracy_vs_gold", "reward model held-out pair accuracy vs gold",
             "eval/accuracy_vs_gold")):
        if "per_seed" not in summary:
            rows.append((key, label, summary.get(metric), ".3f"))
            continue
        seeds = summary["seeds"]
        rows += [(key, f"{label}: mean of {len(seeds)} seeds", summary.get(metric), ".3f"),
                 (f"{key}_per_seed", f"{label}: seeds {seeds}",
                  [s.get(metric) for s in summary["per_seed"]], ".3f")]
    return rows


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
