"""Which Llama-family model's PPO iteration fits on one device at ``fsdp=8``: XLA's per-device
memory of the compiled iteration, full fine-tuning and LoRA, without allocating a weight.

Each program is lowered and compiled for *abstract* inputs (``jax.ShapeDtypeStruct`` with the
``NamedSharding`` of :func:`rlhf_jax.parallel.shardings`, shapes from ``jax.eval_shape`` of the
init code), so a 70B shape compiles in a few GB of host memory; the figure is the compiled program's
:func:`rlhf_jax.parallel.memory_report` ``peak_bytes_estimate`` (arguments + outputs - donated
aliases + temporaries, per device) on 8 simulated CPU devices.

The two programs (one PPO iteration each: sampling with a KV cache, policy/reference/reward
forwards, GAE, ``epochs × minibatches`` Adam updates; the state donated):

* ``full``: :func:`rlhf_jax.ppo.make_ppo` with ``mesh`` (the state kept on the partition rules).
  Trained: the whole policy + a value head on its hidden states (``value_head_on_policy=True``,
  as ``benchmarks/lora.py``; no separate critic). Held besides: a reference copy and a reward
  model (a ``ScalarModel``: its own backbone + head). Every float leaf bf16 (``--param-dtype
  bfloat16`` of ``experiments/ppo.py``: :func:`rlhf_jax.parallel.cast_floats`), so Adam's two
  moments are bf16 too: 2 + 4 bytes per trained parameter, 2 + 2 for reference and reward model.
* ``lora``: :func:`rlhf_jax.lora_ppo.make_lora_ppo`, rank-8 adapters (alpha 16) on q, k, v, out,
  up, gate, down; the base held once, bf16 (reference = adapters off, reward model = base + its
  own adapters + head); adapters and heads f32, Adam over adapters and value head only.

Both: matmuls in bf16 with f32 accumulation (``compute_dtype="bfloat16"``), global batch
``--batch`` 64 prompts (8 per device), 64 prompt + 64 response tokens, 4 epochs × 2 minibatches;
``remat`` (per-block rematerialisation in the update's forwards) off, and on with ``--remat``.

Layers are a Python loop, so compile time grows with the layer count (on a loaded 2-core CPU a
1-2 layer iteration already takes 1.5-3 minutes to compile). So for each model the iteration is
compiled at ``--ladder`` layer counts (default 1 and 2) of the model's own widths (vocabulary,
d_model, heads, MLP), every component of the report is fitted as ``fixed + per_layer × layers``
through the outermost two, and the model's own layer count is extrapolated (a third count in the
ladder is a check: ``max_residual_bytes``); ``--direct NAME ...`` also compiles those models at
full depth, whose compiled figure then replaces the extrapolated one. The JSON keeps every
compiled figure and says which peak is compiled and which extrapolated.

Caveats: this is XLA:CPU's buffer assignment. GPU buffer assignment (and its fusions, collective
buffers, cuBLAS/cuDNN workspaces, the allocator's fragmentation and the CUDA context) differ, so a
model is called fitting only when its peak is at most ``--headroom`` (90%) of the device memory
(80 GB = 80e9 bytes, 141 GB = 141e9 bytes).

Usage::

    .venv/bin/python benchmarks/memory_fit.py            # the table: 24 compiles
    .venv/bin/python benchmarks/memory_fit.py --tiny     # tiny shapes, f32: a check (4 compiles)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flax import nnx  # noqa: E402
from gpu_scale import Case, ppo_config, sampling, TINY_LLAMA  # noqa: E402  (benchmarks/)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import lora_ppo, parallel, ppo  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import ScalarHead, ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.scoring import RewardScorer  # noqa: E402


def _llama(vocab, layers, d, heads, kv, ffn, tie, theta=500000.0) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab, num_layers=layers, d_model=d,
                       num_heads=heads, num_kv_heads=kv, mlp_dim=ffn, max_seq_len=4096,
                       rope_theta=theta, tie_embeddings=tie)


MODELS: dict[str, ModelConfig] = {
    "Llama-3.2-1B": _llama(128256, 16, 2048, 32, 8, 8192, True),
    "Llama-3.2-3B": _llama(128256, 28, 3072, 24, 8, 8192, True),
    "Llama-3.1-8B": _llama(128256, 32, 4096, 32, 8, 14336, False),
    "Llama-2-13B": _llama(32000, 40, 5120, 40, 40, 13824, False, 10000.0),
    "CodeLlama-34B": _llama(32000, 48, 8192, 64, 8, 22016, False, 1000000.0),
    "Llama-3.1-70B": _llama(128256, 80, 8192, 64, 8, 28672, False),
}
"""The published shapes (Hugging Face ``config.json``): 3.2-1B/3B tie the LM head to the
embedding, the others do not."""
TINY_MODELS = {"tiny-llama-3": TINY_LLAMA.replace(num_layers=3)}
DEVICES_GB = (80, 141)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything but the model shape that sets the memory."""
    case: Case
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    remat: bool = False
    rank: int = 8


