"""Device meshes, sharding rules and multi-process helpers: the same code on 1 CPU, 8 GPUs, several
processes or a TPU pod.

Parallelism is `jax.jit` over a `Mesh` with `NamedSharding` (``pmap`` is in maintenance mode). The
mesh has three named axes (``Auto``, so XLA propagates shardings through jitted code):

* ``data``: batches are split over it (pure data parallelism, parameters replicated along it);
* ``fsdp``: batches are split over it too, and every large parameter — and its Adam moments — is
  sharded over it (:func:`param_spec`: the largest dimension divisible by the axis size), so a
  device holds ``1/fsdp`` of the parameters and optimizer state; XLA gathers a layer's weights
  where the jitted step needs them (ZeRO-3 / FSDP);
* ``tensor`` (optional): a second parameter dimension is split over it; batches are replicated
  along it.

Chosen on the command line as ``--mesh data=2,fsdp=4`` (:func:`parse_mesh`; an axis left out is 1,
except ``data``, which takes the devices the others leave). Without ``--mesh`` the mesh is
``data=N`` and everything is replicated, as before.

Multi-process (several hosts, or ``python -m rlhf_jax.launch --nproc 2 -- ...`` on one):
:func:`initialize_distributed` first, on every process; then ``jax.devices()`` spans all processes
and the same mesh code applies. Every process computes with the same *global* batch in host memory
(:func:`shard_batch` keeps the rows of its own devices), :func:`put` builds global arrays from host
values without cross-process transfers, :func:`to_host` fetches arrays that span processes, and
only :func:`is_main` writes files other than checkpoints (orbax coordinates those itself).
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
AXES = (DATA, FSDP, TENSOR)
"""The mesh axes, in order."""
BATCH_AXES = (DATA, FSDP)
"""Axes a batch's leading dimension is split over."""
MIN_SHARD_SIZE = 1024
"""Parameters with fewer elements (norm scales, biases) stay replicated."""

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(**kwargs) -> bool:
    """Multi-process set-up: ``jax.distributed.initialize`` when arguments are given or a cluster
    environment is detected; a no-op for a plain single process (or when already initialised).
    Call it before any other JAX call. Returns whether it initialised.

    Detected: ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what
    :mod:`rlhf_jax.launch` sets; passed explicitly), SLURM, Open MPI, Cloud TPU. CPU collectives
    go over gloo (the CPU backend has no other cross-process implementation); GPUs and TPUs use
    the platform's own.
    """
    env = os.environ
    if not kwargs and not any(env.get(k) for k in _CLUSTER_ENV):
        return False
    if jax.distributed.is_initialized():
        return False
    if not kwargs and env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                  "num_processes": int(env["JAX_NUM_PROCESSES"]),
                  "process_id": int(env["JAX_PROCESS_ID"])}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def is_main() -> bool:
    """Whether this is process 0: the one that writes metrics, summaries, plots and bundles."""
    return jax.process_index() == 0


_SYNCS = [0]


def sync(name: str, timeout_s: float = 3600.0) -> None:
    """A barrier across processes (a no-op for one process): every process waits here until all
    have arrived, e.g. while process 0 writes files the others then read.

    It waits on the ``jax.distributed`` coordination service, not through a device collective
    (whose CPU/gloo set-up gives up when the processes arrive more than 30 s apart). Every
    process must call the same syncs in the same order."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client; orbax waits on it the same way
    _SYNCS[0] += 1
    distributed.global_state.client.wait_at_barrier(f"rlhf_jax:{_SYNCS[0]}:{name}",
                                                    int(timeout_s * 1000))


# ------------------------------------------------------------------------------------------------
# Meshes.

def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``.

    Raises:
      ValueError: an unknown axis, a repeated one, or a size that is not a positive integer.
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {AXES}")
        if name in out:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        try:
            n = int(size)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"mesh {spec!r}: {name}={size.strip()!r} is not a positive integer")
        out[name] = n
    return out


def mesh_shape(spec: str | None, num_devices: int) -> dict[str, int]:
    """The sizes of all three axes for ``spec`` on ``num_devices`` devices (``data`` takes the
    devices the named axes leave when it is not named).

    Raises:
      ValueError: ``spec`` does not parse, or its sizes do not multiply to ``num_devices``.
    """
    sizes = parse_mesh(spec) if spec else {}
    rest = math.prod(v for k, v in sizes.items() if k != DATA)
    if DATA not in sizes:
        if num_devices % rest:
            raise ValueError(f"mesh {spec!r}: the axis sizes ({rest}) do not divide the "
                             f"{num_devices} devices")
        sizes[DATA] = num_devices // rest
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(f"mesh {spec!r}: the axis sizes multiply to {total}, but {num_devices} "
                         "devices are used; make the product equal the device count (or "
                         "choose the devices with --num-devices)")
    return {a: sizes.get(a, 1) for a in AXES}


def mesh_errors(spec: str | None, num_devices: int | None = None) -> list[str]:
    """Config validation: ``["mesh=...: why"]`` when ``spec`` is unusable (empty: fine)."""
    if spec is None:
        return []
    try:
        mesh_shape(spec, num_devices or jax.device_count())
    except ValueError as e:
        return [f"mesh={spec!r}: {e}"]
    return []


def make_mesh(num_devices: int | None = None, fsdp: int = 1, *, spec: str | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over the first ``num_devices`` devices (all by default).

    Args:
      num_devices: devices to use (None: all, across every process).
      fsdp: size of the ``fsdp`` axis when no ``spec`` is given.
      spec: axis sizes as on the command line, ``"data=2,fsdp=4"`` (:func:`mesh_shape`).

    Axes are ``Auto`` so sharding propagates through jitted code without explicit annotations.
    """
    n = num_devices or jax.device_count()
    if spec is None:
        if n % fsdp:
            raise ValueError(f"num_devices={n} is not divisible by fsdp={fsdp}")
        spec = f"{FSDP}={fsdp}"
    sizes = mesh_shape(spec, n)
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=jax.devices()[:n])


