import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import parallel


def test_harness_has_eight_devices_and_strict_ranks():
    assert jax.device_count() == 8
    assert jax.config.jax_numpy_rank_promotion == "raise"
    with pytest.raises(ValueError):
        jnp.ones((2, 3)) + jnp.ones((3,))


def test_jit_over_mesh_matches_single_device(mesh8):
    x = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)

    @jax.jit
    def f(x, w):
        h = jnp.tanh(x @ w)
        return h.sum(axis=1), jnp.mean(h)

    one = f(jax.device_put(x, jax.devices()[0]), w)
    xs = parallel.shard_batch(x, mesh8)
    assert len(xs.sharding.device_set) == 8
    many = f(xs, parallel.replicate(w, mesh8))
    assert len(many[0].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(many[0]), np.asarray(one[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(many[1]), float(one[1]), rtol=1e-6)


def test_shard_batch_rejects_indivisible_batch(mesh8):
    with pytest.raises(ValueError, match="not divisible"):
        parallel.shard_batch({"tokens": np.zeros((6, 3))}, mesh8)