def default_setting(tiny: bool, remat: bool = False, batch: int = 64) -> Setting:
    if tiny:
        return Setting(Case("tiny", TINY_LLAMA, 8, 8, 8, 2, 2), "float32", "float32", remat)
    return Setting(Case("gpu", TINY_LLAMA, batch, 64, 64, 4, 2), remat=remat)


def _cast(module: nnx.Module, dtype: str) -> None:
    nnx.update(module, parallel.cast_floats(nnx.state(module), dtype))


def build(method: str, mcfg: ModelConfig, s: Setting, mesh, concrete: bool = False):
    """``(program, state, ref_or_base, rm_params)`` of one method; the three trees are
    ``ShapeDtypeStruct`` (``jax.eval_shape`` of the init code: nothing is allocated), or with
    ``concrete`` the arrays themselves (unsharded; for a test at a small shape)."""
    c = s.case
    mcfg = mcfg.replace(compute_dtype=s.compute_dtype, remat=s.remat,
                        max_seq_len=max(mcfg.max_seq_len, c.query + c.response + 1))
    pcfg = ppo_config(c, value_head_on_policy=True)
    tx = ppo.make_optimizer(pcfg)
    pad = mcfg.vocab_size - 1
    scfg = sampling(c, pad)
    box = {}

    def init():
        head = ScalarHead(mcfg.d_model, init="value", rngs=nnx.Rngs(params=2))
        base = Transformer(mcfg, rngs=nnx.Rngs(params=0))
        if method == "full":
            rm = ScalarModel(mcfg, head_init="reward", rngs=nnx.Rngs(params=1))
            for m in (base, rm, head):  # before the optimizer state is built from them
                _cast(m, s.param_dtype)
            lm_def, ref = nnx.split(base)
            box["program"] = ppo.make_ppo(pcfg, lm_def, nnx.graphdef(head),
                                          RewardScorer(nnx.graphdef(rm), pad), tx, scfg,
                                          mesh=mesh)
            return ppo.init_state(pcfg, base, head, tx), ref, nnx.state(rm)
        _cast(base, s.param_dtype)  # the frozen base; adapters and heads stay f32
        lcfg = lora.LoraConfig(rank=s.rank, alpha=2.0 * s.rank)
        policy = lora.apply_lora(base, lcfg, rngs=nnx.Rngs(params=3))
        rm = lora.scalar_model_on_base(policy, lcfg, rngs=nnx.Rngs(params=1))
        st = lora_ppo.setup(policy, rm, pad)
        box["program"] = lora_ppo.make_lora_ppo(pcfg, st.lm_def, st.base_def,
                                                nnx.graphdef(head), st.reward, tx, scfg)
        return lora_ppo.init_state(pcfg, st.policy_lora, head, tx), st.base, st.rm_params

    state, ref, rm = init() if concrete else jax.eval_shape(init)
    return box["program"], state, ref, rm


