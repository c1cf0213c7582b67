"""DPO — the policy learns from the comparisons directly, with no reward model and no sampling
during training (Rafailov et al. 2023; ``--loss-type ipo``: Azar et al. 2023).

Starts from the SFT bundle (policy; a frozen copy is the reference) and trains on every pair the
collected rankings imply (as the reward stage builds them). The algorithm is :mod:`rlhf_jax.dpo`.
Evaluation, as for PPO on the same held-out prompts: the implicit reward's preference accuracy
on held-out pairs, and the policy's samples scored by the gold scorer (and the reward model, when
``reward_dir`` exists, for the over-optimisation frontier), with the KL to the SFT policy.

Run::

    python -m experiments.dpo --preset default --beta 0.1

Outputs: ``ckpt/``, ``metrics.jsonl``, ``tensorboard/``, ``dpo.png``, ``summary.json``,
``final/`` (the policy bundle).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from rlhf_jax import dpo, parallel, ppo
from rlhf_jax.checkpoint import files_digest, tree_digest
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.loop import check_output_dir, fingerprint, StatefulBatches, TrainLoop
from rlhf_jax.metrics import plot_curves, read_metrics
from rlhf_jax.runs import load_bundle, load_params_into, params_of, save_bundle, write_summary
from rlhf_jax.scoring import RewardScorer
from rlhf_jax.tasks import get_task


@dataclasses.dataclass(frozen=True)
class Config(dpo.DPOConfig):
    """DPO (hyper-parameters: ``rlhf_jax.dpo.DPOConfig``) and where it runs."""
    workdir: str = "runs/default/dpo"
    sft_dir: str = "runs/default/sft/final"
    """Policy and reference initialisation (an SFT run's ``final/``)."""
    comparisons_dir: str = "runs/default/collect"
    reward_dir: str | None = "runs/default/reward/final"
    """Reward model for evaluation only (None or missing: no RM score)."""
    gold_path: str | None = "runs/default/gold.pkl"
    task: str = "imdb"
    data_dir: str | None = None
    max_len: int = 48
    """Tokens of prompt + response + EOS."""
    batch_size: int = 32
    """Pairs per step."""
    epochs: int = 1
    query_len: int = 16
    """Evaluation: prompt tokens and sampled response tokens, as PPO."""
    response_len: int = 24
    temperature: float = 1.0
    eval_prompts: int = 256
    compute_dtype: str = "float32"
    checkpoint_every: int = 200
    log_every: int = 10
    wandb: bool = False
    seed: int = 0

    def errors(self) -> list[str]:
        return (self.dpo_errors()
                + common.positive(self, "max_len", "batch_size", "epochs", "query_len",
                                  "response_len", "eval_prompts", "checkpoint_every", "log_every")
                + common.one_of(self, "compute_dtype", ("float32", "bfloat16")))


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(workdir="runs/tiny/dpo", sft_dir="runs/tiny/sft/final",
                   comparisons_dir="runs/tiny/collect", reward_dir="runs/tiny/reward/final",
                   gold_path="runs/tiny/gold.pkl", max_len=24, batch_size=8, epochs=2,
                   query_len=8, response_len=8, eval_prompts=16, checkpoint_every=4, log_every=1,
                   learning_rate=1e-3, warmup_steps=2),
    "smollm2": Config(workdir="runs/smollm2/dpo", sft_dir="runs/smollm2/sft/final",
                      comparisons_dir="runs/smollm2/collect",
                      reward_dir="runs/smollm2/reward/final", gold_path="runs/smollm2/gold.pkl",
                      max_len=80, batch_size=16, learning_rate=1e-6, query_len=32,
                      response_len=32, temperature=0.7, eval_prompts=128,
                      compute_dtype="bfloat16"),
}


def pair_batches(source, tok, cfg: Config, shuffle: bool, epochs):
    from rlhf_jax.data import batching
    return batching.comparison_batches(
        source, tok, max_len=cfg.max_len, pairs=True, overlong="truncate",
        cfg=batching.LoaderConfig(cfg.batch_size, seed=cfg.seed, num_epochs=epochs,
                                  shuffle=shuffle, drop_remainder=shuffle,
                                  shard_by_process=shuffle))


def heldout_pairs(evaluate, params, ref_params, source, tok, cfg: Config) -> dict:
    """The implicit reward's metrics over every held-out pair (example-weighted)."""
    from rlhf_jax.data import batching
    sums, n = {}, 0
    for batch in pair_batches(source, tok, cfg, shuffle=False, epochs=1):
        x = batching.arrays_only(batch)
        m = jax.device_get(evaluate(params, ref_params, {k: x[k] for k in (
            "tokens", "mask", "response_mask", "valid")}))
        b = len(x["tokens"])
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
    return {f"eval/{k.split('/')[-1]}": v / n for k, v in sums.items()}


