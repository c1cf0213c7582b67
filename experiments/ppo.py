"""Stage 4 — PPO against the reward model with a KL penalty to the SFT policy.

The policy starts from SFT, the frozen SFT model is the reference, the critic starts from the reward
model (or is a value head on the policy). One PPO iteration — rollout, policy/reference log-probs,
reward scoring, KL shaping, GAE, epochs × minibatches of clipped policy and value updates — is one
compiled program (:func:`make_iteration`), with the batch sharded over every device of a ``Mesh``.

Run::

    python -m experiments.ppo --preset default \
        --sft-dir runs/default/sft/final --reward-dir runs/default/reward/final

Outputs in the workdir: ``ckpt/``, ``metrics.jsonl``, ``tensorboard/``, ``ppo.png`` (gold score, RM
score, KL against iterations; gold score against KL), ``samples.md`` (SFT vs PPO responses to the
same
held-out prompts), ``summary.json`` and ``final/`` (the policy bundle) + ``final/hf`` (Hugging Face
format, loadable by ``transformers``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
import time

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from rlhf_jax import losses, parallel, rl
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.metrics import MetricsWriter, plot_curves, read_metrics
from rlhf_jax.models.heads import ScalarHead
from rlhf_jax.models.transformer import positions_from_mask
from rlhf_jax.runs import load_bundle, load_params_into, save_bundle, write_summary


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO with a KL penalty (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022)."""
    workdir: str = "runs/default/ppo"
    sft_dir: str = "runs/default/sft/final"
    """Policy and reference initialisation (an SFT run's ``final/`` bundle)."""
    reward_dir: str = "runs/default/reward/final"
    """The reward model (a reward run's ``final/`` bundle); the critic starts from it."""
    gold_path: str | None = "runs/default/gold.pkl"
    """Gold sentiment scorer used for evaluation only (None: skip gold metrics)."""
    data_dir: str | None = None
    iterations: int = 100
    batch_size: int = 64
    """Rollouts per iteration (split over devices)."""
    query_len: int = 16
    """Prompt tokens: the first ``query_len`` tokens of a review (left-padded if shorter)."""
    response_len: int = 24
    temperature: float = 1.0
    """Sampling temperature; policy and reference log-probs use it too."""
    top_k: int = 0
    top_p: float = 1.0
    stop_token: str | None = None
    """Stop token (text) for EOS handling / missing-EOS penalty; None: fixed-length responses."""
    missing_eos_penalty: float | None = None
    """Score given to responses without ``stop_token`` (lm-human-preferences: -1)."""
    ppo_epochs: int = 2
    num_minibatches: int = 2
    learning_rate: float = 2e-4
    """Adam step size, decayed linearly to 0 over all updates."""
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.1
    """Initial β."""
    adaptive_kl: bool = True
    kl_target: float = 10.0
    """Adaptive controller target (nats per response)."""
    kl_horizon: float = 1000.0
    """Adaptive controller horizon H in samples (β moves by at most 20%·batch/H per iteration)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (papers) or k3 (unbiased, non-negative)."""
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    value_head_on_policy: bool = False
    """Critic = a zero-init value head on the policy's hidden states instead of a separate model."""
    compute_dtype: str = "float32"
    eval_prompts: int = 256
    eval_every: int = 20
    checkpoint_every: int = 20
    num_devices: int | None = None
    """Devices of the data axis (None: all)."""
    stop_after: int | None = None
    """End this run after N iterations (a time-limited job slot); re-running resumes."""
    seed: int = 0


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


@flax.struct.dataclass
class PPOState:
    """Everything a PPO run carries from one iteration to the next (and checkpoints)."""
    params: dict
    """``{"policy": LM params, "value": critic params}`` (nnx.State pytrees)."""
    opt_state: optax.OptState
    kl_ctl: rl.KLControllerState
    key: jax.Array
    """Base key; iteration ``i`` uses ``fold_in(key, i)``, so a resumed run draws the same
    numbers."""
    iteration: jax.Array


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    total_updates = cfg.iterations * cfg.ppo_epochs * cfg.num_minibatches
    schedule = optax.linear_schedule(cfg.learning_rate, 0.0, total_updates)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adam(schedule, eps=1e-5))


