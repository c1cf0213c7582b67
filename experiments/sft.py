"""Stage 1 — supervised fine-tuning / language modelling on demonstrations.

For the embedded default task the "demonstrations" are IMDB reviews: a small GPT-2-architecture
model
(byte-level BPE trained on the same reviews) learns to continue movie reviews. With ``--init-from``
an existing model (Hugging Face directory, GGUF file, or a previous run's ``final/``) is fine-tuned
instead of trained from scratch.

Run::

    python -m experiments.sft --preset default --workdir runs/default/sft

Outputs in the workdir: ``ckpt/`` (resumable), ``metrics.jsonl``, ``tensorboard/``, ``loss.png``,
``summary.json``, ``final/`` (the model bundle the next stages start from) and ``half/`` (the
checkpoint at half the steps, a second "LM" for the comparison collection).
"""
from __future__ import annotations

import dataclasses
import math
import time

from flax import nnx
import jax
import numpy as np
import optax

from experiments import common
from rlhf_jax import losses, parallel
from rlhf_jax.checkpoint import text_digest, tree_digest
from rlhf_jax.loop import check_output_dir, fingerprint, StatefulBatches, TrainLoop
from rlhf_jax.metrics import plot_curves, read_metrics
from rlhf_jax.models.transformer import positions_from_mask
from rlhf_jax.runs import load_params_into, params_of, save_bundle, write_summary
from rlhf_jax.tasks import get_task


@dataclasses.dataclass(frozen=True)
class Config:
    """SFT / LM training."""
    workdir: str = "runs/default/sft"
    """Output folder (resumed from if it holds a checkpoint)."""
    model: str = "imdb-small"
    """Architecture preset (``experiments.common.MODELS``) when training from scratch."""
    init_from: str | None = None
    """Start from these weights: a HF model dir, a .gguf file, ``smollm2``, or a run's
    ``final/``."""
    tokenizer: str = "bpe"
    """``bpe`` trains a byte-level BPE on the training texts; else a tokenizer spec (``gpt2``,
    …)."""
    vocab_size: int = 4096
    """Vocabulary of the trained BPE."""
    task: str = "imdb"
    """Where demonstrations come from: ``imdb`` or ``jsonl:PATH`` (``rlhf_jax.tasks``)."""
    data_dir: str | None = None
    """TFDS data dir (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    max_train_texts: int | None = None
    """Use only the first N training reviews (None: all ~20k)."""
    seq_len: int = 64
    """Tokens per packed row (PPO uses 16 + 24 tokens of context)."""
    batch_size: int = 32
    """Rows per step (split over all devices)."""
    steps: int = 300
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    param_dtype: str = "float32"
    """Storage dtype of the parameters and Adam state: ``bfloat16`` halves their memory (updates
    are rounded to bf16; for large models on accelerators)."""
    compute_dtype: str = "float32"
    """Matmul dtype: ``bfloat16`` (f32 accumulation) pays off on CPUs with AVX512-BF16/AMX and on
    accelerators; on AVX2-only CPUs it is slower than f32."""
    eval_batches: int = 8
    """Held-out batches for the final validation loss."""
    checkpoint_every: int = 200
    log_every: int = 20
    wandb: bool = False
    """Also log to Weights & Biases (offline; needs ``pip install wandb``)."""
    seed: int = 0
    mesh: str | None = None
    """Device mesh, e.g. ``data=2,fsdp=4`` (axes ``data``, ``fsdp``, ``tensor``: parameters and
    optimizer state sharded over ``fsdp``, batches over ``data × fsdp``); None: every device on
    the data axis, parameters replicated."""

    def errors(self) -> list[str]:
        return (common.positive(self, "seq_len", "batch_size", "steps", "checkpoint_every",
                                "log_every", "eval_batches", "vocab_size")
                + common.finite_positive(self, "learning_rate")
                + common.one_of(self, "compute_dtype", ("float32", "bfloat16"))
                + common.one_of(self, "param_dtype", ("float32", "bfloat16"))
                + parallel.mesh_errors(self.mesh))


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(model="tiny-imdb", vocab_size=512, max_train_texts=400, seq_len=64,
                   batch_size=8, steps=8, warmup_steps=2, eval_batches=2, checkpoint_every=4,
                   log_every=2, compute_dtype="float32", workdir="runs/tiny/sft"),
    "smollm2": Config(init_from="smollm2", model="smollm2-135m", tokenizer="smollm2", seq_len=256,
                      batch_size=8, steps=200, learning_rate=2e-5, warmup_steps=20,
                      compute_dtype="bfloat16",
                      workdir="runs/smollm2/sft"),
}


def make_train_step(graphdef, tx, mesh=None):
    """One jitted SFT step over a ``{"tokens", "mask", "loss_mask"}`` batch of ``[B, T]`` arrays;
    with a ``mesh``, parameters and optimizer state keep the partition rules' shardings."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _, _ = model(batch["tokens"], positions_from_mask(batch["mask"]), batch["mask"])
        return losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    def train_step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics["lm/grad_norm"] = optax.tree.norm(grads)
        return parallel.constrain((optax.apply_updates(params, updates), opt_state), mesh) + (
            metrics,)

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1),
                                                  end_value=cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))


