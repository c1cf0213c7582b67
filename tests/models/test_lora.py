"""LoRA (rlhf_jax.models.lora) on the tiny GPT-2 and tiny Llama configs: the adapted model starts
exactly at the base, merged == unmerged, adapters off == base without a copy, only adapters get
gradients, adapter checkpoints round-trip and refuse a different base, merged HF export loads in
transformers."""
import functools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models import lora
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import positions_from_mask, Transformer

B, T = 2, 9
FAMILIES = ["tiny", "tiny-llama"]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32)
    mask = np.ones((B, T), bool)
    mask[0, :3] = False  # left padding
    mask = jnp.asarray(mask)
    return tokens, positions_from_mask(mask), mask


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, states, tokens, pos, mask):
    return nnx.merge(graphdef, *states)(tokens, pos, mask)[0]


def _logits(graphdef, *states, batch):
    """Logits ``[B, T, V]`` of the merged model (one compiled program per graph and shape)."""
    return np.asarray(_forward(graphdef, states, *batch))


def _perturb(model, scale=0.3, seed=1):
    """Random adapters (B != 0), as after training (NumPy draws: no per-shape compiles)."""
    parts = lora.split(model)
    leaves, treedef = jax.tree.flatten(parts.lora)
    rng = np.random.default_rng(seed)
    new = [np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in new]))
    return model


@pytest.mark.parametrize("targets", [("q", "k", "v", "out", "up", "down", "gate"),
                                     ("qkv", "down")])
@pytest.mark.parametrize("preset", FAMILIES)
def test_adapted_model_starts_exactly_at_the_base(preset, targets):
    cfg = PRESETS[preset]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg.vocab_size)
    base_def, base_state = nnx.split(model)
    want = _logits(base_def, base_state, batch=batch)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, targets=targets),
                    rngs=nnx.Rngs(1))
    parts = lora.split(model)
    assert jax.tree.leaves(parts.lora), "no adapters attached"
    # A is random, B is zero.
    for _, _, adapter in lora.adapters(model):
        for _, _, _, pair in adapter.pairs():
            assert np.abs(np.asarray(pair.a[...])).max() > 0 and not np.any(pair.b[...])
    got = _logits(parts.graphdef, lora.join(parts.lora, parts.base), batch=batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The base state is the plain model's state, leaf for leaf (same structure, same arrays).
    assert jax.tree.structure(parts.base) == jax.tree.structure(base_state)
    for a, b in zip(jax.tree.leaves(parts.base), jax.tree.leaves(base_state)):
        assert a is b
    # Removing the adapters gives back the plain graph.
    assert lora.base_graphdef(model) == base_def


@pytest.mark.parametrize("preset", FAMILIES)
def test_merged_equals_unmerged_and_adapters_off_is_the_base(preset):
    cfg = PRESETS[preset]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg.vocab_size, 1)
    base_def, base_state = nnx.split(model)
    base_logits = _logits(base_def, base_state, batch=batch)
    _perturb(lora.apply_lora(model, lora.LoraConfig(4, 16.0), rngs=nnx.Rngs(1)))
    parts = lora.split(model)
    adapted = _logits(parts.graphdef, parts.lora, parts.base, batch=batch)
    assert np.abs(adapted - base_logits).max() > 1e-2  # the adapters do something

    merged = lora.merge_lora(model)
    assert lora.lora_config(merged) is None and not lora.adapters(merged)
    m_def, m_state = nnx.split(merged)
    assert m_def == base_def  # a plain Transformer again
    np.testing.assert_allclose(_logits(m_def, m_state, batch=batch), adapted, atol=1e-5, rtol=0)
    # merge_lora leaves its input untouched.
    assert lora.adapters(model)
    for a, b in zip(jax.tree.leaves(lora.split(model).base), jax.tree.leaves(base_state)):
        assert a is b

    # Adapters off: the base graph on the adapted model's own base arrays (no copy) is the base.
    off = lora.base_model(model)
    for a, b in zip(jax.tree.leaves(nnx.state(off)), jax.tree.leaves(base_state)):
        assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
    np.testing.assert_array_equal(_logits(lora.base_graphdef(model), parts.base, batch=batch),
                                  base_logits)


