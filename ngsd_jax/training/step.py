"""The training step: learning-rate schedule, optimizer, the loss on response tokens (cross-
entropy on target tokens, KL to the starting model on matched distributions), and the jitted
micro-step that applies it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ngsd_jax.training.recipe import Recipe


def learning_rate_schedule(recipe: Recipe, total_updates: int):
    """Linear warmup from lr/warmup to lr, then linear/cosine decay towards 0 (or constant)."""
    peak = recipe.learning_rate
    warmup = math.ceil(recipe.warmup_fraction * total_updates)
    span = max(1, total_updates - warmup)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((count - warmup) / span, 0.0, 1.0)
        decayed = {"linear": peak * (1.0 - progress),
                   "cosine": peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
                   "constant": peak + 0.0 * progress}[recipe.decay]
        return jnp.where(count < warmup, peak * (count + 1) / max(warmup, 1), decayed)

    return schedule


def make_optimizer(recipe: Recipe, schedule):
    chain = []
    if recipe.clip_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(recipe.clip_grad_norm))
    chain.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=recipe.weight_decay))
    optimizer = optax.chain(*chain)
    return optax.MultiSteps(optimizer, every_k_schedule=recipe.grad_accum) if recipe.grad_accum > 1 else optimizer


def response_loss(model, hidden, batch, capacity: int, teacher=None, teacher_hidden=None):
    """(weighted mean token loss, sums) over the loss positions, projecting only those onto the
    vocabulary.

    The vocabulary projection is the costliest matmul of a small model, and about half the
    positions of a batch are prompt or padding. The first `capacity` positions in an order that
    puts the targets first are gathered and projected; `capacity` (static, one per bucket width)
    is at least the number of targets of every batch of that width, so no target is dropped.
    The token loss is cross-entropy on the target token, or where `soft` is set (with a
    teacher), KL(teacher || model) between the next-token distributions. `sums` holds the
    unweighted totals and counts of both kinds, for the log.
    """
    order = jnp.argsort(-batch["mask"].reshape(-1), stable=True)[:capacity]
    picked = {k: batch[k].reshape(-1)[order] for k in ("targets", "weights", "mask", "soft")}
    logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[order])
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, picked["targets"])
    soft = picked["soft"] > 0
    if teacher is not None:
        teacher_logp = jax.nn.log_softmax(teacher.logits(teacher_hidden.reshape(-1, hidden.shape[-1])[order]))
        teacher_logp = jax.lax.stop_gradient(teacher_logp)
        kl = (jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(logits))).sum(-1)
        token_loss = jnp.where(soft, kl, token_loss)
    hard = picked["mask"] * ~soft
    sums = {"ce_sum": (token_loss * hard).sum(), "ce_count": hard.sum(),
            "kl_sum": (token_loss * picked["mask"] * soft).sum(), "kl_count": (picked["mask"] * soft).sum()}
    return (token_loss * picked["weights"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0), sums


def loss_metrics(sums: dict) -> dict:
    """Mean cross-entropy on token targets and mean KL on matched distributions (None where a batch
    has none), and their mean over all targets."""
    count = sums["ce_count"] + sums["kl_count"]
    return {"loss": (sums["ce_sum"] + sums["kl_sum"]) / max(count, 1.0),
            "ce": sums["ce_sum"] / sums["ce_count"] if sums["ce_count"] else None,
            "kl": sums["kl_sum"] / sums["kl_count"] if sums["kl_count"] else None}


def target_capacities(examples, plan, batch_size: int, multiple: int = 64) -> dict[int, int]:
    """Per bucket width, the most loss targets any batch of that width has, rounded up to `multiple`."""
    most: dict[int, int] = {}
    for batch in plan:
        targets = sum(int(examples[i].loss_mask[1:].sum()) for i in batch.indices)
        most[batch.width] = max(most.get(batch.width, 0), targets)
    return {w: min(batch_size * w, -(-n // multiple) * multiple) for w, n in most.items()}


def make_train_step(graph, optimizer, state_shardings=None):
    """One jitted micro-step: loss on the masked targets, gradients for the trainable state only
    (so nothing below the lowest trainable layer is back-propagated), optimizer update.

    `initial_state` is the trainable state the run started from (None when no example matches
    the starting model): with it the same graph is the starting model, the teacher of `soft`
    targets. With LoRA only in the top layers, XLA shares the identical lower layers of the
    two forward passes. `state_shardings` ((trainable, optimizer state) shardings, under a mesh)
    keeps the updated state where it came from, so each step's output feeds the next unmoved.
    """
    def loss_fn(trainable, frozen, initial_state, batch, capacity):
        model = nnx.merge(graph, trainable, frozen)
        positions = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32), batch["inputs"].shape)
        hidden, _ = model(batch["inputs"], positions)
        if initial_state is None:
            return response_loss(model, hidden, batch, capacity)
        teacher = nnx.merge(graph, initial_state, frozen)
        teacher_hidden, _ = teacher(batch["inputs"], positions)
        return response_loss(model, hidden, batch, capacity, teacher, jax.lax.stop_gradient(teacher_hidden))

    def step(trainable, opt_state, frozen, initial_state, batch, capacity):
        (weighted, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, initial_state,
                                                                            batch, capacity)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(trainable)]))
        return trainable, opt_state, {**sums, "weighted_loss": weighted, "grad_norm": optax.tree.norm(grads),
                                      "weights_finite": finite}

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), static_argnames=("capacity",), out_shardings=out_shardings)