def batch_devices(mesh: Mesh) -> int:
    """How many ways a batch is split (``data × fsdp``): batch sizes must be multiples of it."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data × fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------------
# Partition rules.

def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> P:
    """The rule for one parameter (or optimizer-state leaf of that shape): the largest dimension
    divisible by the ``fsdp`` size is split over ``fsdp``; with a ``tensor`` axis, the largest
    remaining one divisible by its size is split over ``tensor``. Leaves with fewer than
    ``min_size`` elements, and those no dimension of which divides, are replicated."""
    spec: list[str | None] = [None] * len(shape)
    if math.prod(shape) < min_size:
        return P()
    for axis in (FSDP, TENSOR):
        n = mesh.shape.get(axis, 1)
        if n == 1:
            continue
        free = [i for i, d in enumerate(shape) if spec[i] is None and d % n == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = axis
    return P(*spec)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_scalar_or_key(x) -> bool:
    return not hasattr(x, "shape") or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """A ``NamedSharding`` for every array leaf of ``tree`` by :func:`param_spec`.

    The rule depends only on a leaf's shape, so the Adam moments of a parameter get the
    parameter's sharding: call it on the optimizer state as on the parameters. PRNG keys and
    scalars are replicated."""

    def one(x):
        if _is_scalar_or_key(x):
            return replicated(mesh)
        return NamedSharding(mesh, param_spec(tuple(x.shape), mesh, min_size))

    return jax.tree.map(one, tree, is_leaf=_is_key)


def constrain(tree: Any, mesh: Mesh | None, min_size: int = MIN_SHARD_SIZE) -> Any:
    """Inside a jitted step: ``tree`` (the new parameters / optimizer state) constrained to the
    partition rules, so a step returns its state sharded as it received it (XLA's propagation
    alone may choose otherwise) and gradients are reduce-scattered rather than replicated.
    ``mesh=None`` or a mesh that shards no parameter (``fsdp = tensor = 1``): ``tree``
    unchanged, the program as without a mesh."""
    if mesh is None or all(mesh.shape.get(a, 1) == 1 for a in (FSDP, TENSOR)):
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings(tree, mesh, min_size))


def shard(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``tree`` (parameters, optimizer state, a whole training state) placed by the partition
    rules: large leaves split over ``fsdp`` (and ``tensor``), the rest replicated. On a mesh
    without those axes (``fsdp=1``) this is :func:`replicate`."""
    return put(tree, shardings(tree, mesh, min_size))