def abstract(tree, mesh):
    """``tree``'s ``ShapeDtypeStruct`` leaves with the partition rules' shardings."""
    shard = parallel.shardings(tree, mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        tree, shard)


def prompts(c: Case, mesh):
    sh = parallel.data_sharding(mesh)
    return (jax.ShapeDtypeStruct((c.batch, c.query), np.int32, sharding=sh),
            jax.ShapeDtypeStruct((c.batch, c.query), np.bool_, sharding=sh))


def iteration_args(method: str, mcfg: ModelConfig, s: Setting, mesh):
    """``(program, args)``: the iteration's arguments as sharded ``ShapeDtypeStruct``."""
    program, state, ref, rm = build(method, mcfg, s, mesh)
    return program, (*abstract((state, ref, rm), mesh), *prompts(s.case, mesh))


def compile_memory(method: str, mcfg: ModelConfig, s: Setting, mesh) -> dict:
    """The per-device memory report of one compiled iteration, with compile seconds."""
    t0 = time.perf_counter()
    program, args = iteration_args(method, mcfg, s, mesh)
    _, report = parallel.compile_with_memory(jax.jit(program.iteration, donate_argnums=(0,)),
                                             *args)
    report["compile_s"] = time.perf_counter() - t0
    return report


def param_count(mcfg: ModelConfig) -> int:
    shapes = jax.eval_shape(lambda: nnx.state(Transformer(mcfg, rngs=nnx.Rngs(params=0))))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes_estimate")


def fit(points: dict[int, dict], layers: int) -> dict:
    """Each field as ``fixed + per_layer × layers`` through the two outermost compiled layer
    counts, evaluated at ``layers``; ``max_residual_bytes`` is the largest miss at the inner
    ones (0 with two points)."""
    ls = sorted(points)
    lo, hi = ls[0], ls[-1]
    out = {"fitted_from_layers": ls}
    worst = 0.0
    for f in FIELDS:
        per = (points[hi][f] - points[lo][f]) / (hi - lo)
        fixed = points[lo][f] - per * lo
        out[f] = int(round(fixed + per * layers))
        out[f"{f}_per_layer"] = per
        out[f"{f}_fixed"] = fixed
        worst = max([worst] + [abs(points[k][f] - (fixed + per * k)) for k in ls[1:-1]])
    out["max_residual_bytes"] = worst
    return out


def fits(peak: int, gb: int, headroom: float) -> bool:
    return peak <= headroom * gb * GB


def run(models: dict[str, ModelConfig], s: Setting, ladder: tuple[int, ...], direct: set[str],
        methods: tuple[str, ...], mesh, log=None) -> list[dict]:
    log = log or (lambda m: print(m, flush=True))
    rows = []
    for name, mcfg in models.items():
        row = {"model": name, "params": param_count(mcfg), "layers": mcfg.num_layers,
               "shape": dataclasses.asdict(mcfg)}
        for method in methods:
            points = {}
            for n in ladder:
                if n >= mcfg.num_layers:
                    continue
                points[n] = compile_memory(method, mcfg.replace(num_layers=n), s, mesh)
                log(f"[memory_fit] {name} {method} {n} layers: "
                    f"{points[n]['peak_bytes_estimate'] / GB:.3f} GB/device "
                    f"(compiled in {points[n]['compile_s']:.0f} s)")
            res = {"compiled": {str(k): v for k, v in points.items()}}
            if name in direct or len(points) < 2:
                full = compile_memory(method, mcfg, s, mesh)
                res["compiled"][str(mcfg.num_layers)] = full
                log(f"[memory_fit] {name} {method} {mcfg.num_layers} layers: "
                    f"{full['peak_bytes_estimate'] / GB:.3f} GB/device "
                    f"(compiled in {full['compile_s']:.0f} s)")
            if len(points) >= 2:
                res["extrapolated"] = fit(points, mcfg.num_layers)
            full_rep = res["compiled"].get(str(mcfg.num_layers))
            res["peak_bytes"] = (full_rep or res["extrapolated"])["peak_bytes_estimate"]
            res["peak_from"] = "compiled" if full_rep else "extrapolated"
            row[method] = res
        rows.append(row)
    return rows


