"""Ours: seconds per PPO iteration of ``rlhf_jax.ppo.make_ppo`` (one compiled program).

Mirrors ``benchmarks/baseline/trl_ppo.py``: random-initialised GPT-2-shaped policy, reference,
reward
model and separate value model, f32, prompts of random token ids of length ``query``, ``response``
new tokens at temperature 0.7 with no stop token, KL coefficient 0.05 (fixed), GAE + whitening,
``epochs`` × ``minibatches`` Adam updates of policy + value model. One iteration = rollout + scoring
+ update, timed end to end (``block_until_ready`` on the returned state). The update's share for MFU
is timed separately with the same function minus the rollout (``update_only``).

Usage: ``.venv/bin/python benchmarks/ppo.py --cases tiny gpt2 --out F.json``
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/common.py)
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import ppo  # noqa: E402
from rlhf_jax.generation import SamplingConfig  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.scoring import RewardScorer  # noqa: E402

VOCAB = 50257
SHAPES = {"tiny": (2, 128, 4), "gpt2": (12, 768, 12)}
CASES = {
    "tiny": dict(batch=8, query=16, response=16, epochs=4, minibatches=1),
    "gpt2": dict(batch=16, query=64, response=32, epochs=4, minibatches=2),
}


def run_case(name: str, warmup: int, iters: int, compute_dtype: str) -> dict:
    c = CASES[name]
    layers, d, heads = SHAPES[name]
    mcfg = ModelConfig(family="gpt2", vocab_size=VOCAB, num_layers=layers, d_model=d,
                       num_heads=heads, num_kv_heads=heads, mlp_dim=4 * d, max_seq_len=1024,
                       compute_dtype=compute_dtype)
    pcfg = dataclasses.replace(
        ppo.PPOConfig(), batch_size=c["batch"], query_len=c["query"], response_len=c["response"],
        ppo_epochs=c["epochs"], num_minibatches=c["minibatches"], temperature=0.7,
        kl_coef=0.05, adaptive_kl=False, iterations=1000)
    policy = Transformer(mcfg, rngs=nnx.Rngs(params=0))
    rm = ScalarModel(mcfg, head_init="reward", rngs=nnx.Rngs(params=1))
    critic = ScalarModel(mcfg, head_init="value", rngs=nnx.Rngs(params=2))
    lm_def, ref_params = nnx.split(policy)
    ref_params = jax.tree.map(jnp.copy, ref_params)
    rm_def, rm_params = nnx.split(rm)
    tx = ppo.make_optimizer(pcfg)
    scfg = SamplingConfig(max_new_tokens=c["response"], temperature=0.7, pad_id=VOCAB - 1,
                          min_new_tokens=c["response"])
    program = ppo.make_ppo(pcfg, lm_def, nnx.graphdef(critic), RewardScorer(rm_def, VOCAB - 1),
                           tx, scfg)
    iteration = jax.jit(program.iteration, donate_argnums=(0,))
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, VOCAB - 1, (c["batch"], c["query"])), jnp.int32)
    pmask = jnp.ones_like(prompts, bool)
    box = {"state": ppo.init_state(pcfg, policy, critic, tx)}

    def one():
        box["state"], metrics, _, _ = iteration(box["state"], ref_params, rm_params, prompts,
                                                pmask)
        return box["state"].params

    timing = common.time_fn(one, warmup=warmup, iters=iters, sync=jax.block_until_ready)

    # The update alone (for MFU): the same epochs × minibatches scan on one fixed rollout.
    state = box["state"]
    batch, _, _ = jax.jit(program.rollout)(state, ref_params, rm_params, prompts, pmask,
                                           jax.random.key(0))
    upd = jax.jit(program.update)
    ubox = {"p": state.params, "o": state.opt_state}

    def update_once():
        ubox["p"], ubox["o"], _ = upd(ubox["p"], ubox["o"], ref_params, batch,
                                      jax.random.key(1))
        return ubox["p"]

    update_timing = common.time_fn(update_once, warmup=warmup, iters=iters,
                                   sync=jax.block_until_ready)
    seq = c["query"] + c["response"]
    flops = common.ppo_update_flops(layers, d, VOCAB, c["batch"], seq, c["epochs"],
                                    c["response"])
    config = dict(layers=layers, d_model=d, heads=heads, vocab=VOCAB, **c, temperature=0.7,
                  compute_dtype=compute_dtype, device=str(jax.devices()[0].device_kind))
    return common.record("ppo", name, "ours", timing, unit="s/iter", dtype=compute_dtype,
                         config=config, update_s=update_timing,
                         mfu_part={"name": "PPO update", "flops": flops,
                                   "median": update_timing["median"]},
                         notes="rlhf_jax.ppo.make_ppo: one jitted program "
                               "(while_loop sampler + 4 forwards + GAE + scan over "
                               "epochs×minibatches)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default 5; 3 for gpt2)")
    p.add_argument("--compute-dtype", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    a = p.parse_args()

    def iters(case: str) -> int:  # as baseline/trl_ppo.py: 3 timed gpt2 iterations (~1.5 min each)
        return a.iters or (2 if common.quick() else 3 if case == "gpt2" else 5)

    recs = [run_case(n, a.warmup, iters(n), dt) for n in a.cases for dt in a.compute_dtype]
    common.write_results(a.out, recs, common.machine_info(str(jax.devices()[0].device_kind)))


if __name__ == "__main__":
    main()
