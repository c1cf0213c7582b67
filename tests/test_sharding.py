"""FSDP sharding on the 8 simulated CPU devices: mesh parsing, the partition rules, and an SFT step,
a reward-model step and a PPO iteration under ``fsdp=8`` and ``data=2,fsdp=4`` against the same
programs on one device; a checkpoint saved at ``fsdp=8`` restored on one device."""
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import reward as reward_exp
from experiments import sft as sft_exp
from rlhf_jax import parallel, ppo
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.scoring import RewardScorer

CFG = PRESETS["tiny"].replace(num_layers=1)  # one block: compiling is the cost
MESHES = (None, "fsdp=8", "data=2,fsdp=4")
B, T, EOS, PAD = 8, 12, 3, 0


def _mesh(spec):
    return parallel.make_mesh(1) if spec is None else parallel.make_mesh(spec=spec)


def _close(a, b, tol=1e-5, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _specs(tree):
    """Each leaf's partition spec without trailing ``None`` (``P(None, None)`` is ``P()``)."""
    out = []
    for x in jax.tree.leaves(tree):
        spec = list(x.sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        out.append(tuple(spec))
    return out


# ------------------------------------------------------------------------------------------------
# Meshes and rules.

def test_mesh_spec_parses_and_infers_the_data_axis():
    assert parallel.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parallel.mesh_shape("fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    mesh = parallel.make_mesh(spec="data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.batch_devices(mesh) == 4
    for bad, msg in (("data=2,fsdp=2", "multiply to 4, but 8 devices"),
                     ("fsdp=3", "do not divide the 8 devices"), ("pipe=2", "AXIS=SIZE"),
                     ("fsdp=0", "not a positive integer"), ("fsdp=2,fsdp=4", "given twice")):
        with pytest.raises(ValueError, match=msg):
            parallel.mesh_shape(bad, 8)
        assert parallel.mesh_errors(bad, 8)[0].startswith(f"mesh={bad!r}")
    assert parallel.mesh_errors("data=2,fsdp=4", 8) == []


def test_fsdp8_holds_an_eighth_of_params_and_adam_state_per_device():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optax.adam(1e-3)
    mesh = parallel.make_mesh(spec="fsdp=8")
    sharded = parallel.shard(params, mesh)
    opt = parallel.shard(tx.init(params), mesh)
    leaves = jax.tree.leaves(params)
    total = sum(x.nbytes for x in leaves)
    small = sum(x.nbytes for x in leaves if x.size < parallel.MIN_SHARD_SIZE)
    assert small < total / 50  # the replicated leaves are norms and biases only
    per_device = parallel.bytes_per_device(sharded)
    assert len(per_device) == 8
    assert max(per_device.values()) <= total / 8 + small
    # Every large leaf is split: its largest dimension (all divide 8 here) over fsdp.
    for x, s in zip(leaves, jax.tree.leaves(sharded)):
        if x.size >= parallel.MIN_SHARD_SIZE:
            assert s.sharding.spec[int(np.argmax(x.shape))] == "fsdp", x.shape
            assert s.addressable_shards[0].data.size == x.size // 8
        else:
            assert s.sharding.is_fully_replicated
    # Adam's moments are sharded like their parameters; the state is 1/8 per device too.
    adam = opt[0]
    assert _specs(adam.mu) == _specs(sharded) == _specs(adam.nu)
    assert max(parallel.bytes_per_device(opt).values()) <= 2 * (total / 8 + small) + 64


# ------------------------------------------------------------------------------------------------
# The stages' steps under each mesh equal the one-device results.

def _lm_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[::3, :4] = False  # left padding
    return {"tokens": tokens, "mask": mask, "loss_mask": mask.copy()}


@functools.lru_cache(maxsize=None)
def _sft_program(spec):
    """The SFT experiment's step for a mesh, compiled once per test session."""
    graphdef = nnx.graphdef(Transformer(CFG, rngs=nnx.Rngs(0)))
    cfg = dataclasses.replace(sft_exp.PRESETS["tiny"], steps=10, warmup_steps=1)
    tx = sft_exp.make_optimizer(cfg)
    mesh = _mesh(spec)
    return tx, mesh, sft_exp.make_train_step(graphdef, tx, mesh)[0]


def _sft_run(spec, steps=2):
    params = nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tx, mesh, train_step = _sft_program(spec)
    params = parallel.shard(params, mesh)
    opt = parallel.shard(tx.init(params), mesh)
    specs = _specs(params)
    out = []
    for s in range(steps):
        params, opt, m = train_step(params, opt, parallel.shard_batch(_lm_batch(s), mesh))
        out.append(parallel.to_host(m))
    assert _specs(params) == specs  # the step keeps the parameters sharded as they came
    return parallel.to_host(params), out, (params, opt, train_step, mesh)


@pytest.mark.parametrize("spec", [
    "fsdp=8", pytest.param("data=2,fsdp=4", marks=pytest.mark.slow)])
def test_sft_steps_under_fsdp_equal_one_device(spec):
    ref_params, ref_metrics, _ = _sft_run(None)
    params, metrics, _ = _sft_run(spec)
    _close(params, ref_params, what=f"{spec} params")
    _close(metrics, ref_metrics, what=f"{spec} metrics")


@pytest.mark.slow
def test_reward_model_step_under_fsdp_equals_one_device():
    rng = np.random.default_rng(0)
    k = 3
    tokens = rng.integers(4, CFG.vocab_size, (B, k, T)).astype(np.int32)
    mask = np.ones((B, k, T), bool)
    rmask = np.zeros((B, k, T), bool)
    rmask[..., T // 2:] = True
    batch = {"tokens": tokens, "mask": mask, "response_mask": rmask,
             "ranks": np.tile(np.arange(k, dtype=np.int32), (B, 1)),
             "valid": np.ones((B, k), bool)}
    results = []
    for spec in MESHES:
        graphdef, params = nnx.split(ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1)))
        # A larger eps than Adam's 1e-8: the key biases and the head's bias get a zero gradient
        # (softmax and Bradley-Terry are shift invariant), and Adam would scale their rounding
        # noise, which differs between meshes, up to a full ±lr step.
        tx = optax.adamw(1e-3, eps=1e-4)
        mesh = _mesh(spec)
        params = parallel.shard(params, mesh)
        opt = parallel.shard(tx.init(params), mesh)
        step, score = reward_exp.make_steps(graphdef, tx, "ranking", "last", EOS, mesh)
        params, opt, m = step(params, opt, parallel.shard_batch(batch, mesh))
        scores = score(params, *parallel.shard_batch((tokens, mask, rmask), mesh))
        results.append(parallel.to_host((params, m, scores)))
    for spec, got in zip(MESHES[1:], results[1:]):
        _close(got, results[0], what=f"{spec} ")


@pytest.mark.slow
def test_ppo_iteration_under_fsdp_equals_one_device():
    lm = Transformer(CFG, rngs=nnx.Rngs(0))
    rm = ScalarModel(CFG, head_init="reward", rngs=nnx.Rngs(1))
    critic = ScalarModel(CFG, head_init="value", rngs=nnx.Rngs(2))
    cfg = dataclasses.replace(ppo.PPOConfig(), batch_size=B, query_len=6, response_len=5,
                              ppo_epochs=2, num_minibatches=2, iterations=4)
    lm_def, ref = nnx.split(lm)
    tx = ppo.make_optimizer(cfg)
    prompts = _lm_batch(3)
    prompt, pmask = prompts["tokens"][:, :6], prompts["mask"][:, :6]
    results = []
    for spec in MESHES:
        mesh = _mesh(spec)
        prog = ppo.make_ppo(cfg, lm_def, nnx.graphdef(critic),
                            RewardScorer(nnx.graphdef(rm), EOS), tx,
                            ppo.sampling_config(cfg, PAD, EOS), mesh=mesh)
        step = jax.jit(prog.iteration)
        state = parallel.shard(ppo.init_state(cfg, lm, critic, tx), mesh)
        specs = _specs(state.params)
        batch = parallel.shard_batch({"t": prompt, "m": pmask}, mesh)
        state, metrics, resp, rmask = step(state, parallel.shard(ref, mesh),
                                           parallel.shard(nnx.state(rm), mesh), batch["t"],
                                           batch["m"])
        assert _specs(state.params) == specs
        results.append(parallel.to_host((state.params, metrics, resp, rmask)))
    for spec, (params, metrics, resp, rmask) in zip(MESHES[1:], results[1:]):
        np.testing.assert_array_equal(resp, results[0][2], err_msg=spec)
        np.testing.assert_array_equal(rmask, results[0][3], err_msg=spec)
        _close(metrics, results[0][1], what=f"{spec} metrics ")
        _close(params, results[0][0], what=f"{spec} params ")


def test_checkpoint_saved_at_fsdp8_restores_on_one_device_and_continues(tmp_path):
    _, _, (params, opt, train_step, mesh8) = _sft_run("fsdp=8", steps=1)
    one_step = _sft_program(None)[2]
    saved = parallel.to_host((params, opt))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, (params, opt), {"step": 1})
    one = _mesh(None)
    # The template: the same tree placed on one device (only shapes, dtypes, shardings count).
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=parallel.replicated(one)),
                            saved)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        (p1, o1), meta = ckpt.restore(template)
    assert meta["step"] == 1
    assert {d for x in jax.tree.leaves(p1) for d in x.sharding.device_set} == {jax.devices()[0]}
    for a, b in zip(jax.tree.leaves(parallel.to_host((p1, o1))), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    # The next step on one device equals the next step the fsdp=8 run takes.
    batch = _lm_batch(1)
    p1, o1, m1 = one_step(p1, o1, parallel.shard_batch(batch, one))
    p8, o8, m8 = train_step(params, opt, parallel.shard_batch(batch, mesh8))
    _close(parallel.to_host((p1, o1, m1)), parallel.to_host((p8, o8, m8)), what="continued ")
    assert jnp.isfinite(m1["lm/loss"])


# ------------------------------------------------------------------------------------------------
# Memory: per-layer rematerialisation and the compiled program's memory report.

def test_remat_keeps_gradients_and_reports_memory():
    from rlhf_jax import losses
    from rlhf_jax.models.transformer import positions_from_mask
    cfg = PRESETS["tiny"].replace(num_layers=4)
    batch = {k: np.tile(v, (2, 8)) for k, v in _lm_batch(0).items()}  # [16, 96]

    def grad_fn(remat):
        graphdef, params = nnx.split(Transformer(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))

        def loss(params, b):
            logits, _, _ = nnx.merge(graphdef, params)(
                b["tokens"], positions_from_mask(b["mask"]), b["mask"])
            return losses.lm_loss(logits, b["tokens"], b["loss_mask"])[0]

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, batch))
        blocks = jaxpr.count("checkpoint[") + jaxpr.count("remat")
        assert blocks == (cfg.num_layers if remat else 0)
        compiled, memory = parallel.compile_with_memory(jax.jit(jax.grad(loss)), params, batch)
        return compiled(params, batch), memory

    (g0, m0), (g1, _) = grad_fn(False), grad_fn(True)
    _close(g1, g0, tol=1e-6, what="remat grads ")
    assert set(m0) >= {"argument_bytes", "output_bytes", "temp_bytes", "peak_bytes_estimate"}
    assert m0["argument_bytes"] >= sum(x.nbytes for x in jax.tree.leaves(batch))
    assert m0["peak_bytes_estimate"] == (m0["argument_bytes"] + m0["output_bytes"]
                                         - m0["alias_bytes"] + m0["temp_bytes"])


def test_bf16_params_and_adam_state_take_half_the_bytes_and_stay_bf16():
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.device_get(params)  # host copies: the steps donate their device buffers
    tx = sft_exp.make_optimizer(dataclasses.replace(sft_exp.PRESETS["tiny"], warmup_steps=1))
    mesh = _mesh("fsdp=8")
    step = sft_exp.make_train_step(graphdef, tx, mesh)[0]
    out = {}
    for dtype in ("float32", "bfloat16"):
        p = parallel.shard(parallel.cast_floats(params, dtype), mesh)
        o = parallel.shard(tx.init(p), mesh)
        held = sum(parallel.bytes_per_device((p, o)).values())
        for s in range(2):
            p, o, m = step(p, o, parallel.shard_batch(_lm_batch(s), mesh))
        dtypes = {x.dtype for x in jax.tree.leaves((p, o)) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(dtype)}, dtypes  # the step keeps the storage dtype
        out[dtype] = held, float(m["lm/loss"])
    (b32, loss32), (b16, loss16) = out["float32"], out["bfloat16"]
    assert b16 < 0.51 * b32
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