def score_responses(rm_def, rm_params, prompt_bt, prompt_mask_bt, resp_bt, resp_mask_bt, eos_id,
                    pool: str = "last"):
    """Reward-model score of each response, with an EOS appended after its last real token.

    The reward model was trained on ``prompt + response + EOS`` (``rlhf_jax.data.batching``), so
    rollouts are scored the same way (a response that already ends in EOS gets none added), and
    pooled as in training (``experiments.reward.Config.pool``: the EOS, or the mean over the
    response + EOS). Returns ``[B]``.
    """
    b, tq = prompt_bt.shape
    n = jnp.sum(resp_mask_bt, axis=1)
    has_eos = jnp.any((resp_bt == eos_id) & resp_mask_bt, axis=1)
    resp = jnp.concatenate([resp_bt, jnp.full((b, 1), eos_id, resp_bt.dtype)], axis=1)
    add = (jnp.arange(resp.shape[1])[None, :] == n[:, None]) & ~has_eos[:, None]
    resp = jnp.where(add, eos_id, resp)
    rmask = jnp.concatenate([resp_mask_bt, jnp.zeros((b, 1), bool)], axis=1) | add
    tokens = jnp.concatenate([prompt_bt.astype(jnp.int32), resp.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask_bt.astype(bool), rmask], axis=1)
    rm_bt = nnx.merge(rm_def, rm_params)(tokens, positions_from_mask(mask), mask)
    if pool == "mean":
        return rl.masked_mean(rm_bt[:, tq:], rmask, axis=1)
    last = tq - 1 + jnp.sum(rmask, axis=1)
    return jnp.take_along_axis(rm_bt, last[:, None], axis=1)[:, 0]


def response_logits(lm_def, params, tokens_bt, mask_bt, resp: slice):
    """``(logits [B, Tr, V], hidden [B, T, D])``: the LM head is applied only at the positions
    ``resp`` that predict response tokens (on a 50k vocabulary it is the largest matmul)."""
    model = nnx.merge(lm_def, params)
    _, hidden, _ = model(tokens_bt, positions_from_mask(mask_bt), mask_bt, compute_logits=False)
    return model.logits(hidden[:, resp]), hidden