def train(cfg: Config) -> dict:
    """Trains (or resumes) and returns the summary dict (also written to ``summary.json``)."""
    from rlhf_jax.data import batching  # grain/TFDS: only needed to train

    common.check(cfg, cfg.errors())
    workdir = check_output_dir("sft", cfg.workdir)
    mesh = parallel.make_mesh(spec=cfg.mesh)
    task = get_task(cfg.task, cfg.data_dir)
    train_src = task.sft_source("train", cfg.max_train_texts)
    texts = [r["text"] for r in train_src]
    model, model_cfg, tokenizer = common.init_lm(cfg.model, cfg.init_from, cfg.tokenizer,
                                                 cfg.vocab_size, texts, cfg.compute_dtype,
                                                 cfg.seed, workdir)
    # The run's identity: the config (not the step count) + the texts (+ the initial weights).
    inputs = {"train_texts": text_digest(texts)}
    if cfg.init_from:
        inputs["init_from"] = tree_digest(params_of(model))
    fp = fingerprint(cfg, exclude=("steps", "data_dir"), data=inputs)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}")
    loader = StatefulBatches(batching.lm_batches(
        train_src, tokenizer, max_len=cfg.seq_len,
        cfg=batching.LoaderConfig(cfg.batch_size, seed=cfg.seed, num_epochs=None)))
    eval_rows = StatefulBatches(batching.lm_batches(
        task.sft_source("eval"), tokenizer, max_len=cfg.seq_len,
        cfg=batching.LoaderConfig(cfg.batch_size, shuffle=False, num_epochs=None)))

    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(cfg)
    params = parallel.shard(parallel.cast_floats(params, cfg.param_dtype), mesh)
    opt_state = parallel.shard(tx.init(params), mesh)
    train_step, eval_step = make_train_step(graphdef, tx, mesh)

    def save_model(sub, step):
        load_params_into(model, nnx.to_pure_dict(parallel.to_host(params)))
        save_bundle(workdir / sub, model, model_cfg, tokenizer, kind="lm",
                    extra={"stage": "sft", "step": step})

    loop = TrainLoop("sft", workdir, cfg.steps, checkpoint_every=cfg.checkpoint_every,
                     log_every=cfg.log_every, show=("lm/loss", "lm/accuracy"), wandb=cfg.wandb,
                     config=cfg, fingerprint=fp)
    params, opt_state = loop.restore((params, opt_state), data=loader)
    t0, tokens_seen, memory = time.perf_counter(), 0, None
    for step in loop.steps():
        batch = parallel.shard_batch(batching.arrays_only(loader.next()), mesh)
        if memory is None:  # compiled once, with XLA's per-device memory analysis
            train_step, memory = parallel.compile_with_memory(train_step, params, opt_state,
                                                              batch)
            common.remember_memory(workdir, "train_step", memory)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        loop.check_finite(step, metrics, ("lm/loss", "lm/grad_norm"))
        tokens_seen += cfg.batch_size * cfg.seq_len
        metrics["perf/tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
        loop.log(step, metrics)
        if step == cfg.steps // 2 and not (workdir / "half" / "model.json").exists():
            save_model("half", step)  # a second, weaker LM for the comparison collection
        loop.end_step(step, (params, opt_state), data=loader)
    loop.close()
    parallel.sync("sft-trained")  # process 0 has written every metrics row

    eval_batches = [parallel.shard_batch(batching.arrays_only(eval_rows.next()), mesh)
                    for _ in range(cfg.eval_batches)]
    if jax.process_count() > 1:  # compiled on every process before the first collective
        eval_step, _ = parallel.compile_with_memory(eval_step, params, eval_batches[0])
    evals = [parallel.to_host(eval_step(params, b)) for b in eval_batches]
    eval_loss = float(np.mean([e["lm/loss"] for e in evals]))
    save_model("final", cfg.steps)
    rows = read_metrics(workdir / "metrics.jsonl")
    plot_curves(rows, [("LM loss (train)", "lm/loss"), ("next-token accuracy", "lm/accuracy")],
                workdir / "loss.png", title="SFT")
    summary = {
        "stage": "sft", "steps": cfg.steps, "params": common.count_params(params),
        "train_loss": rows[-1]["lm/loss"] if rows else None,
        "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss),
        "vocab_size": model_cfg.vocab_size, "config": dataclasses.asdict(cfg),
        # per device, bytes (None: no step ever compiled for this run)
        "memory": {"train_step": common.remember_memory(workdir, "train_step", memory)},
    }
    write_summary(workdir, summary)
    print(f"[sft] eval loss {eval_loss:.3f} (ppl {math.exp(eval_loss):.1f}) -> {workdir}/final")
    return summary


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    """``(key, label, value, format)`` rows this stage adds to the pipeline's report."""
    return [("sft_eval_perplexity", "SFT held-out perplexity", summary.get("eval_perplexity"),
             ".1f")]


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
