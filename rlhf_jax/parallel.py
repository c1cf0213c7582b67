"""Device meshes and sharding rules: the same code on 1 CPU, 8 GPUs or a TPU pod.

Parallelism is `jax.jit` over a `Mesh` with `NamedSharding` (``pmap`` is in maintenance mode). The
batch is split over the ``data`` axis; parameters are replicated (an ``fsdp`` axis can shard them
when models grow). Multi-host: call :func:`initialize_distributed` first on every host;
``jax.devices()`` then spans all hosts and the same mesh code applies.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(**kwargs) -> bool:
    """Multi-host set-up: ``jax.distributed.initialize(**kwargs)`` when arguments are given or a
    cluster environment (SLURM, Open MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``) is detected;
    a no-op for a plain single process. Call it before any other JAX call. Returns whether it
    initialised."""
    import os
    if kwargs or any(os.environ.get(k) for k in _CLUSTER_ENV):
        jax.distributed.initialize(**kwargs)
        return True
    return False


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``num_devices`` devices (all by default).

    Axes are ``Auto`` so sharding propagates through jitted code without explicit annotations.
    """
    n = num_devices or jax.device_count()
    if n % fsdp:
        raise ValueError(f"num_devices={n} is not divisible by fsdp={fsdp}")
    devices = jax.devices()[:n]
    return jax.make_mesh((n // fsdp, fsdp), (DATA, FSDP),
                         axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Place every array of a pytree with its leading axis split over ``data``.

    Raises a ``ValueError`` naming the leaf when its batch size does not divide the data axis.
    """
    n = mesh.shape[DATA]

    def put(path, x):
        if x.shape and x.shape[0] % n:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading size "
                             f"{x.shape[0]}, not divisible by the {n} devices of the data axis")
        return jax.device_put(x, data_sharding(mesh) if x.shape else replicated(mesh))

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