def table(rows: list[dict], methods: tuple[str, ...], headroom: float) -> list[str]:
    head = ["model", "params"]
    for m in methods:
        head += [f"{m} peak GB/device"] + [f"{m} fits {g} GB" for g in DEVICES_GB]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e9:.2f}B"]
        for m in methods:
            peak = r[m]["peak_bytes"]
            mark = "" if r[m]["peak_from"] == "compiled" else "*"
            cells.append(f"{peak / GB:.1f}{mark}")
            cells += ["yes" if fits(peak, g, headroom) else "no" for g in DEVICES_GB]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def largest(rows: list[dict], methods: tuple[str, ...], headroom: float) -> list[str]:
    out = []
    for g in DEVICES_GB:
        for m in methods:
            ok = [r for r in rows if fits(r[m]["peak_bytes"], g, headroom)]
            best = max(ok, key=lambda r: r["params"])["model"] if ok else "none of these"
            out.append(f"{g} GB, {m}: {best}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, f32 (a check of the script)")
    p.add_argument("--models", nargs="*", default=None, help="a subset of the models")
    p.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--ladder", type=int, nargs="+", default=None,
                   help="layer counts compiled for the fit (default 1 2)")
    p.add_argument("--direct", nargs="*", default=None,
                   help="models also compiled at full depth (default: none)")
    p.add_argument("--batch", type=int, default=64, help="global batch (split over 8 devices)")
    p.add_argument("--remat", action="store_true", help="per-block rematerialisation on")
    p.add_argument("--headroom", type=float, default=0.9,
                   help="fits when peak <= headroom x device memory")
    p.add_argument("--mesh", default="fsdp=8")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/memory_fit.json; --tiny: none)")
    a = p.parse_args(argv)
    models = TINY_MODELS if a.tiny else MODELS
    if a.models:
        models = {k: models[k] for k in a.models}
    ladder = tuple(a.ladder or (1, 2))
    direct = set(a.direct or ())
    s = default_setting(a.tiny, a.remat, a.batch)
    mesh = parallel.make_mesh(spec=a.mesh)
    t0 = time.perf_counter()
    rows = run(models, s, ladder, direct, tuple(a.methods), mesh)
    c = s.case
    out = {"mesh": dict(mesh.shape), "devices": jax.device_count(),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "setting": {"global_batch": c.batch, "per_device_batch": c.batch //
                       parallel.batch_devices(mesh), "query": c.query, "response": c.response,
                       "epochs": c.epochs, "minibatches": c.minibatches,
                       "param_dtype": s.param_dtype, "compute_dtype": s.compute_dtype,
                       "remat": s.remat, "lora_rank": s.rank, "critic": "value head on policy",
                       "headroom": a.headroom, "device_gb": list(DEVICES_GB)},
           "ladder": list(ladder), "rows": rows, "total_seconds": time.perf_counter() - t0}
    lines = table(rows, tuple(a.methods), a.headroom)
    out["table"] = lines
    out["largest"] = largest(rows, tuple(a.methods), a.headroom)
    path = a.out or (None if a.tiny else os.path.join(os.path.dirname(__file__), "results",
                                                      "memory_fit.json"))
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))
    print("* extrapolated from the compiled layer counts " + str(list(ladder)))
    print("largest fitting (peak <= "
          f"{a.headroom:.0%} of the device): " + "; ".join(out["largest"]))
    return out


if __name__ == "__main__":
    main()