def _jaxpr_out_shapes(jaxpr) -> set:
    """Shapes of every value any equation (nested jaxprs included) produces."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes |= _jaxpr_out_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes |= _jaxpr_out_shapes(sub)
    return shapes


@pytest.mark.parametrize("preset", FAMILIES)
def test_only_adapters_receive_gradients(preset):
    cfg = PRESETS[preset]
    model = lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lora.LoraConfig(2, 4.0),
                            rngs=nnx.Rngs(1))
    parts = lora.split(model)
    tokens, pos, mask = _batch(cfg.vocab_size, 2)

    def loss(lora_params, base):
        logits = nnx.merge(parts.graphdef, lora_params, base)(tokens, pos, mask)[0]
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[
            jnp.arange(B)[:, None], jnp.arange(T - 1)[None], tokens[:, 1:]])

    grad_fn = jax.value_and_grad(loss)  # w.r.t. the adapters only
    tx = optax.adam(1e-2)

    @jax.jit
    def step(lora_params, opt_state, base):
        grads = grad_fn(lora_params, base)[1]
        updates, opt_state = tx.update(grads, opt_state, lora_params)
        return grads, optax.apply_updates(lora_params, updates), opt_state

    # No weight gradient of a base kernel is ever formed: no value in the differentiated program
    # has the shape of a base matrix (activations have B·T = 18 rows, adapters rank 2).
    kernel_shapes = {tuple(x.shape) for x in jax.tree.leaves(parts.base) if x.ndim >= 2}
    shapes = _jaxpr_out_shapes(jax.make_jaxpr(grad_fn)(parts.lora, parts.base).jaxpr)
    assert not kernel_shapes & shapes, kernel_shapes & shapes
    full = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(parts.lora, parts.base).jaxpr
    assert kernel_shapes & _jaxpr_out_shapes(full)  # the check can fail: full grads form them

    # One Adam step: the optimizer state is the adapters' size; the base does not move.
    opt_state = tx.init(parts.lora)
    moments = lora.tree_bytes(opt_state) - 2 * lora.tree_bytes(parts.lora)
    assert 0 <= moments <= 16  # Adam's m and v per adapter leaf + the step count
    lora_before = [np.asarray(x).copy() for x in jax.tree.leaves(parts.lora)]
    base_before = [np.asarray(x).copy() for x in jax.tree.leaves(parts.base)]
    grads, new_lora, _ = step(parts.lora, opt_state, parts.base)
    assert jax.tree.structure(grads) == jax.tree.structure(parts.lora)
    paths = [p for p, _ in nnx.to_flat_state(grads)]
    assert paths and all(str(p[-2]) in lora.TARGETS and p[-1] in ("a", "b") for p in paths)
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads)) > 0
    nnx.update(model, new_lora)
    after = lora.split(model)
    for a, b in zip(jax.tree.leaves(after.base), base_before):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(np.abs(np.asarray(a) - b).max() > 0
               for a, b in zip(jax.tree.leaves(after.lora), lora_before))


def test_targets_adapt_the_named_heads_only():
    cfg = PRESETS["tiny-llama"]  # N = 4 query heads, K = 2 kv heads, H = 16
    model = _perturb(lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)),
                                     lora.LoraConfig(3, 3.0, targets=("k",)), rngs=nnx.Rngs(1)))
    assert [p for _, p, _ in lora.adapters(model)] == ["qkv"] * cfg.num_layers
    merged = lora.merge_lora(model)
    n, k = cfg.num_heads, cfg.num_kv_heads
    for blk, mblk in zip(model.blocks, merged.blocks):
        diff = np.abs(np.asarray(mblk.attn.qkv[...]) - np.asarray(blk.attn.qkv[...])).max((0, 2))
        assert np.all(diff[:n] == 0) and np.all(diff[n + k:] == 0) and np.all(diff[n:n + k] > 0)
        assert np.array_equal(mblk.mlp.up[...], blk.mlp.up[...])
    # Parameter count of the default targets, by hand: per layer (r = 2, D = 64, F = 192)
    # q, k, v: D·r + r·n·H; out: N·H·r + r·D; up, gate: D·r + r·F; down: F·r + r·D.
    model = lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lora.LoraConfig(2, 2.0),
                            rngs=nnx.Rngs(1))
    d, f, h, r = cfg.d_model, cfg.mlp_dim, cfg.head_dim, 2
    per_layer = (3 * d * r + r * (n + 2 * k) * h) + (n * h * r + r * d) + 3 * (d * r + r * f)
    assert sum(x.size for x in jax.tree.leaves(lora.split(model).lora)) == \
        cfg.num_layers * per_layer
    # GPT-2 has no gate: skipped from the defaults, an error when it is the only target.
    gpt2 = lora.apply_lora(Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0)),
                           lora.LoraConfig(2, 2.0), rngs=nnx.Rngs(1))
    assert sorted({p for _, p, _ in lora.adapters(gpt2)}) == ["down", "out", "qkv", "up"]
    with pytest.raises(ValueError, match="match no projection of a gpt2 model"):
        lora.apply_lora(Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0)),
                        lora.LoraConfig(2, 2.0, targets=("gate",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(gpt2, lora.LoraConfig(2, 2.0), rngs=nnx.Rngs(1))


def test_invalid_lora_configs_are_listed_together():
    with pytest.raises(ValueError) as e:
        lora.LoraConfig(rank=0, alpha=float("nan"), targets=("qkv", "q", "ffn"), dropout=0.1)
    msg = str(e.value)
    for part in ("rank=0", "alpha=nan", "'ffn'", "'qkv' adapts the whole", "dropout=0.1"):
        assert part in msg
    assert lora.LoraConfig(8, 16).scale == 2.0
    assert lora.LoraConfig(8, 16, targets=["q", "v"]).targets == ("q", "v")


def test_adapter_checkpoint_round_trips_and_refuses_another_base(tmp_path):
    cfg = PRESETS["tiny-llama"]
    lcfg = lora.LoraConfig(4, 8.0, targets=("q", "v", "down"))
    model = _perturb(lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lcfg,
                                     rngs=nnx.Rngs(1)))
    digest = lora.base_hash(model)
    assert digest == lora.base_hash(Transformer(cfg, rngs=nnx.Rngs(0)))  # deterministic
    out = lora.save_adapters(tmp_path / "adapters", model, "runs/sft/final", digest)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base_hash"] == digest and meta["base_path"] == "runs/sft/final"
    assert meta["lora"]["targets"] == ["q", "v", "down"]

    fresh = Transformer(cfg, rngs=nnx.Rngs(0))  # the same base, no adapters yet
    lora.load_adapters(out, fresh)
    assert lora.lora_config(fresh) == lcfg
    saved, loaded = lora.split(model), lora.split(fresh)
    assert jax.tree.structure(saved.lora) == jax.tree.structure(loaded.lora)
    for a, b in zip(jax.tree.leaves(saved.lora), jax.tree.leaves(loaded.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise

    other = Transformer(cfg, rngs=nnx.Rngs(5))
    with pytest.raises(ValueError) as e:
        lora.load_adapters(out, other, base_path="runs/other/final")
    msg = str(e.value)
    for part in (digest, lora.base_hash(other), "runs/sft/final", "runs/other/final"):
        assert part in msg
    assert lora.lora_config(other) is None  # nothing was attached
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        lora.load_adapters(tmp_path, fresh)

    # A LoRA reward model: adapters + head saved, the base shared with the policy's hash.
    rm = lora.scalar_model_on_base(model, lcfg, rngs=nnx.Rngs(2))
    assert lora.base_hash(rm) == digest
    rm_dir = lora.save_adapters(tmp_path / "rm", _perturb(rm, seed=3), "runs/sft/final")
    fresh_rm = ScalarModel(cfg, head_init="reward", rngs=nnx.Rngs(9))
    nnx.update(fresh_rm.backbone, nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    lora.load_adapters(rm_dir, fresh_rm)
    a, b = lora.split(rm), lora.split(fresh_rm)
    for x, y in zip(jax.tree.leaves((a.lora, a.rest)), jax.tree.leaves((b.lora, b.rest))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.torch
@pytest.mark.parametrize("preset", FAMILIES)
def test_merged_export_loads_in_transformers(preset, tmp_path):
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0")
    from transformers import AutoModelForCausalLM

    cfg = PRESETS[preset]
    model = _perturb(lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lora.LoraConfig(4, 8.0),
                                     rngs=nnx.Rngs(1)))
    tokens, pos, mask = _batch(cfg.vocab_size, 4)
    parts = lora.split(model)
    ours = np.asarray(_logits(parts.graphdef, parts.lora, parts.base,
                              batch=(tokens, pos, mask)))
    lora.save_merged_pretrained(model, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(np.asarray(tokens)),
                          attention_mask=torch.tensor(np.asarray(mask)).long(),
                          position_ids=torch.tensor(np.asarray(pos))).logits.numpy()
    m = np.asarray(mask)
    assert float(np.abs(ours - theirs)[m].max()) < 1e-4
