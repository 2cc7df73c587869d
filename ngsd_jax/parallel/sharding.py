"""Scaling out by logical axis names, in the style of MaxText / jax-llm-examples.

Every parameter of `model.Decoder` names its dimensions (`logical_axes` metadata), and
batch-carrying arrays have a leading "batch" dimension; ONE rules table maps those names
onto a ("data", "fsdp", "tensor") mesh:

- "tensor" is Megatron's layout: q/k/v, gate and up are column-parallel, o and down
  row-parallel (one all-reduce per attention and MLP block), the embedding and head split
  over the vocabulary.
- "fsdp" shards each weight's other (embed) dimension; XLA gathers a layer's weights
  where it uses them, so weights take 1/(fsdp*tensor) of a device at rest.
- "batch" goes over data and fsdp together, so fsdp devices work on different rows too.
- "layers", the leading axis of stacked (scanned) layers, is never split: each device holds
  every layer's slice, as it does unstacked.

The engine and the train step carry no layout of their own: parameters and inputs enter
their jitted programs already placed, and XLA propagates those shardings to activations,
KV caches and optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ngsd_jax.models.decoder import Decoder, StackedKV
from ngsd_jax.parallel.distributed import process_rows

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes; None for replicated). Unlisted logical axes are replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)

# How a model's parameters are laid out on the mesh: "sharded" per LOGICAL_RULES, or
# "replicated" (a copy on every device: right for a small expert beside a big base, whose
# tensor-parallel split would cost an all-reduce per block for little memory).
PLACEMENTS = ("sharded", "replicated")


class MeshError(ValueError):
    """A --mesh that cannot be built; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """How many pieces the batch dimension is cut into (the "batch" rule)."""
        return self.data * self.fsdp

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, dataclasses.astuple(self)))

    def rows_per_shard(self, batch: int) -> int:
        """Rows of a `batch` one device holds (the batch padded to the shards, then split)."""
        return -(-batch // self.batch_shards)

    def padded_batch(self, batch: int) -> int:
        """The smallest multiple of the batch shards that holds `batch` rows."""
        return self.rows_per_shard(batch) * self.batch_shards

    def __str__(self) -> str:
        named = [f"{axis}={n}" for axis, n in zip(MESH_AXES, dataclasses.astuple(self)) if n > 1]
        return ",".join(named) or "data=1"


def parse_mesh(text: str, device_count: int | None = None) -> MeshShape:
    """'data=D,fsdp=F,tensor=T' (any subset; absent axes are 1). With `device_count`, the
    product must equal it."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\w+)=(\d+)", part)
        if match is None or match.group(1) not in MESH_AXES:
            raise MeshError(f"--mesh '{text}': write AXIS=N pairs joined by commas, AXIS one of "
                            f"{', '.join(MESH_AXES)} (e.g. --mesh data=2,tensor=4)")
        if match.group(1) in sizes:
            raise MeshError(f"--mesh '{text}': axis {match.group(1)} given twice")
        sizes[match.group(1)] = int(match.group(2))
    if not sizes or min(sizes.values()) < 1:
        raise MeshError(f"--mesh '{text}': give at least one axis, each of size >= 1 (e.g. --mesh data=8)")
    shape = MeshShape(**sizes)
    if device_count is not None and shape.size != device_count:
        raise MeshError(f"--mesh {text} uses {shape.size} devices but there are {device_count}; make the "
                        f"product of the sizes {device_count} (e.g. --mesh data={device_count})")
    return shape


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all of them)."""
    devices = jax.devices() if devices is None else devices
    if shape.size != len(devices):
        raise MeshError(f"mesh {shape} needs {shape.size} devices, got {len(devices)}")
    # Auto axes: XLA's propagation places every intermediate. Explicit axes (jax.make_mesh's
    # default) would demand a sharding in the type of every op the engine traces.
    return jax.make_mesh(dataclasses.astuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(**{axis: mesh.shape[axis] for axis in MESH_AXES})


def axis_size(mesh_sizes, axes) -> int:
    return math.prod(mesh_sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def partition_spec(logical_axes, rules=LOGICAL_RULES, units=None, mesh=None) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes.

    Given `units` (per dimension, how many indivisible pieces it holds) and the `mesh` (or
    its axis sizes, a dict), a dimension whose units do not divide evenly over its mesh
    axes is replicated instead: an uneven split would pad the array and leave devices
    doing unequal work, and for heads (3 kv heads on 4 devices) it would cut a head in
    two, turning every attention score into a cross-device reduction."""
    table = dict(rules)
    sizes = None if mesh is None else dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)
    spec = []
    for i, name in enumerate(logical_axes):
        axes = table.get(name)
        if axes is not None and units is not None and units[i] % axis_size(sizes, axes):
            axes = None
        spec.append(axes)
    return PartitionSpec(*spec)


def parameter_units(config, shape, logical_axes) -> tuple[int, ...]:
    """Indivisible pieces per dimension: a head for head dimensions (length heads * head_dim)."""
    per_unit = {"heads": config.head_dim, "kv_heads": config.head_dim}
    return tuple(n // per_unit.get(a, 1) for n, a in zip(shape, logical_axes))


def parameter_spec(config, shape, logical_axes, mesh, placement: str = "sharded") -> PartitionSpec:
    if placement == "replicated":
        return PartitionSpec()
    return partition_spec(logical_axes, LOGICAL_RULES, parameter_units(config, shape, logical_axes), mesh)


def parameter_sharding(config, var: nnx.Variable, mesh: Mesh, placement: str = "sharded") -> NamedSharding:
    return NamedSharding(mesh, parameter_spec(config, var.shape, var.get_metadata()["logical_axes"], mesh,
                                              placement))


def place(array, sharding: NamedSharding) -> jax.Array:
    """A host array onto its devices, each device receiving only its own slice (also across
    hosts, where every process holds the whole host array but addresses only its devices)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_rows(array, sharding: NamedSharding) -> jax.Array:
    """A host array whose leading dimension is the batch onto its devices, this process giving
    only the rows its devices hold (`distributed.process_rows`); every process holds the whole
    host array (each tokenises every prompt, so all agree on the batch's bucket and width)."""
    array = np.asarray(array)
    return jax.make_array_from_process_local_data(sharding, array[process_rows(sharding, array.shape)],
                                                  array.shape)


def put(value, sharding: NamedSharding) -> jax.Array:
    """`value` (a host array or a device array) placed per `sharding`. A value on one device
    goes through the host, which also works when the mesh spans other hosts' devices."""
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value
    if isinstance(value, jax.Array) and len(value.sharding.device_set) > 1:
        return jax.device_put(value, sharding)
    return place(value, sharding)


def lora_axes(model: Decoder) -> dict[int, tuple]:
    """The logical axes of every LoRA adapter matrix in `model` (keyed by the id of its variable),
    for training's adapters and an adapter expert's alike: A [in, rank] split like its kernel's
    input dimension, B [rank, out] like its output dimension; the rank is whole everywhere, so
    the low-rank product needs no more communication than the kernel's own matmul."""
    axes = {}
    for _, node in nnx.iter_graph(model):
        if all(hasattr(node, name) for name in ("base", "lora_a", "lora_b")):
            in_axis, out_axis = node.base.kernel.get_metadata()["logical_axes"]
            axes[id(node.lora_a)] = (in_axis, None)
            axes[id(node.lora_b)] = (None, out_axis)
    return axes


def shard_model(model: Decoder, mesh: Mesh, placement: str = "sharded") -> Decoder:
    """Places every parameter of `model` (LoRA adapters included, see `lora_axes`) on `mesh`, in
    place; returns the model."""
    if placement not in PLACEMENTS:
        raise MeshError(f"unknown placement '{placement}'; choose one of {', '.join(PLACEMENTS)}")
    adapters = lora_axes(model)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = adapters.get(id(var)) or var.get_metadata()["logical_axes"]
            spec = parameter_spec(model.config, var.shape, axes, mesh, placement)
            var.set_value(put(var[...], NamedSharding(mesh, spec)))
    return model


def batch_spec(ndim: int) -> PartitionSpec:
    """The leading (batch) dimension split per the "batch" rule; XLA chooses the others."""
    return PartitionSpec(dict(LOGICAL_RULES)["batch"], *([PartitionSpec.UNCONSTRAINED] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The placement of a host array whose leading dimension is the batch (other dimensions whole)."""
    return NamedSharding(mesh, PartitionSpec(dict(LOGICAL_RULES)["batch"], *([None] * (ndim - 1))))


def constrain_batch(tree, mesh: Mesh | None):
    """Inside a jitted program: every array of `tree` with a leading batch dimension (ndim >= 1)
    is split over the batch axes, a stacked cache (`StackedKV`, batch second) over its second;
    scalars are left alone. No-op without a mesh."""
    if mesh is None:
        return tree

    def constrain(x):
        if isinstance(x, StackedKV):
            return StackedKV(*(jax.lax.with_sharding_constraint(
                a, NamedSharding(mesh, PartitionSpec(None, *batch_spec(a.ndim - 1)))) for a in x))
        return x if x.ndim == 0 else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim)))

    return jax.tree.map(constrain, tree, is_leaf=lambda x: isinstance(x, StackedKV))


def pad_batch(batch: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the mesh's batch shards that holds `batch` rows."""
    return batch if mesh is None else mesh_shape(mesh).padded_batch(batch)


def fetch(array) -> np.ndarray:
    """A (possibly multi-host) device array as one host numpy array."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
