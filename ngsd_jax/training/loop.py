"""The training loop: LoRA or full fine-tuning of the expert over the planned batches, with
metrics.jsonl, orbax checkpoints every few steps, Ctrl-C saving the state, and resuming from it."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from ngsd_jax.errors import UsageError
from ngsd_jax.models.lora import apply_lora
from ngsd_jax.parallel import sharding as sh
from ngsd_jax.parallel.distributed import is_primary
from ngsd_jax.training import data as td
from ngsd_jax.training import sharding as ts
from ngsd_jax.training.recipe import Recipe
from ngsd_jax.training.state import StopRequest, checkpoint_manager, restore_state, save_state, truncate_metrics
from ngsd_jax.training.step import (
    learning_rate_schedule,
    loss_metrics,
    make_optimizer,
    make_train_step,
    target_capacities,
)


def train(recipe: Recipe, model, examples, run_dir: Path, pad_id: int, resume: bool, mesh=None):
    """Trains `model` and returns it (LoRA adapters still apart: `write_expert` keeps them and merges);
    None when stopped by Ctrl-C after saving. Under a `mesh` (see ngsd_jax.training.sharding) weights,
    adapters and optimizer state are split over fsdp/tensor and each batch's rows over data/fsdp."""
    if recipe.method == "lora":
        layers = None
        if recipe.lora_top_layers is not None:
            count = len(model.layers)
            layers = range(max(0, count - recipe.lora_top_layers), count)
        apply_lora(model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets, layers, seed=recipe.seed)
        trainable_filter = nnx.LoRAParam
    else:
        trainable_filter = nnx.Param
    if mesh is not None:
        sh.shard_model(model, mesh)
    graph, trainable, frozen = nnx.split(model, trainable_filter, ...)
    # The starting point, kept as its own buffers (the trained state is donated) when some loss
    # matches the starting model's distributions.
    initial_state = jax.tree.map(jnp.copy, trainable) if any(ex.match_teacher for ex in examples) else None

    plan = td.plan_batches([ex.inputs_length for ex in examples], recipe.batch_size, recipe.bucket_widths,
                           recipe.epochs, recipe.seed)
    total = len(plan) - len(plan) % recipe.grad_accum  # a trailing partial accumulation would never apply
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps * recipe.grad_accum)
    plan = plan[:total]
    updates = total // recipe.grad_accum
    schedule = learning_rate_schedule(recipe, updates)
    optimizer = make_optimizer(recipe, schedule)
    opt_state = optimizer.init(trainable)
    if mesh is not None:
        opt_state = ts.place_optimizer_state(optimizer, opt_state, trainable, mesh)
    meta = {"seed": recipe.seed, "plan": td.plan_fingerprint(plan), "total_steps": total}

    manager = checkpoint_manager(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if resume:
        trainable, opt_state, saved = restore_state(manager, trainable, opt_state)
        if saved.get("plan") != meta["plan"]:
            raise UsageError(f"{run_dir}: the training data or batch order changed since the checkpoint; "
                             f"restore the data files or start over with --overwrite")
        start = int(saved["step"])
        truncate_metrics(metrics_path, start)
        td.warn(f"resuming at step {start} of {total}")
    trainable_count = sum(x.size for x in jax.tree.leaves(trainable))
    td.warn(f"{len(examples)} examples, {total} steps of {recipe.batch_size} (x{recipe.grad_accum} accumulation) "
            f"over {recipe.epochs} epoch(s), {recipe.method} with {trainable_count:,} trainable parameters")

    step_fn = make_train_step(graph, optimizer, None if mesh is None else ts.state_shardings(trainable, opt_state))
    capacities = target_capacities(examples, plan, recipe.batch_size)
    bar = tqdm(total=total, initial=start, unit="step", desc="training", dynamic_ncols=True, disable=not is_primary())
    rate = None
    # Every process runs the loop; process 0 alone keeps the log (the others write to nowhere).
    log_path = metrics_path if is_primary() else os.devnull
    with StopRequest() as stop, open(log_path, "a", encoding="utf-8") as log:
        step = start
        while step < total:
            batch = plan[step]
            arrays = td.collate(examples, batch, recipe.batch_size, pad_id, recipe.decision_tokens,
                                recipe.decision_weight)
            if mesh is not None:
                arrays = ts.place_batch(arrays, mesh)
            tick = time.perf_counter()
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, initial_state, arrays,
                                                    capacity=capacities[batch.width])
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            diverged = _divergence(metrics)
            if diverged:
                bar.close()
                again = " and --overwrite" if manager.latest_step() is not None else ""  # earlier steps were saved
                manager.close()
                raise UsageError(f"training diverged at step {step + 1}: {diverged}; no expert was written: rerun "
                                 f"with a lower --lr (now {recipe.learning_rate:g}){again}")
            metrics = {**loss_metrics(metrics), "weighted_loss": metrics["weighted_loss"],
                       "grad_norm": metrics["grad_norm"]}
            seconds = time.perf_counter() - tick
            step += 1
            tokens = int(sum(examples[i].inputs_length for i in batch.indices))
            rate = tokens / seconds if rate is None else 0.8 * rate + 0.2 * tokens / seconds
            record = {"step": step, "epoch": batch.epoch, "width": batch.width, **metrics,
                      "lr": float(schedule((step - 1) // recipe.grad_accum)), "tokens": tokens,
                      "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if step % recipe.checkpoint_every == 0 or step == total or stop.requested:
                save_state(manager, step, trainable, opt_state, meta)
            if stop.requested and step < total:
                bar.close()
                td.warn(f"stopped at step {step} of {total}; the state is saved in {run_dir} — "
                        f"continue with the same command plus --resume")
                return None
    bar.close()
    manager.close()
    return nnx.merge(graph, trainable, frozen)


def _divergence(metrics: dict) -> str | None:
    """What went non-finite in a step (its loss, its gradients, or the weights after its update), else None."""
    if not math.isfinite(metrics["weighted_loss"]):
        return f"the loss is {metrics['weighted_loss']}"
    if not math.isfinite(metrics["grad_norm"]):
        return f"the gradient norm is {metrics['grad_norm']}"
    if not metrics["weights_finite"]:
        return "its update made weights non-finite"
    return None
