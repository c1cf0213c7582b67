"""LoRA vs full fine-tuning: seconds per PPO iteration and bytes of trainable state, side by side.

Both sides run one PPO iteration (rollout + scoring + update, one jitted program, the state
donated) on the same random-initialised Llama-family base, f32:

* ``full``: :func:`rlhf_jax.ppo.make_ppo`; the trained tree is the whole policy + a value head on
  its hidden states (``value_head_on_policy``); the reference and the reward model
  (``ScalarModel``) are separate copies of the base.
* ``lora``: :func:`rlhf_jax.lora_ppo.make_lora_ppo`; the trained tree is the policy's adapters
  (rank ``--rank``, alpha 2·rank, every projection: q, k, v, out, up, gate, down) + the same value
  head; the reference is the base with adapters off and the reward model the base + its own
  adapters + a head, so the base is held once.

Prompts are random token ids of length ``query``; ``response`` new tokens at temperature 0.7 with
no stop token; KL coefficient 0.05 (fixed); GAE + whitening; ``epochs`` × ``minibatches`` Adam
updates. Each record (``benchmarks/common.py`` format, ``bench="lora"``, ``side`` = ``"full"`` or
``"lora"``) also holds ``trainable_bytes`` (trained parameters), ``opt_state_bytes`` (Adam's
state) and ``held_bytes`` (everything the iteration receives). ``common.py``'s RESULTS.md renderer
does not render these records; their figures are copied by hand into the "LoRA vs full
fine-tuning" section of ``benchmarks/RESULTS.md``, which the renderer keeps verbatim.

Usage: ``.venv/bin/python benchmarks/lora.py --cases tiny smollm2 --out F.json``
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/common.py)
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import lora_ppo, ppo  # noqa: E402
from rlhf_jax.generation import SamplingConfig  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.models.config import PRESETS  # noqa: E402
from rlhf_jax.models.heads import ScalarHead, ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.scoring import RewardScorer  # noqa: E402

MODELS = {"tiny": "tiny-llama", "smollm2": "smollm2-135m"}
CASES = {
    "tiny": dict(batch=8, query=32, response=32, epochs=4, minibatches=2),
    "smollm2": dict(batch=8, query=32, response=32, epochs=4, minibatches=2),
}


def _nbytes(tree) -> int:
    """Bytes of a pytree of arrays or ``ShapeDtypeStruct`` (a threefry key: 8 bytes)."""
    total = 0
    for x in jax.tree.leaves(tree):
        n = int(np.prod(x.shape))
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        total += n * (8 if key else np.dtype(x.dtype).itemsize)
    return total


def _setup(name: str, side: str, rank: int):
    """``(program, state, args, pcfg)`` of one side; ``args`` are the iteration's other
    arguments (reference or base, reward model, prompts, prompt mask)."""
    c, mcfg = CASES[name], PRESETS[MODELS[name]]
    vocab = mcfg.vocab_size
    pcfg = dataclasses.replace(
        ppo.PPOConfig(), batch_size=c["batch"], query_len=c["query"], response_len=c["response"],
        ppo_epochs=c["epochs"], num_minibatches=c["minibatches"], temperature=0.7,
        kl_coef=0.05, adaptive_kl=False, iterations=1000, value_head_on_policy=True)
    tx = ppo.make_optimizer(pcfg)
    scfg = SamplingConfig(max_new_tokens=c["response"], temperature=0.7, pad_id=vocab - 1,
                          min_new_tokens=c["response"])
    base = Transformer(mcfg, rngs=nnx.Rngs(params=0))
    head = ScalarHead(mcfg.d_model, init="value", rngs=nnx.Rngs(params=2))
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, vocab - 1, (c["batch"], c["query"])), jnp.int32)
    pmask = jnp.ones_like(prompts, bool)
    if side == "full":
        lm_def, ref = nnx.split(base)
        rm = ScalarModel.from_lm(base, "reward", nnx.Rngs(params=1))  # a copy of the base
        rm_def, rm_params = nnx.split(rm)
        program = ppo.make_ppo(pcfg, lm_def, nnx.graphdef(head), RewardScorer(rm_def, vocab - 1),
                               tx, scfg)
        state = ppo.init_state(pcfg, base, head, tx)
        state = state.replace(params=jax.tree.map(jnp.copy, state.params))  # donated, not ref
        args = (ref, rm_params, prompts, pmask)
    else:
        lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
        policy = lora.apply_lora(base, lcfg, rngs=nnx.Rngs(params=3))
        rm = lora.scalar_model_on_base(policy, lcfg, rngs=nnx.Rngs(params=1))
        s = lora_ppo.setup(policy, rm, vocab - 1)
        program = lora_ppo.make_lora_ppo(pcfg, s.lm_def, s.base_def, nnx.graphdef(head),
                                         s.reward, tx, scfg)
        state = lora_ppo.init_state(pcfg, s.policy_lora, head, tx)
        args = (s.base, s.rm_params, prompts, pmask)
    return program, state, args, pcfg


def state_bytes(state, args) -> dict[str, int]:
    """Trained parameters, optimizer state, and everything the iteration receives but the
    prompts."""
    return {"trainable_bytes": _nbytes(state.params), "opt_state_bytes": _nbytes(state.opt_state),
            "held_bytes": _nbytes((state, *args[:2]))}


def abstract_bytes(name: str, side: str, rank: int) -> dict[str, int]:
    """:func:`state_bytes` from shapes alone (``jax.eval_shape``: nothing is computed)."""
    return state_bytes(*jax.eval_shape(lambda: _setup(name, side, rank)[1:3]))


def run_side(name: str, side: str, rank: int, warmup: int, iters: int) -> dict:
    program, state, args, pcfg = _setup(name, side, rank)
    iteration = jax.jit(program.iteration, donate_argnums=(0,))
    sizes = state_bytes(state, args)
    box = {"state": state}
    del state

    def one():
        box["state"], metrics, _, _ = iteration(box["state"], *args)
        return box["state"].params, metrics

    timing = common.time_fn(one, warmup=warmup, iters=iters, sync=jax.block_until_ready)
    c, mcfg = CASES[name], PRESETS[MODELS[name]]
    config = dict(model=MODELS[name], layers=mcfg.num_layers, d_model=mcfg.d_model,
                  heads=mcfg.num_heads, kv_heads=mcfg.num_kv_heads, vocab=mcfg.vocab_size, **c,
                  temperature=0.7, rank=rank if side == "lora" else None,
                  device=str(jax.devices()[0].device_kind))
    notes = ("make_ppo: policy + value head trained, reference and reward model separate copies"
             if side == "full" else
             f"make_lora_ppo: rank-{rank} adapters on q,k,v,out,up,gate,down + value head "
             "trained; base held once (reference = adapters off; reward model = base + its own "
             "adapters + head)")
    rec = common.record("lora", name, side, timing, unit="s/iter", dtype="float32",
                        config=config, notes=notes, **sizes)
    gc.collect()
    return rec


def summary(records: list[dict]) -> list[str]:
    """Lines comparing the two sides of each case with the targets (≥1.5× faster, ≥10× less
    optimizer state)."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records):
        by = {r["side"]: r for r in records if r["case"] == case}
        if {"full", "lora"} <= set(by):
            f, lo = by["full"], by["lora"]
            speed = f["median"] / lo["median"]
            opt = f["opt_state_bytes"] / lo["opt_state_bytes"]
            lines.append(f"{case}: full {f['median']:.3f} s/iter, lora {lo['median']:.3f} s/iter "
                         f"-> {speed:.2f}x faster (target >= 1.5x: "
                         f"{'met' if speed >= 1.5 else 'not met'}); optimizer state "
                         f"{f['opt_state_bytes'] / 2**20:.1f} MiB vs "
                         f"{lo['opt_state_bytes'] / 2**20:.2f} MiB -> {opt:.0f}x less (target "
                         f">= 10x: {'met' if opt >= 10 else 'not met'}); held "
                         f"{f['held_bytes'] / 2**20:.1f} vs {lo['held_bytes'] / 2**20:.1f} MiB")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--sides", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; 3 for "
                   "smollm2; 2 with QUICK=1)")
    p.add_argument("--bytes-only", action="store_true",
                   help="print the bytes of each side from shapes alone (no run, no compile)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.bytes_only:
        for case in a.cases:
            for side in a.sides:
                print(case, side, {k: f"{v / 2**20:.2f} MiB"
                                   for k, v in abstract_bytes(case, side, a.rank).items()})
        return

    def iters(case: str) -> int:
        return a.iters or (2 if common.quick() else 3 if case == "smollm2" else 5)

    recs = []
    for case in a.cases:
        for side in a.sides:
            recs.append(run_side(case, side, a.rank, a.warmup, iters(case)))
            print(f"{case} {side}: {recs[-1]['median']:.3f} s/iter "
                  f"(first call {recs[-1]['first_s']:.1f} s)", file=sys.stderr, flush=True)
    common.write_results(a.out, recs, common.machine_info(str(jax.devices()[0].device_kind)))
    for line in summary(recs):
        print(line)


if __name__ == "__main__":
    main()
