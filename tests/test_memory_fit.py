"""benchmarks/memory_fit.py: the abstract-input compile sees the bytes the real sharded state
holds, LoRA needs less per device than full fine-tuning, and the layer fit is exact on lines."""
import os
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import parallel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import memory_fit as mf  # noqa: E402  (benchmarks/memory_fit.py)

# Wide enough that the weights, not the activations, dominate the per-device bytes.
SHAPE = mf.TINY_LLAMA.replace(num_layers=1, d_model=256, num_heads=4, num_kv_heads=2,
                              mlp_dim=768, vocab_size=2048)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(spec="fsdp=8")


def _compile(method, mesh):
    s = mf.default_setting(tiny=True)
    program, args = mf.iteration_args(method, SHAPE, s, mesh)
    return parallel.compile_with_memory(jax.jit(program.iteration, donate_argnums=(0,)),
                                        *args)[1], args


@pytest.mark.slow  # compiles two PPO programs at d_model 256 on 8 devices (~1 min idle)
def test_abstract_arguments_are_the_real_sharded_bytes_and_lora_is_smaller(mesh):
    s = mf.default_setting(tiny=True)
    reports = {}
    for method in ("full", "lora"):
        report, args = _compile(method, mesh)
        reports[method] = report
        _, state, ref, rm = mf.build(method, SHAPE, s, mesh, concrete=True)
        real = parallel.shard((state, ref, rm), mesh)
        c = s.case
        rng = np.random.default_rng(0)
        real += tuple(parallel.shard_batch(
            (rng.integers(0, 100, (c.batch, c.query)).astype(np.int32),
             np.ones((c.batch, c.query), bool)), mesh))
        # Same shapes, dtypes and shardings as the abstract inputs ...
        same = jax.tree.map(lambda a, r: (a.shape, a.dtype, a.sharding)
                            == (r.shape, r.dtype, r.sharding), args, real)
        assert all(jax.tree.leaves(same)), method
        # ... so XLA's argument bytes are what each device really holds.
        held = parallel.bytes_per_device(real)
        assert len(set(held.values())) == 1, held  # every device holds the same
        per_device = next(iter(held.values()))
        assert report["argument_bytes"] == pytest.approx(per_device, rel=0.01), method
        # fsdp=8: the weights are split, not replicated.
        assert per_device < 0.2 * mf.lora.tree_bytes((state, ref, rm))
    assert reports["lora"]["peak_bytes_estimate"] < reports["full"]["peak_bytes_estimate"]
    assert reports["lora"]["argument_bytes"] < 0.5 * reports["full"]["argument_bytes"]


def test_fit_recovers_a_line_and_reports_the_miss():
    line = {n: {f: 1000 + 7 * n * (i + 1) for i, f in enumerate(mf.FIELDS)} for n in (1, 2, 4)}
    out = mf.fit(line, 80)
    for i, f in enumerate(mf.FIELDS):
        assert out[f] == 1000 + 7 * 80 * (i + 1)
    assert out["max_residual_bytes"] == 0
    line[2]["temp_bytes"] += 50
    assert mf.fit(line, 80)["max_residual_bytes"] == pytest.approx(50)