def make_iteration(cfg: Config, lm_def, value_def, rm_def, tx, scfg: SamplingConfig,
                   eos_id: int, rm_pool: str = "last"):
    """Builds ``iteration(state, ref_params, rm_params, prompt_tokens, prompt_mask)``.

    Returns ``(state, metrics, response_tokens, response_mask)``; jit it (the caller donates
    ``state``). The prompts are ``[B, Tq]`` left-padded; responses are ``[B, Tr]`` right-padded.
    """
    tq, tr, temp = cfg.query_len, cfg.response_len, cfg.temperature
    resp = slice(tq - 1, tq + tr - 1)  # logits/values at these positions belong to response tokens
    b, n_mb = cfg.batch_size, cfg.num_minibatches
    if b % n_mb:
        raise ValueError(f"batch_size={b} is not divisible by num_minibatches={n_mb}")

    def forward(params, tokens_bt, mask_bt):
        """Policy logits ``[B, Tr, V]`` and values ``[B, Tr]`` over the response positions."""
        logits, hidden = response_logits(lm_def, params["policy"], tokens_bt, mask_bt, resp)
        pos = positions_from_mask(mask_bt)
        critic = nnx.merge(value_def, params["value"])
        values = critic(hidden) if cfg.value_head_on_policy else critic(tokens_bt, pos, mask_bt)
        return logits, values[:, resp]

    def rollout(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt, key):
        out = sample_split(lm_def, state.params["policy"], prompt_bt, prompt_mask_bt, key, scfg)
        rmask = out.mask
        tokens = jnp.concatenate([prompt_bt.astype(jnp.int32), out.tokens], axis=1)
        mask = jnp.concatenate([prompt_mask_bt.astype(bool), rmask], axis=1)
        logits, values = forward(state.params, tokens, mask)
        logp = losses.token_logprobs(logits, out.tokens, temp)
        ref_logits, _ = response_logits(lm_def, ref_params, tokens, mask, resp)
        ref_logp = losses.token_logprobs(ref_logits, out.tokens, temp)
        score = score_responses(rm_def, rm_params, prompt_bt, prompt_mask_bt, out.tokens, rmask,
                                eos_id, rm_pool)
        if cfg.missing_eos_penalty is not None:
            has_eos = jnp.any((out.tokens == scfg.eos_id) & rmask, axis=1)
            score = rl.apply_missing_eos_penalty(score, has_eos, cfg.missing_eos_penalty)
        rewards, kl = rl.kl_shaped_rewards(score, logp, ref_logp, rmask, state.kl_ctl.value,
                                           cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = rl.masked_whiten(rewards, rmask, shift_mean=False)
        adv, returns = rl.gae(rewards, values, rmask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = rl.masked_whiten(adv, rmask)
        kl_seq = rl.masked_sum(kl, rmask, axis=1)
        batch = {"tokens": tokens, "mask": mask, "response": out.tokens, "rmask": rmask,
                 "old_logp": logp, "old_values": values, "adv": adv, "returns": returns}
        metrics = {
            "objective/kl": jnp.mean(kl_seq),
            "objective/kl_coef": state.kl_ctl.value,
            "objective/scores": jnp.mean(score),
            "objective/rlhf_reward": jnp.mean(score - state.kl_ctl.value * kl_seq),
            "objective/entropy": losses.entropy(logits, rmask, temp),
            "objective/response_len": jnp.mean(jnp.sum(rmask, axis=1).astype(jnp.float32)),
            "ppo/val/explained_var_rollout": rl.explained_variance(values, returns, rmask),
            "ppo/returns_mean": rl.masked_mean(returns, rmask),
        }
        return batch, metrics, out

    def loss_fn(params, mb):
        logits, values = forward(params, mb["tokens"], mb["mask"])
        logp = losses.token_logprobs(logits, mb["response"], temp)
        pg_loss, pm = losses.ppo_policy_loss(logp, mb["old_logp"], mb["adv"], mb["rmask"],
                                             cfg.clip_eps, cfg.dual_clip)
        vf_loss, vm = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["rmask"],
                                            cfg.value_clip_eps)
        # Without an entropy bonus the entropy is a metric only: no gradient through it.
        ent = losses.entropy(logits if cfg.entropy_coef else jax.lax.stop_gradient(logits),
                             mb["rmask"], temp)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
        return loss, {**pm, **vm, "ppo/loss": loss, "ppo/entropy": ent}

    def minibatch_step(carry, idx_m):
        params, opt_state, batch = carry
        mb = jax.tree.map(lambda x: x[idx_m], batch)
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        updates, opt_state = tx.update(grads, opt_state, params)
        m["ppo/grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state, batch), m

    def epoch_step(carry, key):
        perm = jax.random.permutation(key, b).reshape(n_mb, b // n_mb)
        return jax.lax.scan(minibatch_step, carry, perm)

    def update(params, opt_state, batch, key):
        """``ppo_epochs`` × ``num_minibatches`` clipped policy + value updates on one rollout."""
        (params, opt_state, _), um = jax.lax.scan(
            epoch_step, (params, opt_state, jax.lax.stop_gradient(batch)),
            jax.random.split(key, cfg.ppo_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, um)

    def iteration(state: PPOState, ref_params, rm_params, prompt_bt, prompt_mask_bt):
        key = jax.random.fold_in(state.key, state.iteration)
        k_sample, k_epochs = jax.random.split(key)
        batch, metrics, out = rollout(state, ref_params, rm_params, prompt_bt, prompt_mask_bt,
                                      k_sample)
        params, opt_state, um = update(state.params, state.opt_state, batch, k_epochs)
        metrics.update(um)
        kl_ctl = rl.kl_controller_update(state.kl_ctl, metrics["objective/kl"], b)
        new_state = PPOState(params=params, opt_state=opt_state, kl_ctl=kl_ctl, key=state.key,
                             iteration=state.iteration + 1)
        return new_state, metrics, out.tokens, out.mask

    iteration.rollout, iteration.update = rollout, update  # separately jittable (benchmarks)
    return iteration


def make_evaluate(cfg: Config, lm_def, rm_def, scfg: SamplingConfig, eos_id: int,
                  rm_pool: str = "last"):
    """``evaluate(policy, ref, rm, prompts, mask, key) -> (tokens, mask, rm score, KL to ref)``."""
    tq, tr = cfg.query_len, cfg.response_len
    resp = slice(tq - 1, tq + tr - 1)

    def evaluate(policy_params, ref_params, rm_params, prompt_bt, prompt_mask_bt, key):
        out = sample_split(lm_def, policy_params, prompt_bt, prompt_mask_bt, key, scfg)
        tokens = jnp.concatenate([prompt_bt.astype(jnp.int32), out.tokens], axis=1)
        mask = jnp.concatenate([prompt_mask_bt.astype(bool), out.mask], axis=1)
        lp = [losses.token_logprobs(response_logits(lm_def, p, tokens, mask, resp)[0],
                                    out.tokens, cfg.temperature)
              for p in (policy_params, ref_params)]
        kl_seq = rl.masked_sum(lp[0] - lp[1], out.mask, axis=1)
        score = score_responses(rm_def, rm_params, prompt_bt, prompt_mask_bt, out.tokens,
                                out.mask, eos_id, rm_pool)
        return out.tokens, out.mask, score, kl_seq

    return jax.jit(evaluate)


def _prompt_iterator(source, tokenizer, cfg: Config) -> common.StatefulBatches:
    from rlhf_jax.data import batching
    return common.StatefulBatches(batching.prompt_batches(
        source, tokenizer, max_len=cfg.query_len,
        cfg=batching.LoaderConfig(cfg.batch_size, seed=cfg.seed, num_epochs=None)))


def _gold_mean(gold, tokenizer, tokens, mask) -> float:
    from rlhf_jax.data.batching import decode_rows
    return float(np.mean(gold.prob(decode_rows(tokenizer, np.asarray(tokens), np.asarray(mask)))))


def init_state(cfg: Config, policy, critic, tx) -> PPOState:
    params = {"policy": nnx.state(policy), "value": nnx.state(critic)}
    kl_ctl = (rl.adaptive_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else rl.fixed_kl_controller(cfg.kl_coef))
    return PPOState(params=params, opt_state=tx.init(params), kl_ctl=kl_ctl,
                    key=jax.random.key(cfg.seed), iteration=jnp.zeros((), jnp.int32))


def load_models(cfg: Config):
    """Policy, reference, reward model and critic, and the tokenizer (init-from the stages)."""
    policy, mcfg, tok, _ = load_bundle(cfg.sft_dir, kind="lm", compute_dtype=cfg.compute_dtype)
    rm, _, _, rm_meta = load_bundle(cfg.reward_dir, kind="scalar",
                                    compute_dtype=cfg.compute_dtype)
    if cfg.value_head_on_policy:
        critic = ScalarHead(mcfg.d_model, init="value", rngs=nnx.Rngs(params=cfg.seed))
    else:
        critic, _, _, _ = load_bundle(cfg.reward_dir, kind="scalar",
                                      compute_dtype=cfg.compute_dtype)
    return policy, rm, critic, mcfg, tok, rm_meta.get("pool", "last")


def sampling_config(cfg: Config, tokenizer) -> SamplingConfig:
    eos = None
    if cfg.stop_token is not None:
        ids = tokenizer.encode(cfg.stop_token)
        if len(ids) != 1:
            raise ValueError(f"stop_token {cfg.stop_token!r} is {len(ids)} tokens; expected one")
        eos = ids[0]
    return SamplingConfig(max_new_tokens=cfg.response_len, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos, pad_id=tokenizer.pad_id,
                          min_new_tokens=1)


def train(cfg: Config) -> dict:
    """Runs (or resumes) PPO; returns the summary (also written to ``summary.json``)."""
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(cfg.num_devices)
    policy, rm, critic, mcfg, tok, rm_pool = load_models(cfg)
    if cfg.query_len + cfg.response_len + 1 > mcfg.max_seq_len:
        raise ValueError(f"query_len + response_len + 1 = {cfg.query_len + cfg.response_len + 1} "
                         f"exceeds the model's max_seq_len={mcfg.max_seq_len}")
    lm_def, ref_params = nnx.split(policy)
    rm_def, rm_params = nnx.split(rm)
    value_def = nnx.graphdef(critic)
    scfg = sampling_config(cfg, tok)
    tx = make_optimizer(cfg)
    state = init_state(cfg, policy, critic, tx)
    # The reference is a separate copy: the policy's buffers are donated to each iteration.
    ref_params = parallel.replicate(jax.tree.map(jnp.copy, ref_params), mesh)
    rm_params = parallel.replicate(rm_params, mesh)
    state = parallel.replicate(state, mesh)

    sources = common.imdb_sources(cfg.data_dir)
    prompts = _prompt_iterator(sources["prompts"], tok, cfg)
    eval_tokens, eval_mask, eval_texts = common.prompt_set(sources["eval"], tok, cfg.query_len,
                                                           cfg.eval_prompts)
    gold = None
    if cfg.gold_path and Path(cfg.gold_path).exists():
        from rlhf_jax.labelers import GoldSentimentScorer
        gold = GoldSentimentScorer.load(cfg.gold_path)

    iteration = jax.jit(make_iteration(cfg, lm_def, value_def, rm_def, tx, scfg, tok.eos_id,
                                       rm_pool),
                        donate_argnums=(0,))
    evaluate = make_evaluate(cfg, lm_def, rm_def, scfg, tok.eos_id, rm_pool)
    eval_key = jax.random.key(cfg.seed + 1)
    eval_batch = parallel.shard_batch({"t": eval_tokens, "m": eval_mask}, mesh) \
        if len(eval_tokens) % mesh.shape[parallel.DATA] == 0 else {"t": eval_tokens, "m": eval_mask}

    def run_eval(policy_params):
        toks, m, score, kl = jax.device_get(evaluate(policy_params, ref_params, rm_params,
                                                     eval_batch["t"], eval_batch["m"], eval_key))
        out = {"eval/scores": float(np.mean(score)), "eval/kl": float(np.mean(kl))}
        if gold is not None:
            out["eval/gold"] = _gold_mean(gold, tok, toks, m)
        return out, toks, m

    ckpt = Checkpointer(workdir / "ckpt")
    start = 0
    if ckpt.latest_step() is not None:  # resume > init-from > scratch
        state, meta = ckpt.restore(state)
        start = meta["step"]
        prompts.set_state(meta["data"])
        print(f"[ppo] resumed from iteration {start}")

    sft_eval, sft_tokens, sft_mask = run_eval(ref_params)
    writer = MetricsWriter(workdir, total_steps=cfg.iterations, initial_step=start, desc="ppo",
                           show=("objective/scores", "objective/gold", "objective/kl",
                                 "ppo/clipfrac"))
    if start == 0:
        writer.write(0, sft_eval)
    last = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    for it in range(start + 1, last + 1):
        batch = parallel.shard_batch(
            {k: v for k, v in prompts.next().items() if k in ("tokens", "mask")}, mesh)
        t0 = time.perf_counter()
        state, metrics, resp, resp_mask = iteration(state, ref_params, rm_params,
                                                    batch["tokens"], batch["mask"])
        metrics = dict(jax.device_get(metrics))
        metrics["perf/iteration_seconds"] = time.perf_counter() - t0  # the first includes compile
        if gold is not None:
            metrics["objective/gold"] = _gold_mean(gold, tok, resp, resp_mask)
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            metrics.update(run_eval(state.params["policy"])[0])
        writer.write(it, metrics)
        writer.advance()
        if it % cfg.checkpoint_every == 0 or it == last:
            ckpt.save(it, state, {"step": it, "data": prompts.get_state()})
    writer.close()
    ckpt.close()
    if last < cfg.iterations:
        print(f"[ppo] stopped after iteration {last} of {cfg.iterations}; re-run to resume")
        return {"stage": "ppo", "stopped_at": last}

    final_eval, ppo_tokens, ppo_mask = run_eval(state.params["policy"])
    load_params_into(policy, nnx.to_pure_dict(jax.device_get(state.params["policy"])))
    save_bundle(workdir / "final", policy, mcfg, tok, kind="lm", extra={"stage": "ppo"})
    try:
        from rlhf_jax.models.hf import save_pretrained
        save_pretrained(policy, mcfg, workdir / "final" / "hf",
                        extra_config={"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        tok.save(workdir / "final" / "hf")  # tokenizer.json + tokenizer_config.json
    except (ImportError, ValueError) as e:  # export is a convenience; the bundle is the result
        print(f"[ppo] Hugging Face export skipped: {e}")
    _write_samples(workdir / "samples.md", tok, gold, eval_texts, eval_tokens, eval_mask,
                   sft_tokens, sft_mask, ppo_tokens, ppo_mask)
    rows = read_metrics(workdir / "metrics.jsonl")
    _plot(rows, workdir)
    summary = {
        "stage": "ppo", "iterations": cfg.iterations, "eval_prompts": int(len(eval_tokens)),
        "sft": {"gold": sft_eval.get("eval/gold"), "rm_score": sft_eval["eval/scores"],
                "kl": sft_eval["eval/kl"]},
        "ppo": {"gold": final_eval.get("eval/gold"), "rm_score": final_eval["eval/scores"],
                "kl": final_eval["eval/kl"]},
        "final_kl_coef": float(jax.device_get(state.kl_ctl.value)),
        "median_iteration_seconds": float(np.median(
            [r["perf/iteration_seconds"] for r in rows[1:] if "perf/iteration_seconds" in r]
            or [float("nan")])),
        "config": dataclasses.asdict(cfg),
    }
    write_summary(workdir, summary)
    print(f"[ppo] held-out gold P(positive): SFT {summary['sft']['gold']} -> PPO "
          f"{summary['ppo']['gold']}; KL to SFT {summary['ppo']['kl']:.2f} nats")
    return summary


def _write_samples(path, tok, gold, texts, prompt_tokens, prompt_mask, sft_t, sft_m, ppo_t, ppo_m,
                   n: int = 12):
    from rlhf_jax.data.batching import decode_rows
    prompts = decode_rows(tok, prompt_tokens[:n], prompt_mask[:n])
    sft = decode_rows(tok, sft_t[:n], sft_m[:n])
    ppo = decode_rows(tok, ppo_t[:n], ppo_m[:n])
    g_sft = gold.prob(sft) if gold else [float("nan")] * n
    g_ppo = gold.prob(ppo) if gold else [float("nan")] * n

    def cell(s):
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["# SFT vs PPO responses to the same held-out prompts", "",
             "Gold = the gold scorer's P(positive) of the response.", "",
             "| prompt | SFT response | gold | PPO response | gold |", "|---|---|---|---|---|"]
    for p, a, ga, b, gb in zip(prompts, sft, g_sft, ppo, g_ppo):
        lines.append(f"| {cell(p)} | {cell(a)} | {ga:.2f} | {cell(b)} | {gb:.2f} |")
    Path(path).write_text("\n".join(lines) + "\n")


def _plot(rows, workdir: Path):
    plot_curves(rows, [("gold P(positive)", ["objective/gold", "eval/gold"]),
                       ("reward-model score", ["objective/scores", "eval/scores"]),
                       ("KL to SFT (nats)", ["objective/kl", "eval/kl"])],
                workdir / "ppo.png", title="PPO", x="step")
    pts = [r for r in rows if "objective/gold" in r and "objective/kl" in r]
    if pts:
        plot_curves(pts, [("gold P(positive)", "objective/gold")], workdir / "gold_vs_kl.png",
                    title="gold score against KL", x="objective/kl")


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
