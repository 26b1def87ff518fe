"""Device meshes and the one rules table that maps logical axis names to mesh axes.

Parameters and activations carry logical names (``embed``, ``mlp``, ``heads``, ``act_batch``, ...); the table
below says which mesh axis (``data``, ``fsdp``, ``tensor``, ``expert``) each is split over. Change sharding by
editing this table, never the layers.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis / axes (None: replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("state", None),
    ("conv", None),
    ("norm", None),
    ("layers", None),  # the stacked repeats of a scanned model (model.scan_layers)
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    ("act_heads", "tensor"),
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh from ``config.mesh`` (fields data, fsdp, tensor and optionally expert; one of them may be -1)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {name: int(mesh_cfg.get(name, 1)) for name in MESH_AXES}
    unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes: {list(MESH_AXES)}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, {len(devices)} present")
    # create_device_mesh orders devices so that the innermost axes get the fastest links.
    shape = tuple(sizes[n] for n in MESH_AXES)
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU or odd topologies: plain order is as good as any
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES, shapes=None):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on ``mesh``.

    With ``shapes`` (a matching tree of arrays or ShapeDtypeStructs), a dimension that the mesh axes would not
    split evenly (e.g. one KV head over a tensor axis of 2) is replicated instead of failing.
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))
    if shapes is None:
        return shardings
    return jax.tree.map(lambda sh, x: _fit(sh, x.shape, mesh), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def _fit(sh: NamedSharding, shape, mesh: Mesh) -> NamedSharding:
    spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(mesh, P(*spec))


@contextlib.contextmanager
def on_mesh(mesh: Mesh, rules=LOGICAL_RULES):
    """Trace and run under ``mesh`` with the logical rules: what jitted steps and sharding constraints see."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


def state_shardings(init_fn, rng, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings of everything ``init_fn(rng)`` returns (Flax boxed with logical names), without running it.

    Returns (unboxed shardings, unboxed ShapeDtypeStructs carrying them). Traced with no mesh in context: flax
    would otherwise turn each logical name into a sharding constraint on the abstract values.
    """
    boxed = jax.eval_shape(init_fn, rng)
    shapes = nn.meta.unbox(boxed)
    shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=shapes)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)
    return shardings, abstract


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """[b ...] arrays split over the batch axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",), list(rules))
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules=LOGICAL_RULES) -> dict[str, jax.Array]:
    """Host numpy batch -> global jax arrays split over the batch axes.

    Every process holds the same global batch (each builds the same deterministic pipeline) and hands over only
    the slices its own devices need, so the same code runs on one device, one host or many hosts.
    """
    sharding = batch_sharding(mesh, rules)
    n_batch_shards = math.prod(mesh.shape[a] for a in sharding.spec[0]) if sharding.spec and sharding.spec[0] else 1

    def put(x: np.ndarray) -> jax.Array:
        if x.shape[0] % n_batch_shards:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n_batch_shards} batch shards "
                             f"of the mesh {dict(mesh.shape)}")
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)
