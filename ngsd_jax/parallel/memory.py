"""The memory plan: what one device holds for a model pair, mesh, batch and lengths, worked
out from the configs before any weight is read or any program compiled.

Parameters are counted exactly (each one's shard under the rules table); the KV cache
exactly (both models, prompt bucket + new tokens); activations and optimizer state are
estimates of the peak (prefill's attention scores and MLP, the logits; AdamW's two
moments, the gradients and the activations kept for the backward pass). A configuration
over a device's memory is refused in one line that names a mesh, or else a batch, that
fits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
from flax import nnx

from ngsd_jax.models.config import ModelConfig
from ngsd_jax.models.decoder import abstract_decoder
from ngsd_jax.parallel.distributed import say
from ngsd_jax.parallel.sharding import MeshError, MeshShape, axis_size, parameter_spec, parse_mesh

GiB = 1 << 30
# XLA's own buffers, fragmentation and the compiled program: the share of a device the plan leaves free.
HEADROOM = 0.9


def human(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


class MemoryPlanError(ValueError):
    """A configuration that cannot fit; the message names one that does."""


def parse_bytes(text: str) -> int:
    """'16GiB', '16G', '80GB', '512MiB' or a plain byte count."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--device-memory '{text}': give a size such as 16GiB or 80GB")
    unit = "KMGT".find(match.group(2).upper()) + 1 if match.group(2) else 0
    base = 1024 if match.group(3).lower().startswith("i") or not match.group(3) else 1000
    return int(float(match.group(1)) * base ** unit)


def device_memory(override: str | None = None) -> int | None:
    """Bytes one device can hold: the override, else the smallest local device's `bytes_limit`
    from `memory_stats()`, else None (CPU: no limit is known, so nothing is refused)."""
    if override:
        return parse_bytes(override)
    limits = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def parameter_bytes(config: ModelConfig, dtype, mesh: MeshShape, placement: str = "sharded") -> int:
    """Bytes of one device's shard of every parameter, under the rules table."""
    total = 0
    for _, var in nnx.iter_graph(abstract_decoder(config, dtype)):
        if isinstance(var, nnx.Param):
            spec = parameter_spec(config, var.shape, var.get_metadata()["logical_axes"], mesh.sizes, placement)
            pieces = [1 if axes is None else axis_size(mesh.sizes, axes) for axes in spec]
            pieces += [1] * (len(var.shape) - len(pieces))
            total += math.prod(n // p for n, p in zip(var.shape, pieces)) * var.dtype.itemsize
    return total


def _tensor_share(count: int, mesh: MeshShape, placement: str = "sharded") -> int:
    """Heads (or vocabulary rows, mlp columns) of `count` one device holds: split over tensor if it divides."""
    return count // mesh.tensor if placement == "sharded" and count % mesh.tensor == 0 else count


def kv_cache_bytes(config: ModelConfig, dtype, mesh: MeshShape, batch: int, length: int,
                   placement: str = "sharded") -> int:
    kv_heads = _tensor_share(config.num_kv_heads, mesh, placement)
    return 2 * config.num_layers * mesh.rows_per_shard(batch) * kv_heads * length * config.head_dim * jax.numpy.dtype(
        dtype).itemsize


def prefill_activation_bytes(config: ModelConfig, dtype, mesh: MeshShape, batch: int, prompt: int, length: int,
                             placement: str = "sharded") -> int:
    """Peak of one layer's prefill (fp32 attention scores and weights over the whole cache, the
    MLP's three intermediates, a few hidden-state copies) plus the fp32 logits of both the model
    and the decode loop's probabilities."""
    rows, itemsize = mesh.rows_per_shard(batch), jax.numpy.dtype(dtype).itemsize
    heads = _tensor_share(config.num_heads, mesh, placement)
    mlp = _tensor_share(config.intermediate_size, mesh, placement)
    scores = 2 * rows * heads * prompt * length * 4
    hidden = rows * prompt * (4 * config.hidden_size + 3 * mlp) * itemsize
    logits = 6 * rows * config.vocab_size * 4
    return scores + hidden + logits


@dataclasses.dataclass
class MemoryPlan:
    mesh: MeshShape
    batch: int
    parts: dict[str, int]  # what -> bytes per device

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self, capacity: int | None) -> str:
        parts = ", ".join(f"{name} {human(size)}" for name, size in self.parts.items())
        limit = f" of {human(capacity)}" if capacity else " (device memory unknown: not checked)"
        return (f"memory plan per device on --mesh {self.mesh}, batch {self.batch}: {parts}; "
                f"total {human(self.total)}{limit}")


