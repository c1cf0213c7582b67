"""GPU-scale measurements in one command: the chip's bf16 matmul rate and memory bandwidth, the PPO
iteration at GPT-2-124M (batch 64, 64 + 64 tokens) and at a ~1.1B Llama shape (random weights,
bf16 compute), the update's MFU against the measured matmul rate, and sampling tokens/s at batch
128 against the HBM-bandwidth bound, with the weights stored in f32 and in bf16.

Usage (one GPU, ≤ 8 minutes)::

    python benchmarks/gpu_scale.py --out benchmarks/results/gpu_scale.json

``--tiny`` runs the same code with tiny shapes and f32 compute (on the CPU in about a minute): a
check that the script works, not a measurement. TRL's side of the PPO comparison is
``benchmarks/baseline/`` (its own environment); run it on the same GPU and shapes for the ratio.

Definitions:

* matmul rate: best of ``[n, n] @ [n, n]`` bf16 inputs with f32 accumulation, ``2 n³`` FLOPs.
* bandwidth: best of ``y = x * 2`` over a large f32 array: bytes read + written per second.
* update MFU: model FLOPs of the PPO update (epochs × minibatches, policy + critic forward and
  backward; PaLM's ``6 N`` per token + attention) / update seconds / measured matmul rate.
* sampling bound: each decode step reads every parameter once (at its stored width) and the KV
  cache written so far; ``tokens/s ≤ B · bandwidth / bytes per step`` (averaged over the steps).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import parallel, ppo  # noqa: E402
from rlhf_jax.generation import sample_split, SamplingConfig  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.config import PRESETS as MODEL_PRESETS  # noqa: E402
from rlhf_jax.models.heads import ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.scoring import RewardScorer  # noqa: E402

LLAMA_1B = ModelConfig(family="llama", vocab_size=32000, num_layers=22, d_model=2048,
                       num_heads=32, num_kv_heads=4, mlp_dim=5632, max_seq_len=2048)
"""TinyLlama-1.1B's shape."""
TINY_LLAMA = MODEL_PRESETS["tiny-llama"].replace(num_layers=1)  # --tiny: compiling is the cost
TINY_GPT2 = MODEL_PRESETS["tiny"].replace(num_layers=1)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    batch: int
    query: int
    response: int
    epochs: int = 4
    minibatches: int = 2
    dtype: str = "bfloat16"
    """Compute dtype on a GPU (``--tiny`` runs everything in f32)."""


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [Case("gpt2-shape", TINY_GPT2, 8, 8, 8, 2, 2),
                Case("llama-shape", TINY_LLAMA, 8, 8, 8, 2, 2)]
    # GPT-2 in f32 (TF32 matmuls, JAX's GPU default) like TRL's side; the 1.1B shape in bf16.
    return [Case("gpt2-124m", MODEL_PRESETS["gpt2"], 64, 64, 64, dtype="float32"),
            Case("llama-1.1b", LLAMA_1B, 16, 64, 64, 2, 2)]


