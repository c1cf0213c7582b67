"""Stage 4 — PPO against the reward model with a KL penalty to the SFT policy.

The policy starts from SFT, the frozen SFT model is the reference, the critic starts from the reward
model (or is a value head on the policy). The algorithm is :mod:`rlhf_jax.ppo`: one iteration —
rollout, policy/reference log-probs, reward scoring, KL shaping, GAE, epochs × minibatches of
clipped policy and value updates — is one compiled program, with the batch sharded over every
device of a ``Mesh``. This file loads the models, feeds prompts, evaluates, and writes outputs.

Run::

    python -m experiments.ppo --preset default \
        --sft-dir runs/default/sft/final --reward-dir runs/default/reward/final
    python -m experiments.seeds --preset default --seeds 3 --oracle-reward   # the gold scorer
                                                      # itself as the reward: the oracle ceiling

Outputs in the workdir: ``ckpt/``, ``metrics.jsonl``, ``tensorboard/``, ``ppo.png`` (gold score,
RM score, KL against iterations), ``gold_vs_kl.png``, ``samples.md`` (SFT vs PPO responses to the
same held-out prompts), ``summary.json`` and ``final/`` (the policy bundle) + ``final/hf``
(Hugging Face format, loadable by ``transformers``).
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
from rlhf_jax import parallel, ppo
from rlhf_jax.checkpoint import files_digest, tree_digest
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.loop import check_output_dir, fingerprint, StatefulBatches, TrainLoop
from rlhf_jax.metrics import plot_curves, read_metrics
from rlhf_jax.models.heads import ScalarEnsemble, ScalarHead
from rlhf_jax.runs import (load_bundle, load_params_into, params_of, save_bundle, write_samples,
                           write_summary)
from rlhf_jax.scoring import RewardScorer, TextReward
from rlhf_jax.tasks import get_task


@dataclasses.dataclass(frozen=True)
class Config(ppo.PPOConfig):
    """PPO with a KL penalty (hyper-parameters: ``rlhf_jax.ppo.PPOConfig``) and where it runs."""
    workdir: str = "runs/default/ppo"
    sft_dir: str = "runs/default/sft/final"
    """Policy and reference initialisation (an SFT run's ``final/`` bundle)."""
    reward_dir: str = "runs/default/reward/final"
    """The reward model (a reward run's ``final/`` bundle); the critic starts from it."""
    reward_ensemble: tuple[str, ...] = ()
    """More reward-model bundles (same tokenizer and pooling): the reward is then the mean of
    ``reward_dir``'s and theirs (``rlhf_jax.models.heads.ScalarEnsemble``), e.g. the seeds of
    ``experiments.reward --seeds N``."""
    reward_disagreement: float = 0.0
    """With ``reward_ensemble``: the reward is the members' mean minus this times their variance
    (uncertainty-weighted optimisation, Coste et al. 2023); 0: the plain mean. "RM score"
    figures are then this penalised reward."""
    gold_path: str | None = "runs/default/gold.pkl"
    """Gold scorer used for evaluation only (None or a missing file: no gold metrics)."""
    oracle_reward: bool = False
    """Optimise the gold scorer itself instead of the reward model: the reward is its log-odds of
    positive sentiment on each decoded response (``rlhf_jax.scoring.TextReward``; about unit
    spread on the SFT policy's samples, like a normalised reward model). The oracle run: the gold
    score a perfect reward model would give at the same KL. The critic still starts from
    ``reward_dir``; "RM score" figures are then gold log-odds."""
    task: str = "imdb"
    """Where prompts come from: ``imdb`` or ``jsonl:PATH`` (``rlhf_jax.tasks``)."""
    data_dir: str | None = None
    stop_token: str | None = None
    """Stop token (text) for EOS handling / missing-EOS penalty; None: fixed-length responses."""
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    """Storage dtype of every model's parameters and of the Adam state: ``bfloat16`` halves
    their memory (updates are rounded to bf16; for large models on accelerators)."""
    eval_prompts: int = 256
    eval_every: int = 20
    checkpoint_every: int = 20
    num_devices: int | None = None
    """Devices the mesh uses (None: all)."""
    mesh: str | None = None
    """Device mesh, e.g. ``data=2,fsdp=4`` (axes ``data``, ``fsdp``, ``tensor``: parameters and
    optimizer state sharded over ``fsdp``, batches over ``data × fsdp``); None: every device on
    the data axis, parameters replicated."""
    stop_after: int | None = None
    """End this run after N iterations (a time-limited job slot); re-running resumes."""
    wandb: bool = False
    """Also log to Weights & Biases (offline; needs ``pip install wandb``)."""

    def errors(self) -> list[str]:
        errs = self.ppo_errors() + common.positive(self, "eval_prompts", "eval_every",
                                                   "checkpoint_every")
        if self.missing_eos_penalty is not None and self.stop_token is None:
            errs.append(f"missing_eos_penalty={self.missing_eos_penalty}: needs --stop-token "
                        "(without one every response would get the penalty)")
        if self.reward_disagreement < 0 or (self.reward_disagreement > 0
                                            and not self.reward_ensemble):
            errs.append(f"reward_disagreement={self.reward_disagreement}: needs ≥ 0, and a "
                        "--reward-ensemble when > 0 (one model has no disagreement)")
        if self.oracle_reward and not (self.gold_path and Path(self.gold_path).exists()):
            errs.append(f"oracle_reward needs a gold scorer; gold_path={self.gold_path!r} "
                        "does not exist")
        return (errs + common.one_of(self, "compute_dtype", ("float32", "bfloat16"))
                + common.one_of(self, "param_dtype", ("float32", "bfloat16"))
                + parallel.mesh_errors(self.mesh, self.num_devices))


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(workdir="runs/tiny/ppo", sft_dir="runs/tiny/sft/final",
                   reward_dir="runs/tiny/reward/final", gold_path="runs/tiny/gold.pkl",
                   iterations=4, batch_size=8, query_len=8, response_len=8, ppo_epochs=2,
                   num_minibatches=2, eval_prompts=16, eval_every=2, checkpoint_every=2,
                   compute_dtype="float32"),
    "smollm2": Config(workdir="runs/smollm2/ppo", sft_dir="runs/smollm2/sft/final",
                      reward_dir="runs/smollm2/reward/final", gold_path="runs/smollm2/gold.pkl",
                      iterations=100, batch_size=32, query_len=32, response_len=32,
                      learning_rate=1e-6, kl_coef=0.1, temperature=0.7, eval_prompts=128,
                      ppo_epochs=4, num_minibatches=4, compute_dtype="bfloat16"),
}


