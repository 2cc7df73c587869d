"""Training under a (data, fsdp, tensor) mesh: where the trainable state, the frozen weights,
the optimizer state and each batch live. The layout is ngsd_jax.parallel.sharding's rules table:

- weights per their logical axes (fsdp on the embed dimension, tensor on heads/mlp/vocab) and
  a LoRA adapter like the weight it adapts (`sharding.shard_model`, `sharding.lora_axes`);
- AdamW's moments (and MultiSteps' accumulated gradients) exactly like their parameters,
  step counters replicated;
- the batch's rows over (data, fsdp).

The train step itself is unchanged: its inputs arrive placed and XLA propagates the
layout, inserting the fsdp gathers and the gradient reductions.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ngsd_jax.checkpoints.weights import load_model_config
from ngsd_jax.models.lora import resolve_targets
from ngsd_jax.parallel import sharding as sh
from ngsd_jax.parallel.memory import DeviceOptions, plan_mesh, train_plan


def place_optimizer_state(optimizer, opt_state, params, mesh: Mesh):
    """The optimizer state with every per-parameter leaf placed like its parameter and the rest
    (step counts, schedules' state) replicated."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, sh.put, opt_state, shardings,
                                 transform_non_params=lambda leaf: sh.put(leaf, replicated))


def state_shardings(trainable, opt_state):
    """(trainable, optimizer state) placements, for train_step.make_train_step to keep them."""
    return jax.tree.map(lambda x: x.sharding, (trainable, opt_state))


def place_batch(arrays: dict, mesh: Mesh) -> dict:
    """A collated batch ([batch_size, width] host arrays) with its rows split over (data, fsdp),
    each process placing its own rows."""
    return {k: sh.place_rows(x, sh.batch_sharding(mesh, x.ndim)) for k, x in arrays.items()}


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    shards = sh.mesh_shape(mesh).batch_shards
    if batch_size % shards:
        raise sh.MeshError(f"batch size {batch_size} does not split over data x fsdp = {shards} devices; use a "
                           f"multiple of {shards} (--batch-size) or a mesh with fewer data/fsdp devices")


def lora_fraction(config, rank: int, targets, layers: int | None) -> float:
    """Adapter parameters as a share of the model's (for the memory plan, before any weight exists)."""
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {"q_proj": (d, config.num_heads * hd), "k_proj": (d, config.num_kv_heads * hd),
              "v_proj": (d, config.num_kv_heads * hd), "o_proj": (config.num_heads * hd, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    per_layer = sum(rank * sum(shapes[name]) for name in resolve_targets(targets))
    adapted = config.num_layers if layers is None else min(layers, config.num_layers)
    total = sum(a * b for a, b in shapes.values()) * config.num_layers + 2 * config.vocab_size * d
    return per_layer * adapted / total


def choose_training_mesh(devices: DeviceOptions, recipe, init_path, dtype):
    """The mesh for a training run (None: one device, unsharded): `devices.mesh` or the default,
    after printing the memory plan and refusing what cannot fit."""
    config = load_model_config(init_path)
    fraction = 1.0 if recipe.method == "full" else lora_fraction(config, recipe.lora_rank, recipe.lora_targets,
                                                                  recipe.lora_top_layers)
    teacher = recipe.distill_loss == "kl" and bool(recipe.benign_data)

    def plan_for(mesh, rows=recipe.batch_size):
        return train_plan(config, dtype, mesh, rows, max(recipe.bucket_widths), fraction, teacher)

    shape = plan_mesh("train", devices, plan_for, prefer="fsdp")
    if shape.size == 1:
        return None
    mesh = sh.make_mesh(shape)
    check_batch_size(recipe.batch_size, mesh)
    return mesh