def best_seconds(fn, reps: int) -> tuple[float, float]:
    """(best of ``reps`` timed calls, seconds of the first call, which compiles)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())  # compile
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), first


def matmul_rate(n: int, reps: int) -> float:
    """FLOP/s of a bf16 ``[n, n] @ [n, n]`` with f32 accumulation (best of ``reps``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2.0 * n ** 3 / best_seconds(lambda: f(a, b), reps)[0]


def bandwidth(n_bytes: int, reps: int) -> float:
    """Bytes/s read + written by ``x * 2`` over an f32 array of ``n_bytes``."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 2)
    return 2.0 * n_bytes / best_seconds(lambda: f(x), reps)[0]


def matmul_params(cfg: ModelConfig, lm_head: bool) -> int:
    """Weights that take part in matmuls: q/k/v/out and MLP per block (+ the LM head)."""
    h = cfg.head_dim
    attn = (cfg.d_model * (cfg.num_heads + 2 * cfg.num_kv_heads) * h
            + cfg.num_heads * h * cfg.d_model)
    mlp = (3 if cfg.family == "llama" else 2) * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * (attn + mlp) + (cfg.vocab_size * cfg.d_model if lm_head else 0)


def update_flops(c: Case) -> float:
    """PPO update model FLOPs: per epoch, forward + backward of policy (LM head on the response
    positions only) and critic over ``B · (Tq + Tr)`` tokens."""
    cfg, t = c.model, c.query + c.response
    tokens = c.batch * t
    body = (6.0 * matmul_params(cfg, False) * tokens
            + 12.0 * cfg.num_layers * t * cfg.d_model * tokens)
    head = 6.0 * c.batch * c.response * cfg.vocab_size * cfg.d_model
    return c.epochs * (2 * body + head)


def ppo_config(c: Case, **changes) -> ppo.PPOConfig:
    """The benchmark's PPO hyper-parameters for case ``c`` (fixed β, temperature 0.7)."""
    return dataclasses.replace(ppo.PPOConfig(), batch_size=c.batch, query_len=c.query,
                               response_len=c.response, ppo_epochs=c.epochs,
                               num_minibatches=c.minibatches, temperature=0.7, kl_coef=0.05,
                               adaptive_kl=False, iterations=1000, **changes)


def sampling(c: Case, pad: int) -> SamplingConfig:
    """Fixed-length responses (no stop token) at the benchmark's temperature."""
    return SamplingConfig(max_new_tokens=c.response, temperature=0.7, pad_id=pad,
                          min_new_tokens=c.response)


def ppo_case(c: Case, reps: int, mesh, dtype: str) -> dict:
    seq = max(c.model.max_seq_len, c.query + c.response + 1)
    mcfg = c.model.replace(compute_dtype=dtype, max_seq_len=seq)
    pcfg = ppo_config(c)
    policy = Transformer(mcfg, rngs=nnx.Rngs(params=0))
    rm = ScalarModel(mcfg, head_init="reward", rngs=nnx.Rngs(params=1))
    critic = ScalarModel(mcfg, head_init="value", rngs=nnx.Rngs(params=2))
    lm_def, ref = nnx.split(policy)
    pad = mcfg.vocab_size - 1
    tx = ppo.make_optimizer(pcfg)
    scfg = sampling(c, pad)
    program = ppo.make_ppo(pcfg, lm_def, nnx.graphdef(critic), RewardScorer(nnx.graphdef(rm), pad),
                           tx, scfg, mesh=mesh)
    state = parallel.shard(ppo.init_state(pcfg, policy, critic, tx), mesh)
    ref = parallel.shard(jax.tree.map(jnp.copy, ref), mesh)
    rm_params = parallel.shard(nnx.state(rm), mesh)
    del policy, rm, critic
    rng = np.random.default_rng(1)
    batch = parallel.shard_batch({"t": rng.integers(0, pad, (c.batch, c.query)).astype(np.int32),
                                  "m": np.ones((c.batch, c.query), bool)}, mesh)
    t0 = time.perf_counter()
    iteration, memory = parallel.compile_with_memory(
        jax.jit(program.iteration, donate_argnums=(0,)), state, ref, rm_params, batch["t"],
        batch["m"])
    compile_s = time.perf_counter() - t0
    box = {"s": state}

    def one():
        box["s"], _, _, _ = iteration(box["s"], ref, rm_params, batch["t"], batch["m"])
        return box["s"].params

    iter_s, _ = best_seconds(one, reps)
    rollout, _, _ = jax.jit(program.rollout)(box["s"], ref, rm_params, batch["t"], batch["m"],
                                             jax.random.key(0))
    upd = jax.jit(program.update, donate_argnums=(0, 1))
    ubox = {"p": box["s"].params, "o": box["s"].opt_state}

    def update_once():
        ubox["p"], ubox["o"], _ = upd(ubox["p"], ubox["o"], ref, rollout, jax.random.key(1))
        return ubox["p"]

    update_s, update_first_s = best_seconds(update_once, reps)
    return {"case": c.name, "shape": dataclasses.asdict(c.model), "batch": c.batch,
            "query": c.query, "response": c.response, "epochs": c.epochs,
            "minibatches": c.minibatches, "compute_dtype": dtype, "iteration_s": iter_s,
            "iteration_compile_s": compile_s, "update_first_call_s": update_first_s,
            "update_s": update_s,
            "update_flops": update_flops(c), "memory_per_device": memory}


def sampling_case(cfg: ModelConfig, batch: int, query: int, new: int, reps: int, mesh,
                  dtype: str, weights_dtype: str = "float32") -> dict:
    """Sampling tokens/s; ``weights_dtype`` is the stored width of the weights (the bound counts
    the bytes actually stored)."""
    mcfg = cfg.replace(compute_dtype=dtype)
    model = Transformer(mcfg, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model)
    params = parallel.shard(parallel.cast_floats(params, weights_dtype), mesh)
    pad = mcfg.vocab_size - 1
    scfg = SamplingConfig(max_new_tokens=new, temperature=1.0, pad_id=pad, min_new_tokens=new)
    rng = np.random.default_rng(0)
    b = parallel.shard_batch({"t": rng.integers(0, pad, (batch, query)).astype(np.int32),
                              "m": np.ones((batch, query), bool)}, mesh)
    f = jax.jit(lambda p, t, m: sample_split(graphdef, p, t, m, jax.random.key(0), scfg).tokens)
    s, first_s = best_seconds(lambda: f(params, b["t"], b["m"]), reps)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_per_slot = (2 * mcfg.num_layers * batch * mcfg.num_kv_heads * mcfg.head_dim
                   * jnp.dtype(dtype).itemsize)
    mean_slots = query + new / 2
    bytes_per_step = param_bytes + kv_per_slot * mean_slots
    return {"shape": dataclasses.asdict(cfg), "batch": batch, "query": query, "new_tokens": new,
            "compute_dtype": dtype, "weights_dtype": weights_dtype, "seconds": s,
            "first_call_s": first_s,
            "tokens_per_s": batch * new / s, "param_bytes": param_bytes,
            "bytes_per_step": bytes_per_step}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the script)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. fsdp=8 (default: all on data)")
    p.add_argument("--skip", nargs="*", default=(), choices=("gpt2-124m", "llama-1.1b",
                                                             "gpt2-shape", "llama-shape"))
    p.add_argument("--out", default=None, help="JSON output path (also printed)")
    args = p.parse_args(argv)
    mesh = parallel.make_mesh(spec=args.mesh)
    # bf16 compute on accelerators; XLA's CPU runtime lacks some bf16 x bf16 -> f32 dots.
    dtype = "float32" if args.tiny else "bfloat16"
    t_start = time.perf_counter()
    peak = matmul_rate(256 if args.tiny else 8192, args.reps)
    bw = bandwidth((8 << 20) if args.tiny else (2 << 30), args.reps)
    out = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "mesh": dict(mesh.shape), "jax": jax.__version__, "tiny": args.tiny,
           "bf16_matmul_flops_per_s": peak, "bandwidth_bytes_per_s": bw, "ppo": []}

    def save():  # after every part, so a run stopped at its time limit keeps what it measured
        out["total_seconds"] = time.perf_counter() - t_start
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(out, indent=2, default=str) + "\n")

    save()
    print(f"[gpu_scale] {out['device']}: bf16 matmul {peak / 1e12:.2f} TFLOP/s, "
          f"bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    # Sampling before the 1.1B case: that case's compile is the longest, and a run stopped at
    # its time limit should still have the GPT-2 figures.
    ppo_cases = [c for c in cases(args.tiny) if c.name not in args.skip]

    def run_ppo(c: Case) -> None:
        r = ppo_case(c, args.reps, mesh, "float32" if args.tiny else c.dtype)
        r["update_mfu"] = r["update_flops"] / r["update_s"] / peak / jax.device_count()
        out["ppo"].append(r)
        save()
        print(f"[gpu_scale] PPO {c.name} B={c.batch} ({r['compute_dtype']}): "
              f"{r['iteration_s']:.3f} s/iter (compile {r['iteration_compile_s']:.0f} s), "
              f"update {r['update_s']:.3f} s, MFU {r['update_mfu']:.1%} of the bf16 rate",
              flush=True)

    for c in ppo_cases[:1]:
        run_ppo(c)
    # f32 weights (what training holds), then the same weights stored in bf16: fewer bytes per
    # decode step, so a higher bound, and more tokens/s if the step is memory-bound.
    weights = [("sampling", "float32")] + ([("sampling_bf16_weights", dtype)]
                                           if dtype != "float32" else [])  # --tiny: f32 only
    for key, wdtype in weights:
        sc = sampling_case(TINY_GPT2 if args.tiny else MODEL_PRESETS["gpt2"],
                           16 if args.tiny else 128, 8 if args.tiny else 64,
                           8 if args.tiny else 128, args.reps, mesh, dtype, wdtype)
        sc["bound_tokens_per_s"] = sc["batch"] * bw / sc["bytes_per_step"]
        sc["fraction_of_bound"] = sc["tokens_per_s"] / sc["bound_tokens_per_s"]
        out[key] = sc
        save()
        print(f"[gpu_scale] sampling B={sc['batch']}, {wdtype} weights: "
              f"{sc['tokens_per_s']:.0f} tokens/s, {sc['fraction_of_bound']:.1%} of the "
              "bandwidth bound", flush=True)
    for c in ppo_cases[1:]:
        run_ppo(c)
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