# Checked every iteration, in this order (the first non-finite one is named): the rollout's
# reward-model scores and KL, the loss and gradient norm of the update, the evaluation.
FINITE = ("objective/scores", "objective/kl", "objective/rlhf_reward", "ppo/loss",
          "ppo/grad_norm", "eval/scores", "eval/kl_k1", "eval/kl_k3")


def load_models(cfg: Config):
    """Policy (= reference), reward model and critic bundles, the tokenizer and the scorer."""
    policy, mcfg, tok, _ = load_bundle(cfg.sft_dir, kind="lm", compute_dtype=cfg.compute_dtype)
    rm, _, _, rm_meta = load_bundle(cfg.reward_dir, kind="scalar",
                                    compute_dtype=cfg.compute_dtype)
    if cfg.reward_ensemble:
        members = [rm]
        for d in cfg.reward_ensemble:
            m, _, m_tok, m_meta = load_bundle(d, kind="scalar", compute_dtype=cfg.compute_dtype)
            if m_meta.get("pool", "last") != rm_meta.get("pool", "last") or \
                    m_tok.vocab_size != tok.vocab_size:
                raise ValueError(f"reward_ensemble: {d} pools {m_meta.get('pool', 'last')!r} "
                                 f"with a {m_tok.vocab_size}-token vocabulary; {cfg.reward_dir} "
                                 f"pools {rm_meta.get('pool', 'last')!r} with {tok.vocab_size}")
            members.append(m)
        rm = ScalarEnsemble(members, cfg.reward_disagreement)
    if cfg.value_head_on_policy:
        critic = ScalarHead(mcfg.d_model, init="value", rngs=nnx.Rngs(params=cfg.seed))
    else:
        critic, _, _, _ = load_bundle(cfg.reward_dir, kind="scalar",
                                      compute_dtype=cfg.compute_dtype)
    reward = RewardScorer(nnx.graphdef(rm), tok.eos_id, rm_meta.get("pool", "last"))
    if cfg.oracle_reward:
        reward = TextReward(common.load_gold(cfg.gold_path).score, tok)
    return policy, rm, critic, mcfg, tok, reward


def stop_id(cfg: Config, tokenizer) -> int | None:
    if cfg.stop_token is None:
        return None
    ids = tokenizer.encode(cfg.stop_token)
    if len(ids) != 1:
        raise ValueError(f"stop_token {cfg.stop_token!r} is {len(ids)} tokens; expected one")
    return ids[0]


def run_fingerprint(cfg: Config, policy, rm) -> dict:
    """The run's identity: its config (not where the inputs live, how long it runs or on how many
    devices) and the contents of its SFT policy, reward model(s) and gold scorer. A checkpoint of
    another run is never resumed (:class:`rlhf_jax.loop.TrainLoop`)."""
    inputs = {"sft": tree_digest(params_of(policy)), "reward": tree_digest(params_of(rm))}
    if cfg.gold_path and Path(cfg.gold_path).exists():
        inputs["gold"] = files_digest([cfg.gold_path])
    return fingerprint(cfg, ("iterations", "sft_dir", "reward_dir", "reward_ensemble",
                             "gold_path", "num_devices"), inputs)


