"""Run by tests/test_train_sharding.py in a fresh interpreter with 8 fake CPU devices.

Two train steps (full fine-tuning and LoRA, with the KL teacher) on one device and on
meshes; then a training state and a model checkpoint saved on one mesh and restored onto
another and onto one device. Prints what the test asserts on as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ngsd_jax.checkpoints.weights import load_model, save_params
from ngsd_jax.models.config import config_from_hf
from ngsd_jax.models.decoder import Decoder
from ngsd_jax.models.lora import apply_lora
from ngsd_jax.parallel.sharding import make_mesh, parse_mesh, shard_model
from ngsd_jax.training import state as train_state
from ngsd_jax.training import step as train_step
from ngsd_jax.training.sharding import place_batch, place_optimizer_state, state_shardings

CONFIG = config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                         "tie_word_embeddings": False})
MESHES = ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2", "fsdp=8"]


def batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 256, (8, 16)).astype(np.int32)
    mask = (np.arange(16)[None, :] >= rng.integers(4, 10, (8, 1))).astype(np.float32)
    soft = np.zeros_like(mask)
    soft[4:] = mask[4:]  # half the rows learn the starting model's distributions (KL), as benign answers do
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "mask": mask, "weights": mask * 1.5,
            "soft": soft}


def model(method):
    m = Decoder(CONFIG, jnp.float32, nnx.Rngs(0))
    if method == "lora":
        apply_lora(m, 4, 8.0, "all-linear", seed=1)
        # A fresh adapter's b is zero; make it non-zero so the adapter's path carries gradient to a.
        for _, var in nnx.iter_graph(m):
            if isinstance(var, nnx.LoRAParam) and var.shape[0] == 4:
                var.set_value(jnp.full(var.shape, 0.01, jnp.float32))
    return m


def optimizer():
    # The project's chain (train_step.make_optimizer). eps 1e-4 rather than 1e-8: where a gradient
    # entry is at rounding level (an embedding row no token uses), Adam's m/sqrt(v) turns the
    # rounding differences of another reduction order into full-size, opposite steps.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-4, weight_decay=0.1))


def run_steps(method, mesh=None):
    """Two steps; returns losses, grad norms, the final trainable state (host) and placements."""
    m = model(method)
    if mesh is not None:
        shard_model(m, mesh)
    graph, trainable, frozen = nnx.split(m, nnx.LoRAParam if method == "lora" else nnx.Param, ...)
    initial = jax.tree.map(jnp.copy, trainable)
    opt = optimizer()
    opt_state = opt.init(trainable)
    if mesh is not None:
        opt_state = place_optimizer_state(opt, opt_state, trainable, mesh)
    shardings_before = [x.sharding for x in jax.tree.leaves(trainable)]
    step = train_step.make_train_step(graph, opt, None if mesh is None else state_shardings(trainable, opt_state))
    arrays = batch() if mesh is None else place_batch(batch(), mesh)
    losses, norms = [], []
    for _ in range(2):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, initial, arrays, capacity=128)
        losses.append(float(metrics["weighted_loss"]))
        norms.append(float(metrics["grad_norm"]))
    leaves = [np.asarray(x) for x in jax.tree.leaves(trainable)]
    out = {"losses": losses, "norms": norms, "leaves": leaves}
    if mesh is not None:
        out["shardings_kept"] = all(x.sharding.is_equivalent_to(before, x.ndim) for x, before in
                                    zip(jax.tree.leaves(trainable), shardings_before))
        mu = opt_state[1][0].mu  # chain(clip, adamw): adamw's scale_by_adam state
        out["moments_like_params"] = all(m_.sharding.is_equivalent_to(p.sharding, p.ndim) for m_, p in
                                         zip(jax.tree.leaves(mu), jax.tree.leaves(trainable)))
        out["some_split"] = any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                                for x in jax.tree.leaves(trainable))
        out["batch_rows"] = sorted({s.data.shape[0] for s in arrays["inputs"].addressable_shards})
    return out


def checkpoints(tmp: Path):
    """Training state and model checkpoints saved on one mesh, restored onto another and onto one device."""
    source = make_mesh(parse_mesh("data=2,fsdp=2,tensor=2"))
    m = shard_model(model("full"), source)
    graph, trainable, frozen = nnx.split(m, nnx.Param, ...)
    opt = optimizer()
    opt_state = place_optimizer_state(opt, opt.init(trainable), trainable, source)
    step = train_step.make_train_step(graph, opt)
    trainable, opt_state, _ = step(trainable, opt_state, frozen, None, place_batch(batch(), source), capacity=128)
    saved = [np.asarray(x) for x in jax.tree.leaves((trainable, opt_state))]
    saved_q = np.asarray(nnx.merge(graph, trainable, frozen).layers[0].attn.q_proj.kernel[...])
    manager = train_state.checkpoint_manager(tmp / "run")
    train_state.save_state(manager, 1, trainable, opt_state, {"note": "saved on data=2,fsdp=2,tensor=2"})
    manager.close()
    save_params(nnx.merge(graph, trainable, frozen), tmp / "model")
    (tmp / "model" / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))

    out = {}
    for name in ("tensor=8", "one device"):
        target = None if name == "one device" else make_mesh(parse_mesh(name))
        fresh = model("full")
        if target is not None:
            shard_model(fresh, target)
        fresh_graph, fresh_trainable, fresh_frozen = nnx.split(fresh, nnx.Param, ...)
        fresh_opt = opt.init(fresh_trainable)
        if target is not None:
            fresh_opt = place_optimizer_state(opt, fresh_opt, fresh_trainable, target)
        restored_trainable, restored_opt, meta = train_state.restore_state(
            train_state.checkpoint_manager(tmp / "run"), fresh_trainable, fresh_opt)
        restored_q = nnx.merge(fresh_graph, restored_trainable, fresh_frozen).layers[0].attn.q_proj.kernel[...]
        loaded_q = load_model(tmp / "model", mesh=target).layers[0].attn.q_proj.kernel[...]
        out[name] = {
            "state_equal": all(np.array_equal(a, np.asarray(b)) for a, b in
                               zip(saved, jax.tree.leaves((restored_trainable, restored_opt)))),
            "state_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(restored_trainable)}),
            "restored_q_spec": str(restored_q.sharding.spec) if target is not None else None,
            "model_equal": bool(np.array_equal(np.asarray(loaded_q), saved_q)),
            "model_q_spec": str(loaded_q.sharding.spec) if target is not None else None,
            "model_q_devices": len(loaded_q.sharding.device_set),
            "meta": meta["note"],
        }
    return out


def close(a, b):
    scale = max(np.abs(a).max(), 1e-6)
    return float(np.abs(a - b).max() / scale)


def main():
    assert jax.device_count() == 8
    result = {}
    for method in ("full", "lora"):
        reference = run_steps(method)
        for name in MESHES:
            sharded = run_steps(method, make_mesh(parse_mesh(name)))
            result[f"{method}/{name}"] = {
                "loss_diff": max(abs(a - b) for a, b in zip(reference["losses"], sharded["losses"])),
                "norm_diff": max(abs(a - b) for a, b in zip(reference["norms"], sharded["norms"])),
                "param_rel_diff": max(close(a, b) for a, b in zip(reference["leaves"], sharded["leaves"])),
                "loss": reference["losses"],
                "norm": reference["norms"],
                **{k: sharded[k] for k in ("shardings_kept", "moments_like_params", "some_split", "batch_rows")},
            }
    with tempfile.TemporaryDirectory() as tmp:
        result["checkpoints"] = checkpoints(Path(tmp))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