def put(tree: Any, sharding: Any) -> Any:
    """``jax.device_put(tree, sharding)`` that also works when the devices span processes.

    ``sharding`` is one ``Sharding`` for every leaf or a tree of them. With several processes
    each leaf is read on the host (every process must hold the same value) and each process
    places only its own devices' pieces: no cross-process transfer, which the backends refuse.
    Typed PRNG keys are placed by their key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_key)
    shards = (treedef.flatten_up_to(sharding) if not isinstance(sharding, jax.sharding.Sharding)
              else [sharding] * len(leaves))
    return treedef.unflatten([_put_global(x, s) for x, s in zip(leaves, shards)])


def _put_global(x, sharding: NamedSharding):
    if _is_key(x):
        raw = jax.random.key_data(x)  # trailing key-data axes replicated
        spec = P(*sharding.spec, *[None] * (raw.ndim - len(sharding.spec)))
        data = _put_global(raw, NamedSharding(sharding.mesh, spec))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a resharding on the same devices
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_batch(batch, mesh: Mesh):
    """Place every array of a pytree with its leading axis split over ``data × fsdp``.

    Every process passes the same global batch; each keeps its own devices' rows.

    Raises a ``ValueError`` naming the leaf when its batch size does not divide those devices.
    """
    n = batch_devices(mesh)

    def check(path, x):
        if x.shape and x.shape[0] % n:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading size "
                             f"{x.shape[0]}, not divisible by the {n} devices of the data axis"
                             + (" (data × fsdp)" if mesh.shape.get(FSDP, 1) > 1 else ""))
        return data_sharding(mesh) if x.shape else replicated(mesh)

    return put(batch, jax.tree_util.tree_map_with_path(check, batch))


def replicate(tree, mesh: Mesh):
    return put(tree, replicated(mesh))


def commit_like(tree: Any, like: jax.Array) -> Any:
    """``tree``'s uncommitted arrays (fresh scalars, counters, PRNG keys) committed to the one
    device ``like`` lives on; unchanged when ``like`` spans several devices (:func:`shard` places
    such trees), is traced (``jax.eval_shape``) or is not a JAX array.

    A jitted function's cache is keyed on whether its arguments are committed, and its outputs
    always are: a loop that feeds a step's output back (``state = step(state, ...)``) from a
    freshly built state would otherwise compile the step twice, at its first and second call.
    """
    def concrete(x):  # tracers (under jax.eval_shape or jit) have no placement to commit
        return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)

    devices = like.sharding.device_set if concrete(like) else ()
    if len(devices) != 1:
        return tree
    device = next(iter(devices))
    return jax.tree.map(lambda x: jax.device_put(x, device)
                        if concrete(x) and not x.committed else x, tree)


# ------------------------------------------------------------------------------------------------
# Host side.

def to_host(tree: Any) -> Any:
    """``jax.device_get`` for arrays that may span processes: each array leaf as NumPy (a
    collective when a leaf is split across processes: every process must call it)."""

    def get(x):
        if not isinstance(x, jax.Array) or _is_key(x):
            return jax.device_get(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree, is_leaf=_is_key)


def cast_floats(tree: Any, dtype: str) -> Any:
    """Every floating-point array leaf of ``tree`` cast to ``dtype`` (e.g. ``"bfloat16"``
    parameters: half the bytes of f32, and an optimizer state built from them — Adam's moments
    take their parameters' dtype — is half as large too). Other leaves are unchanged."""
    dt = np.dtype(jax.numpy.dtype(dtype))

    def cast(x):
        if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.floating) \
                and x.dtype != dt:
            return x.astype(dt)
        return x

    return jax.tree.map(cast, tree, is_leaf=_is_key)


def compile_with_memory(jitted, *args) -> tuple[Any, dict]:
    """``(compiled, report)``: ``jitted`` compiled for ``args`` (call ``compiled`` with arrays of
    the same shapes and shardings instead of ``jitted``: one compilation, not two) and
    :func:`memory_report` of it.

    With several processes they wait for each other after compiling (:func:`sync`), so the
    program's first collectives start together (the CPU's gloo set-up gives up when processes
    arrive more than 30 s apart, e.g. one compiling slower on a loaded machine)."""
    compiled = jitted.lower(*args).compile()
    sync("compiled")
    return compiled, memory_report(compiled)


def memory_report(compiled) -> dict:
    """Per-device bytes of a compiled program, from XLA's ``memory_analysis()``: its arguments,
    outputs, outputs aliased to donated arguments, temporaries and code, and
    ``peak_bytes_estimate = arguments + outputs - aliased + temporaries``. Empty when the backend
    gives no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {}
    for k in ("argument", "output", "alias", "temp", "generated_code"):
        v = getattr(m, f"{k}_size_in_bytes", None)
        if v is not None:
            out[f"{k}_bytes"] = int(v)
    if {"argument_bytes", "output_bytes", "temp_bytes"} <= set(out):
        out["peak_bytes_estimate"] = (out["argument_bytes"] + out["output_bytes"]
                                      - out.get("alias_bytes", 0) + out["temp_bytes"])
    return out


def bytes_per_device(tree: Any) -> dict:
    """Bytes of ``tree``'s array leaves held by each addressable device (shards counted where
    they live)."""
    out: dict = {}
    for x in jax.tree.leaves(tree, is_leaf=_is_key):
        if not isinstance(x, jax.Array):
            continue
        if _is_key(x):
            x = jax.random.key_data(x)
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