def decode_plan(models, mesh: MeshShape, batch: int, prompt: int, new_tokens: int) -> MemoryPlan:
    """`models`: (name, config, dtype, placement) for each model the decode runs (base, expert);
    `batch` is the batch bucket the engine runs and `prompt` the padded prompt width."""
    parts = {"params": 0, "kv cache": 0, "activations": 0}
    length = prompt + new_tokens
    batch = mesh.padded_batch(batch)  # the rows the engine really runs
    for _, config, dtype, placement in models:
        parts["params"] += parameter_bytes(config, dtype, mesh, placement)
        parts["kv cache"] += kv_cache_bytes(config, dtype, mesh, batch, length, placement)
        parts["activations"] = max(parts["activations"], prefill_activation_bytes(config, dtype, mesh, batch, prompt,
                                                                                  length, placement))
    parts["activations"] += mesh.rows_per_shard(batch) * new_tokens * 4 * 5  # the trace buffers and tokens
    return MemoryPlan(mesh, batch, parts)


def train_plan(config: ModelConfig, dtype, mesh: MeshShape, batch: int, width: int, trainable_fraction: float,
               teacher: bool) -> MemoryPlan:
    """Training on `batch` sequences of `width` tokens. `trainable_fraction`: the trainable
    parameters' share of the model's (1 for full fine-tuning; adapters are counted as split like
    the weights they adapt). Gradients and AdamW's two moments are float32-sized like the
    trainable parameters; activations are what the backward pass keeps per layer (hidden
    states, attention probabilities, the MLP's intermediates) plus the loss's logits."""
    rows, itemsize = mesh.rows_per_shard(batch), jax.numpy.dtype(dtype).itemsize
    params = parameter_bytes(config, dtype, mesh)
    trainable = int(params / itemsize * 4 * trainable_fraction)
    heads = _tensor_share(config.num_heads, mesh)
    mlp = _tensor_share(config.intermediate_size, mesh)
    per_layer = rows * width * (8 * config.hidden_size + 4 * mlp) * itemsize + 2 * rows * heads * width * width * 4
    activations = config.num_layers * per_layer * (2 if teacher else 1) + 3 * rows * width * config.vocab_size * 4
    return MemoryPlan(mesh, mesh.padded_batch(batch),
                      {"params": params, "gradients": trainable, "optimizer state": 2 * trainable,
                       "activations": activations})


