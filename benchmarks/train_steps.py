"""Ours: seconds per SFT step and per reward-model step (GPT-2 small shape), with MFU.

Mirrors ``benchmarks/baseline/trl_sft.py`` (batch 8, length 256, masked LM loss, AdamW) and
``benchmarks/baseline/trl_reward.py`` (batch 8 pairs, length 128, Bradley–Terry loss, AdamW), using
the experiments' own jitted steps (``experiments.sft.make_train_step``,
``experiments.reward.make_steps``) on random-initialised weights and random token ids. MFU = model
FLOPs (``common.train_flops``) / median step time / the matmul peak measured by ``peak.py`` in the
same ``make bench`` run (computed when RESULTS.md is rendered).

Usage::

    .venv/bin/python benchmarks/train_steps.py --out F.json [--compute-dtype float32 bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/common.py)
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import reward, sft  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402

VOCAB = 50257
SHAPES = {"tiny": (2, 128, 4), "gpt2": (12, 768, 12)}


def model_config(shape: str, dtype: str) -> ModelConfig:
    layers, d, heads = SHAPES[shape]
    return ModelConfig(family="gpt2", vocab_size=VOCAB, num_layers=layers, d_model=d,
                       num_heads=heads, num_kv_heads=heads, mlp_dim=4 * d, max_seq_len=1024,
                       compute_dtype=dtype)


def bench_sft(shape: str, dtype: str, warmup: int, iters: int, batch=8, length=256) -> dict:
    model = Transformer(model_config(shape, dtype), rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-5)
    box = {"p": params, "o": tx.init(params)}
    step, _ = sft.make_train_step(graphdef, tx)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, length)).astype(np.int32)
    b = {"tokens": tokens, "mask": np.ones_like(tokens, bool),
         "loss_mask": np.ones_like(tokens, bool)}

    def one():
        box["p"], box["o"], m = step(box["p"], box["o"], b)
        return m

    timing = common.time_fn(one, warmup=warmup, iters=iters, sync=jax.block_until_ready)
    layers, d, heads = SHAPES[shape]
    flops = common.train_flops(layers, d, VOCAB, length, batch * length)
    return common.record("sft", shape, "ours", timing, unit="s/step", dtype=dtype, flops=flops,
                         config=dict(layers=layers, d_model=d, heads=heads, vocab=VOCAB,
                                     batch=batch, length=length, compute_dtype=dtype,
                                     device=str(jax.devices()[0].device_kind)))


def bench_reward(shape: str, dtype: str, warmup: int, iters: int, pairs=8, length=128) -> dict:
    rm = ScalarModel(model_config(shape, dtype), head_init="reward", rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(rm)
    tx = optax.adamw(1e-5)
    box = {"p": params, "o": tx.init(params)}
    step, _ = reward.make_steps(graphdef, tx, "ranking")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (pairs, 2, length)).astype(np.int32)
    b = {"tokens": tokens, "mask": np.ones_like(tokens, bool),
         "response_mask": np.ones_like(tokens, bool),
         "ranks": np.tile(np.array([[0, 1]], np.int32), (pairs, 1)),
         "valid": np.ones((pairs, 2), bool)}

    def one():
        box["p"], box["o"], m = step(box["p"], box["o"], b)
        return m

    timing = common.time_fn(one, warmup=warmup, iters=iters, sync=jax.block_until_ready)
    layers, d, heads = SHAPES[shape]
    flops = common.train_flops(layers, d, VOCAB, length, 2 * pairs * length, lm_head=False)
    return common.record("reward", shape, "ours", timing, unit="s/step", dtype=dtype, flops=flops,
                         config=dict(layers=layers, d_model=d, heads=heads, vocab=VOCAB,
                                     pairs=pairs, length=length, compute_dtype=dtype,
                                     device=str(jax.devices()[0].device_kind)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compute-dtype", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    iters = a.iters or (2 if common.quick() else 5)
    recs = []
    for dt in a.compute_dtype:
        recs.append(bench_sft(a.shape, dt, a.warmup, iters))
        recs.append(bench_reward(a.shape, dt, a.warmup, iters))
    common.write_results(a.out, recs, common.machine_info(str(jax.devices()[0].device_kind)))


if __name__ == "__main__":
    main()
