import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer, load_state


def _state(seed):
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3.0)},
        "step": jnp.asarray(7, jnp.int32),
        "key": jax.random.fold_in(k, 1),
    }


def test_save_restore_is_bit_identical_and_keys_draw_the_same(tmp_path):
    state = _state(0)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(3, state, {"step": 3, "data": {"index": 12}})
        ckpt.save(5, _state(1), {"step": 5})
        assert ckpt.latest_step() == 5
        restored, meta = ckpt.restore(_state(9), step=3)
    assert meta == {"step": 3, "data": {"index": 12}}
    for a, b in zip(jax.tree.leaves(jax.tree.map(jax.random.key_data, state["key"])),
                    jax.tree.leaves(jax.tree.map(jax.random.key_data, restored["key"]))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(restored["params"]["b"], state["params"]["b"])
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (5,)),
                                  jax.random.normal(state["key"], (5,)))


def test_restore_into_abstract_template_and_missing_dir(tmp_path):
    state = _state(2)
    with Checkpointer(tmp_path / "a") as ckpt:
        ckpt.save(1, state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = load_state(tmp_path / "a", abstract)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_state(tmp_path / "empty", abstract)