def candidate_meshes(device_count: int, prefer: str) -> list[MeshShape]:
    """Every (data, fsdp, tensor) split of the devices, cheapest communication first: as much data
    parallelism as possible, then the `prefer`red weight split ("tensor" for decoding, where fsdp
    would gather every weight at every token; "fsdp" for training, where a gather per layer and
    step is cheaper than tensor parallelism's two all-reduces per layer)."""
    shapes = [MeshShape(d, f, device_count // (d * f)) for d in range(1, device_count + 1) if device_count % d == 0
              for f in range(1, device_count // d + 1) if (device_count // d) % f == 0]
    if prefer == "tensor":
        return sorted(shapes, key=lambda s: (s.fsdp, s.tensor))
    return sorted(shapes, key=lambda s: (s.tensor, s.fsdp))


def default_mesh(device_count: int, plan_for, capacity: int | None) -> MeshShape:
    """Every device on data if that fits, else the smallest tensor split that does (data over the
    rest); `plan_for(mesh)` returns the MemoryPlan. Without a known capacity: all on data."""
    tensor_splits = [MeshShape(data=device_count // t, tensor=t) for t in range(1, device_count + 1)
                     if device_count % t == 0]
    if capacity is None:
        return tensor_splits[0]
    for mesh in tensor_splits:
        if plan_for(mesh).total <= capacity * HEADROOM:
            return mesh
    return tensor_splits[0]  # nothing fits: check_fits will say what would


def check_fits(plan: MemoryPlan, capacity: int | None, plan_for, prefer: str = "tensor",
               batch_flag: str = "--batch-size") -> None:
    """Raises a one-line MemoryPlanError naming the first mesh of the same devices that fits (in
    `candidate_meshes` order), or else the largest batch that fits on some mesh;
    `plan_for(mesh, batch)` returns a MemoryPlan."""
    if capacity is None or plan.total <= capacity * HEADROOM:
        return
    usable = capacity * HEADROOM
    need = f"needs {human(plan.total)} per device on --mesh {plan.mesh} with batch {plan.batch}, " \
           f"over the {human(usable)} usable of {human(capacity)}"
    for mesh in candidate_meshes(plan.mesh.size, prefer):
        fitting = plan_for(mesh, plan.batch)
        if fitting.total <= usable:
            raise MemoryPlanError(f"{need}; --mesh {mesh} fits ({human(fitting.total)} per device)")
    batch = plan.batch
    while batch > 1:
        batch //= 2
        for mesh in [plan.mesh] + candidate_meshes(plan.mesh.size, prefer):
            fitting = plan_for(mesh, batch)
            if fitting.total <= usable:
                raise MemoryPlanError(f"{need}; no split of the {plan.mesh.size} device(s) fits that batch, but "
                                      f"{batch_flag} {batch} fits on --mesh {mesh} "
                                      f"({human(fitting.total)} per device)")
    raise MemoryPlanError(f"{need}; no split of the {plan.mesh.size} device(s) fits even batch 1: use more devices, "
                          f"bfloat16 or shorter sequences")


def choose_mesh(mesh_flag: str | None, plan_for, capacity: int | None):
    """The MeshShape to run on: --mesh as given, or the default for the devices present.
    `plan_for(mesh)` gives the memory plan on a mesh (for the default's fit test)."""
    if mesh_flag:
        try:
            return parse_mesh(mesh_flag, jax.device_count())
        except MeshError as err:
            if jax.process_count() == 1 and parse_mesh(mesh_flag).size > jax.device_count():
                raise MeshError(f"{err}; on a multi-host slice add --multi-host, so that the mesh spans every "
                                f"host's devices") from None
            raise
    return default_mesh(jax.device_count(), plan_for, capacity)


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """How a run spreads over devices: `mesh` ('data=D,fsdp=F,tensor=T', None: the default for the
    devices present), `device_memory` (one device's memory for the plan, e.g. '16GiB'; None: what
    the device reports), `multi_host` (start jax.distributed; None: when a launch is detected) and
    `compilation_cache` (JAX's persistent compilation cache directory; None: off)."""

    mesh: str | None = None
    device_memory: str | None = None
    multi_host: bool | None = None
    compilation_cache: Path | None = None


def plan_mesh(job: str, devices: DeviceOptions, plan_for, prefer: str, quiet_on_one_device: bool = False) -> MeshShape:
    """The mesh a job runs on: --mesh or the default, after printing the memory plan and refusing what
    cannot fit. `plan_for(mesh, rows=batch)` gives the MemoryPlan; `prefer` orders the meshes that
    a refusal suggests (see `candidate_meshes`). On one device of unknown size (a plain CPU run)
    the plan can neither choose nor refuse anything, and `quiet_on_one_device` skips printing it."""
    capacity = device_memory(devices.device_memory)
    shape = choose_mesh(devices.mesh, plan_for, capacity)
    plan = plan_for(shape)
    if not quiet_on_one_device or devices.mesh or shape.size > 1 or capacity is not None:
        say(f"ngsd-jax {job}: {plan.describe(capacity)}")
    check_fits(plan, capacity, plan_for, prefer=prefer)
    return shape