def train(cfg: Config) -> dict:
    from rlhf_jax.data import batching, comparisons

    common.check(cfg, cfg.errors())
    workdir = check_output_dir("dpo", cfg.workdir)
    mesh = parallel.make_mesh()
    policy, mcfg, tok, _ = load_bundle(cfg.sft_dir, kind="lm", compute_dtype=cfg.compute_dtype)
    # The run's identity: the config (not the epochs or paths) + the comparisons + the SFT weights.
    files = [f for fs in comparisons.split_files(cfg.comparisons_dir).values() for f in fs]
    fp = fingerprint(cfg, exclude=("epochs", "sft_dir", "comparisons_dir", "reward_dir",
                                   "gold_path"),
                     data={"comparisons": files_digest(files),
                           "sft": tree_digest(params_of(policy))})
    _, sources = comparisons.build_comparisons(cfg.comparisons_dir, str(workdir / "tfds"))
    comparisons.require_untied_pairs(sources["train"], f"{cfg.comparisons_dir}/train")
    loader = StatefulBatches(pair_batches(sources["train"], tok, cfg, shuffle=True, epochs=None))
    steps = max(1, cfg.epochs * loader.batches.num_examples // cfg.batch_size)
    lm_def, params = nnx.split(policy)
    ref_params = parallel.replicate(jax.tree.map(jnp.copy, params), mesh)
    tx = dpo.make_optimizer(cfg)
    params = parallel.replicate(params, mesh)
    opt_state = parallel.replicate(tx.init(params), mesh)
    train_step, evaluate = (jax.jit(f) for f in dpo.make_dpo(cfg, lm_def, tx))

    loop = TrainLoop("dpo", workdir, steps, checkpoint_every=cfg.checkpoint_every,
                     log_every=cfg.log_every, show=("dpo/loss", "dpo/accuracy"),
                     wandb=cfg.wandb, config=cfg, fingerprint=fp)
    params, opt_state = loop.restore((params, opt_state), data=loader)
    before = heldout_pairs(evaluate, params, ref_params, sources["eval"], tok, cfg) \
        if loop.start == 0 and "eval" in sources else None
    for step in loop.steps():
        x = batching.arrays_only(loader.next())
        batch = parallel.shard_batch({k: x[k] for k in ("tokens", "mask", "response_mask",
                                                        "valid")}, mesh)
        params, opt_state, metrics = train_step(params, opt_state, ref_params, batch)
        loop.check_finite(step, jax.device_get(metrics), ("dpo/loss", "dpo/grad_norm"))
        loop.log(step, metrics)
        loop.end_step(step, (params, opt_state), data=loader)
    loop.close()
    if not loop.finished:
        return {"stage": "dpo", "stopped_at": loop.last}

    summary = {"stage": "dpo", "steps": steps, "pairs": loader.batches.num_examples,
               "config": dataclasses.asdict(cfg)}
    if "eval" in sources:
        summary["heldout_before"] = before
        summary["heldout"] = heldout_pairs(evaluate, params, ref_params, sources["eval"], tok, cfg)
    summary.update(evaluate_policy(cfg, lm_def, params, ref_params, tok, mesh))
    load_params_into(policy, nnx.to_pure_dict(jax.device_get(params)))
    save_bundle(workdir / "final", policy, mcfg, tok, kind="lm", extra={"stage": "dpo"})
    rows = read_metrics(workdir / "metrics.jsonl")
    plot_curves(rows, [("DPO loss", "dpo/loss"), ("train pair accuracy", "dpo/accuracy"),
                       ("implicit reward margin", "dpo/margin")], workdir / "dpo.png",
                title=f"DPO (β={cfg.beta}, {cfg.loss_type})")
    write_summary(workdir, summary)
    print(f"[dpo] held-out implicit-reward accuracy "
          f"{(summary.get('heldout') or {}).get('eval/accuracy')}; gold "
          f"{summary['sft']['gold']} -> {summary['dpo']['gold']}, KL {summary['dpo']['kl']:.2f}")
    return summary


def evaluate_policy(cfg: Config, lm_def, params, ref_params, tok, mesh) -> dict:
    """Gold (and RM) score and KL to SFT of the SFT and the trained policy's samples on the same
    held-out prompts as PPO."""
    reward, rm_params = None, None
    if cfg.reward_dir and (Path(cfg.reward_dir) / "model.json").exists():
        rm, _, _, meta = load_bundle(cfg.reward_dir, kind="scalar",
                                     compute_dtype=cfg.compute_dtype)
        reward = RewardScorer(nnx.graphdef(rm), tok.eos_id, meta.get("pool", "last"))
        rm_params = parallel.replicate(nnx.state(rm), mesh)
    gold = common.load_gold(cfg.gold_path)
    pcfg = ppo.PPOConfig(query_len=cfg.query_len, response_len=cfg.response_len,
                         temperature=cfg.temperature, seed=cfg.seed)
    scfg = ppo.sampling_config(pcfg, tok.pad_id, None)
    evaluate = ppo.make_evaluate(pcfg, lm_def, reward, scfg)
    tokens, mask, _ = get_task(cfg.task, cfg.data_dir).prompt_set("eval", tok, cfg.query_len,
                                                                  cfg.eval_prompts)
    out = {}
    for name, p in (("sft", ref_params), ("dpo", params)):
        ev = jax.device_get(evaluate(p, ref_params, rm_params, tokens, mask,
                                     jax.random.key(cfg.seed + 1)))
        texts = decode_rows(tok, np.asarray(ev["tokens"]), np.asarray(ev["mask"]))
        out[name] = {"gold": float(np.mean(gold.prob(texts))) if gold else None,
                     "rm_score": float(np.mean(ev["score"])) if "score" in ev else None,
                     "kl": float(np.mean(ev["kl_k1"])), "kl_k3": float(np.mean(ev["kl_k3"]))}
    return out


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    return [("dpo_gold_positive", "gold P(positive), DPO policy", summary["dpo"]["gold"], ".3f"),
            ("dpo_kl_to_sft", "KL(DPO ‖ SFT) per response (nats, k1)", summary["dpo"]["kl"],
             ".2f")]


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