def train(cfg: Config) -> dict:
    """Runs (or resumes) PPO; returns the summary (also written to ``summary.json``).

    A subclass's config (``experiments.seeds.Config`` with one seed, as the pipeline passes) runs
    as the plain config of its fields: the same run, the same fingerprint."""
    cfg = Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})
    common.check(cfg, cfg.errors())
    workdir = check_output_dir("ppo", cfg.workdir)
    mesh = parallel.make_mesh(cfg.num_devices, spec=cfg.mesh)
    policy, rm, critic, mcfg, tok, reward = load_models(cfg)
    fp = run_fingerprint(cfg, policy, rm)
    if cfg.query_len + cfg.response_len + 1 > mcfg.max_seq_len:
        raise ValueError(f"query_len + response_len + 1 = {cfg.query_len + cfg.response_len + 1} "
                         f"exceeds the model's max_seq_len={mcfg.max_seq_len}")
    for m in (policy, rm, critic):  # bf16 storage: before the optimizer state is built from them
        nnx.update(m, parallel.cast_floats(nnx.state(m), cfg.param_dtype))
    lm_def, ref_params = nnx.split(policy)
    scfg = ppo.sampling_config(cfg, tok.pad_id, stop_id(cfg, tok))
    tx = ppo.make_optimizer(cfg)
    program = ppo.make_ppo(cfg, lm_def, nnx.graphdef(critic), reward, tx, scfg, mesh=mesh)
    state = ppo.init_state(cfg, policy, critic, tx)
    # The reference is a separate copy: the policy's buffers are donated to each iteration.
    ref_params = parallel.shard(jax.tree.map(jnp.copy, ref_params), mesh)
    rm_params = parallel.shard(nnx.state(rm), mesh)
    state = parallel.shard(state, mesh)

    task = get_task(cfg.task, cfg.data_dir)
    prompts = StatefulBatches(task.prompt_batches(tok, cfg.query_len, cfg.batch_size, cfg.seed))
    eval_tokens, eval_mask, _ = task.prompt_set("eval", tok, cfg.query_len, cfg.eval_prompts)
    gold = common.load_gold(cfg.gold_path)

    iteration = jax.jit(program.iteration, donate_argnums=(0,))
    evaluate = ppo.make_evaluate(cfg, lm_def, reward, scfg)
    eval_key = jax.random.key(cfg.seed + 1)
    eval_batch = {"t": eval_tokens, "m": eval_mask}
    if len(eval_tokens) % parallel.batch_devices(mesh) == 0:
        eval_batch = parallel.shard_batch(eval_batch, mesh)
    else:
        eval_batch = parallel.replicate(eval_batch, mesh)

    if jax.process_count() > 1:  # compiled on every process before the first collective
        evaluate, _ = parallel.compile_with_memory(evaluate, ref_params, ref_params, rm_params,
                                                   eval_batch["t"], eval_batch["m"], eval_key)

    def run_eval(policy_params):
        out = parallel.to_host(evaluate(policy_params, ref_params, rm_params, eval_batch["t"],
                                        eval_batch["m"], eval_key))
        metrics = {"eval/scores": float(np.mean(out["score"])),
                   "eval/kl_k1": float(np.mean(out["kl_k1"])),
                   "eval/kl_k3": float(np.mean(out["kl_k3"]))}
        if gold is not None:
            metrics["eval/gold"] = _gold_mean(gold, tok, out["tokens"], out["mask"])
        return metrics, out["tokens"], out["mask"]

    loop = TrainLoop("ppo", workdir, cfg.iterations, checkpoint_every=cfg.checkpoint_every,
                     stop_after=cfg.stop_after, wandb=cfg.wandb, config=cfg,
                     show=("objective/scores", "objective/gold", "objective/kl", "ppo/clipfrac"),
                     fingerprint=fp, unit="iteration")
    state = loop.restore(state, data=prompts)
    sft_eval, sft_tokens, sft_mask = run_eval(ref_params)
    loop.check_finite(0, sft_eval, FINITE)
    if loop.start == 0:
        loop.log(0, sft_eval, force=True)
    memory = None
    for it in loop.steps():
        batch = parallel.shard_batch(
            {k: v for k, v in prompts.next().items() if k in ("tokens", "mask")}, mesh)
        t0 = time.perf_counter()
        if memory is None:  # compiled once, with XLA's per-device memory analysis
            iteration, memory = parallel.compile_with_memory(
                iteration, state, ref_params, rm_params, batch["tokens"], batch["mask"])
            common.remember_memory(workdir, "iteration", memory)
        state, metrics, resp, resp_mask = iteration(state, ref_params, rm_params,
                                                    batch["tokens"], batch["mask"])
        metrics, resp, resp_mask = parallel.to_host((dict(metrics), resp, resp_mask))
        metrics["perf/iteration_seconds"] = time.perf_counter() - t0  # the first includes compile
        if gold is not None:
            metrics["objective/gold"] = _gold_mean(gold, tok, resp, resp_mask)
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            metrics.update(run_eval(state.params["policy"])[0])
        loop.check_finite(it, metrics, FINITE)  # one NaN/inf reward or KL stops the run
        loop.log(it, metrics)
        loop.end_step(it, state, data=prompts)
    loop.close()
    parallel.sync("ppo-trained")  # process 0 has written every metrics row
    if not loop.finished:
        return {"stage": "ppo", "stopped_at": loop.last}

    final_eval, ppo_tokens, ppo_mask = run_eval(state.params["policy"])
    loop.check_finite(loop.last, final_eval, FINITE)
    load_params_into(policy, nnx.to_pure_dict(parallel.to_host(state.params["policy"])))
    # The bundle and its Hugging Face export, written together (all or nothing).
    save_bundle(workdir / "final", policy, mcfg, tok, kind="lm", extra={"stage": "ppo"},
                hf_config={"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    n = 12
    write_samples(workdir / "samples.md", "SFT vs PPO responses to the same held-out prompts",
                  decode_rows(tok, eval_tokens[:n], eval_mask[:n]),
                  {"SFT": decode_rows(tok, sft_tokens[:n], sft_mask[:n]),
                   "PPO": decode_rows(tok, ppo_tokens[:n], ppo_mask[:n])}, gold)
    rows = read_metrics(workdir / "metrics.jsonl")
    plot_run(rows, workdir)

    def figures(ev):
        return {"gold": ev.get("eval/gold"), "rm_score": ev["eval/scores"],
                "kl": ev["eval/kl_k1"], "kl_k3": ev["eval/kl_k3"]}

    summary = {
        "stage": "ppo", "iterations": cfg.iterations, "eval_prompts": int(len(eval_tokens)),
        "sft": figures(sft_eval), "ppo": figures(final_eval),
        "kl_note": "kl: Σ_t log π/π_SFT (k1) per response; kl_k3: Σ_t of the k3 estimate",
        "final_kl_coef": float(parallel.to_host(state.kl_ctl.value)),
        "median_iteration_seconds": float(np.median(
            [r["perf/iteration_seconds"] for r in rows[1:] if "perf/iteration_seconds" in r]
            or [float("nan")])),
        "config": dataclasses.asdict(cfg),
        # per device, bytes (None: no iteration ever compiled for this run)
        "memory": {"iteration": common.remember_memory(workdir, "iteration", memory)},
    }
    write_summary(workdir, summary)
    print(f"[ppo] held-out gold P(positive): SFT {summary['sft']['gold']} -> PPO "
          f"{summary['ppo']['gold']}; KL to SFT {summary['ppo']['kl']:.2f} nats")
    return summary


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    p, s, n = summary["ppo"], summary["sft"], summary.get("eval_prompts")
    return [("sft_gold_positive", f"gold P(positive), SFT policy ({n} held-out prompts)",
             s["gold"], ".3f"),
            ("ppo_gold_positive", "gold P(positive), PPO policy", p["gold"], ".3f"),
            ("sft_rm_score", "reward-model score, SFT", s["rm_score"], ".2f"),
            ("ppo_rm_score", "reward-model score, PPO", p["rm_score"], ".2f"),
            ("ppo_kl_to_sft", "KL(PPO ‖ SFT) per response (nats, k1)", p["kl"], ".2f"),
            ("eval_prompts", "held-out evaluation prompts", n, "d")]


def _gold_mean(gold, tokenizer, tokens, mask) -> float:
    return float(np.mean(gold.prob(decode_rows(tokenizer, np.asarray(tokens), np.asarray(mask)))))


def plot_run(rows, workdir: Path):
    """`ppo.png` (gold, reward-model score and KL by step) and `gold_vs_kl.png`."""
    plot_curves(rows, [("gold P(positive)", ["objective/gold", "eval/gold"]),
                       ("reward-model score", ["objective/scores", "eval/scores"]),
                       ("KL to SFT (nats)", ["objective/kl", "eval/kl_k1"])],
                workdir / "ppo.png", title="PPO", x="step")
    pts = [r for r in rows if "objective/gold" in r and "objective/kl" in r]
    if pts:
        plot_curves(pts, [("gold P(positive)", "objective/gold")], workdir / "gold_vs_kl.png",
                    title="gold score against KL", x="objective/kl")


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
