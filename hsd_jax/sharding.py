"""Device mesh, logical-axis rules, and helpers to place or move pytrees onto a mesh.

Code outside this module names logical axes only (`batch`, `embed`, `heads`, `kv_heads`, `mlp`,
`vocab`, `layers`, ...); the rules here map them to the mesh axes `data`, `fsdp` and `tensor`.
A logical axis whose dimension a mesh axis does not divide stays replicated along that axis, so
any model fits any mesh (e.g. 8 kv heads on a tensor axis of 16).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (in order), or () to replicate.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "head_dim": (),
    "norm": (),
    "length": (),
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). At most one size may be -1: "the remaining devices".

    Raises ValueError, before anything compiles, when the sizes do not multiply to the number of
    devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} must give one size per axis {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive, with at most one -1.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} cannot fill {len(devices)} devices: {known} does not divide it.")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{len(devices)} are visible; set the sizes (one may be -1) to multiply to {len(devices)}."
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def partition_spec(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions are named `axes`.

    Each dimension takes the mesh axes its rule names, skipping a mesh axis that is already used
    or whose size does not divide what is left of the dimension; axes of size 1 are left out.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}.")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes):
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}.")
        chosen = []
        for mesh_axis in rules.get(name, ()) if name else ():
            size = mesh.shape[mesh_axis]
            if size > 1 and mesh_axis not in used and dim % (size * math.prod(mesh.shape[a] for a in chosen)) == 0:
                chosen.append(mesh_axis)
                used.add(mesh_axis)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None
) -> NamedSharding:
    """NamedSharding for an array of `shape` with logical `axes` (see `partition_spec`)."""
    return NamedSharding(mesh, partition_spec(shape, axes, mesh, rules))


def tree_shardings(tree: Any, axes_tree: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None) -> Any:
    """NamedShardings for every array (or ShapeDtypeStruct) of `tree`, given matching logical axes."""
    return jax.tree.map(lambda x, axes: named_sharding(x.shape, axes, mesh, rules), tree, axes_tree)


def reshard(tree: Any, shardings: Any) -> Any:
    """Moves each array of `tree` to the matching sharding, one array at a time.

    Going leaf by leaf (and waiting for each) keeps peak memory at one array in flight, which
    matters when moving training params into a sampling layout on the same devices.
    """
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    moved = []
    for leaf, target in zip(leaves, targets):
        moved.append(jax.block_until_ready(jax.device_put(leaf, target)))
    return treedef.unflatten(moved)


def batch_sharding(mesh: Mesh, ndim: int, rules: dict[str, tuple[str, ...]] | None = None, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a batch-major array of rank `ndim`: leading axis over the batch rule's axes."""
    rules = DEFAULT_RULES if rules is None else rules
    shape = (batch_size if batch_size is not None else math.prod(mesh.shape[a] for a in rules["batch"]),) + (1,) * (ndim - 1)
    return named_sharding(shape, ("batch",) + (None,) * (ndim - 1), mesh, rules)


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None) -> Any:
    """NamedShardings for an `nnx.State` whose Variables carry `logical_axes` metadata.

    Returns a pytree of the same structure (Variables holding shardings), usable as jit
    `out_shardings`, in `jax.device_put`, or in abstract targets for checkpoint restore.
    """
    from flax import nnx

    return jax.tree.map(
        lambda v: v.replace(named_sharding(v.shape, v.logical_axes, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def constrain_batch(tree: Any, mesh: Mesh | None, rules: dict[str, tuple[str, ...]] | None = None) -> Any:
    """Inside jit: keep every batch-major array of `tree` split over the batch axes of `mesh`."""
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, rules, batch_size=x.shape[0])), tree
    )


def replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A sharding that replicates over the devices of `sharding` (its mesh, or its one device)."""
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding


def optimizer_shardings(optimizer, params: Any) -> Any:
    """Shardings of `optimizer.init(params)`: each per-parameter leaf (Adam's moments) sharded like
    its parameter, the rest (step counts) replicated; jit left to itself replicates the moments.

    params: arrays or ShapeDtypeStructs carrying shardings.
    """
    import optax

    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = replicated_like(jax.tree.leaves(param_shardings)[0])
    return optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), param_shardings,
                                 transform_non_params=lambda _: replicated)


# ------------------------------------------------------------------------------------------------
# Host <-> global arrays (multi-process)
# ------------------------------------------------------------------------------------------------


def _process_rows(num_rows: int) -> tuple[int, int]:
    """(first, count) of this process's rows in a global batch of `num_rows` split evenly by process."""
    count = num_rows // jax.process_count()
    return jax.process_index() * count, count


def host_to_global(local: np.ndarray, mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None) -> jax.Array:
    """This process's rows [b, ...] as its part of a global batch [b * process_count, ...].

    Every process passes the same number of rows; process p's rows follow process p - 1's. The
    result is split over the batch axes of `mesh` (`batch_sharding`). Where those axes split the
    batch along process boundaries, each process contributes only its rows
    (`jax.make_array_from_process_local_data`); where they do not (a batch too small to split),
    the rows are first gathered to every process. One process: a plain `device_put`.
    """
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    target = batch_sharding(mesh, local.ndim, rules, batch_size=global_shape[0])
    if jax.process_count() == 1:
        return jax.device_put(local, target)
    first, count = _process_rows(global_shape[0])
    rows = [index[0].indices(global_shape[0])[:2] for index in target.addressable_devices_indices_map(global_shape).values()]
    if min(r[0] for r in rows) == first and max(r[1] for r in rows) == first + count:
        return jax.make_array_from_process_local_data(target, local, global_shape)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    return jax.make_array_from_callback(global_shape, target, lambda index: full[index])


def global_to_host(x: jax.Array) -> np.ndarray:
    """This process's rows of a global batch-major array (the inverse of `host_to_global`)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    first, count = _process_rows(x.shape[0])
    out = np.zeros((count, *x.shape[1:]), x.dtype)
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[0].indices(x.shape[0])
        lo, hi = max(start, first), min(stop, first + count)
        if lo < hi:
            out[(slice(lo - first, hi - first), *shard.index[1:])] = np.asarray(shard.data)[lo - start : hi - start]
    return out


def agree_max(values: Sequence[int]) -> np.ndarray:
    """The elementwise maximum of `values` over all processes (shapes every process must share)."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def gather_rows(tree: Any) -> Any:
    """Every process's rows of a pytree of host arrays [b, ...], concatenated in process order."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# Environment variables that mark a multi-process launch jax.distributed can configure itself.
_CLUSTER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    """A SLURM / Open MPI job of several tasks, or a multi-host TPU slice."""
    for name in _CLUSTER_VARIABLES:
        value = os.environ.get(name, "")
        if name == "TPU_WORKER_HOSTNAMES" and "," in value or name != "TPU_WORKER_HOSTNAMES" and value not in ("", "1"):
            return True
    return False


def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Joins a multi-process run before JAX starts its backends; nothing for a single process.

    Explicit `coordinator_address` (host:port of process 0) with `num_processes` and
    `process_id`, or a cluster jax.distributed detects itself (TPU pods, SLURM, Open MPI). CPU
    processes exchange collectives over gloo.
    """
    if coordinator_address is None and not _cluster_detected():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
