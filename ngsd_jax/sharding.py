"""Tensor parallelism by logical axis names, in the style of MaxText / jax-llm-examples.

Every parameter of `model.Decoder` names its dimensions (`logical_axes` metadata); ONE
rules table maps those names onto a ("data", "model") mesh. The layout is Megatron's:
q/k/v, gate and up are column-parallel, o and down row-parallel, so each attention and
MLP block needs a single all-reduce; the embedding and head are split over the
vocabulary. Weights are replicated over "data", which is left for the batch. The engine
carries no sharding annotations: parameters enter its jitted program as arguments and
XLA propagates their shardings to the activations and the KV caches.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ngsd_jax.model import Decoder

# (logical axis, mesh axis or None for replicated). Unlisted logical axes are replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("norm", None),
)


def make_mesh(data: int, model: int) -> Mesh:
    """A (data, model) mesh over the first data*model devices."""
    # Auto axes: XLA's propagation places every intermediate. Explicit axes (jax.make_mesh's
    # default) would demand a sharding in the type of every op the engine traces.
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def partition_spec(logical_axes, rules=LOGICAL_RULES, units=None, mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec of a parameter with these logical axes.

    Given `units` (per dimension, how many indivisible pieces it holds) and the `mesh`, a
    dimension whose units do not divide evenly over its mesh axis is replicated instead:
    an uneven split would pad the array and leave devices doing unequal work, and for
    heads (3 kv heads on 4 devices) it would cut a head in two, turning every attention
    score into a cross-device reduction."""
    table = dict(rules)
    spec = []
    for i, name in enumerate(logical_axes):
        axis = table.get(name)
        if axis is not None and units is not None and units[i] % mesh.shape[axis]:
            axis = None
        spec.append(axis)
    return PartitionSpec(*spec)


def shard_model(model: Decoder, mesh: Mesh, rules=LOGICAL_RULES) -> Decoder:
    """Places every parameter of `model` on `mesh` per `rules`, in place; returns the model."""
    # A head is the unit for head dimensions (their length is heads * head_dim).
    per_unit = {"heads": model.config.head_dim, "kv_heads": model.config.head_dim}
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["logical_axes"]
            units = tuple(n // per_unit.get(a, 1) for n, a in zip(var.shape, axes))
            sharding = NamedSharding(mesh, partition_spec(axes, rules, units, mesh))
            var.set_value(jax.device_put(var[...], sharding))
    return model
