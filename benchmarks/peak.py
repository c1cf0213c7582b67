"""The machine's measured matmul peak, the denominator of every MFU figure.

JAX (run in ``.venv``): f32 ``jnp.dot`` and bf16 inputs with f32 accumulation
(``lax.dot_general(..., preferred_element_type=jnp.float32)``, what our ``compute_dtype="bfloat16"``
option does) on square N³ products. PyTorch (run in ``.venv-baseline``): f32 ``torch.mm``, for the
TRL side's MFU. Each figure is the best of several timed runs (a peak, not a median), after a
warm-up. FLOPs of one N³ product = 2·N³.

Usage::

    .venv/bin/python benchmarks/peak.py --backend jax --out benchmarks/out/peak_jax.json
    .venv-baseline/bin/python benchmarks/peak.py --backend torch \
        --out benchmarks/out/peak_torch.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _best_seconds(fn, sync, reps: int, warmup: int = 2, min_run_s: float = 0.2) -> list[float]:
    """Per-call seconds of ``reps`` runs, each run repeating ``fn`` until it lasts ``min_run_s``."""
    for _ in range(warmup):
        sync(fn())
    t0 = time.perf_counter()
    sync(fn())
    one = time.perf_counter() - t0
    inner = max(1, int(min_run_s / max(one, 1e-6)))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            r = fn()
        sync(r)
        out.append((time.perf_counter() - t0) / inner)
    return out


def jax_peaks(sizes: list[int], reps: int) -> tuple[list[dict], str]:
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    device = f"{dev.platform}:{dev.device_kind}"
    recs = []
    key_a, key_b = jax.random.split(jax.random.key(0))
    for n in sizes:
        a32 = jax.random.normal(key_a, (n, n), jnp.float32)
        b32 = jax.random.normal(key_b, (n, n), jnp.float32)
        a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
        f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
        bf16 = jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32))
        for dtype, fn, args, how in (
                ("float32", f32, (a32, b32), "jnp.dot f32, precision=HIGHEST"),
                ("bfloat16", bf16, (a16, b16), "bf16 inputs, preferred_element_type=f32"),
        ):
            runs = _best_seconds(lambda: fn(*args), jax.block_until_ready, reps)
            recs.append(common.record(
                "peak", f"{dtype}-{n}", "jax", common.summarize(runs), unit="FLOP/s",
                dtype=dtype, value=2.0 * n**3 / min(runs), notes=f"{n}³, {how}"))
    return recs, device


def torch_peaks(sizes: list[int], reps: int) -> tuple[list[dict], str]:
    import torch

    torch.set_num_threads(os.cpu_count())
    recs = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        runs = _best_seconds(lambda: torch.mm(a, b), lambda r: None, reps)
        recs.append(common.record(
            "peak", f"float32-{n}", "torch", common.summarize(runs), unit="FLOP/s",
            dtype="float32", value=2.0 * n**3 / min(runs),
            notes=f"{n}³, torch.mm f32, {torch.get_num_threads()} threads"))
    return recs, f"cpu (torch {torch.__version__})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("jax", "torch"), default="jax")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="matrix sizes N (default 2048 4096; QUICK=1: 1024 2048)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per size (default 5)")
    p.add_argument("--out", default=None, help="JSON output path (also printed)")
    a = p.parse_args()
    sizes = a.sizes or ([1024, 2048] if common.quick() else [2048, 4096])
    reps = a.reps or (3 if common.quick() else 5)
    recs, device = (jax_peaks if a.backend == "jax" else torch_peaks)(sizes, reps)
    for r in recs:
        r["quick"] = common.quick()
    common.write_results(a.out, recs, common.machine_info(device))


if __name__ == "__main__":
    main()
