"""Test harness: every test runs on 8 simulated CPU devices with rank promotion disabled.

The flags must be set before JAX initialises its backends, so they live at the top of conftest.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D ('data',) mesh over the 8 simulated CPU devices."""
    from rlhf_jax import parallel
    return parallel.make_mesh()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, run once for the whole session (IMDB built into a temporary data dir):
    ``(pipeline config, pipeline summary)``; the stages' folders are
    ``pipeline.stage_configs(cfg)[name].workdir``."""
    import dataclasses

    from experiments import pipeline
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = dataclasses.replace(pipeline.PRESETS["tiny"], root=str(root / "run"),
                              data_dir=str(root / "tfds"))
    summary = pipeline.train(cfg)
    return cfg, summary


# Identical programs compiled by different tests (e.g. several runs of the same tiny experiment)
# are read back from a persistent cache instead of being compiled again.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RLHF_JAX_TEST_CACHE", "/tmp/rlhf_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
