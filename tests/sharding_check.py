"""Run by tests/test_sharding.py in a fresh interpreter with 8 fake CPU devices (XLA_FLAGS must
be set before jax initialises, which the pytest process has already done).

Decodes a tiny random Llama pair in mode "ngsd" unsharded, then again with both models
sharded on a 2x4 ("data", "model") mesh, and prints what the test asserts on as JSON.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from ngsd_jax.engine import DecodeSettings, Engine
from ngsd_jax.loading import load_model
from ngsd_jax.sharding import make_mesh, shard_model

PROMPTS = [[1, 17, 42, 99, 7], [1, 5, 250, 3, 60, 61, 62, 8, 9]]


def tiny_llama(seed: int, directory: str):
    torch.manual_seed(seed)
    # Sharp, unrelated distributions (initializer_range 0.3), so the gate fires and the merge runs.
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return load_model(directory)


def decode(base, expert):
    engine = Engine(base, expert, vocab_size=256, stop_ids=[2])
    return engine.decode(PROMPTS, settings=DecodeSettings(mode="ngsd", max_new_tokens=16), alpha=0.9)


def forward_logits(model, tokens):
    """fp32 logits of a plain cache-free forward, params passed into jit like the engine does."""
    graph, params = nnx.split(model)
    return np.asarray(_forward(graph, params, tokens))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graph, params, tokens):
    model = nnx.merge(graph, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions)
    return model.logits(hidden)


def main():
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as expert_dir:
        base, expert = tiny_llama(0, base_dir), tiny_llama(1, expert_dir)
    tokens = np.array(PROMPTS[1:], np.int32)
    reference = decode(base, expert)
    logits_before = forward_logits(base, tokens)

    mesh = make_mesh(2, 4)
    shard_model(base, mesh)
    shard_model(expert, mesh)
    sharded = decode(base, expert)
    logits_after = forward_logits(base, tokens)

    q, k = base.layers[0].attn.q_proj.kernel[...], base.layers[0].attn.k_proj.kernel[...]
    json.dump({
        "tokens_equal": bool(np.array_equal(reference.tokens, sharded.tokens)),
        "lengths_equal": bool(np.array_equal(reference.lengths, sharded.lengths)),
        "spikes": int(reference.spike.sum()),
        "divergence_diff": float(np.abs(reference.divergence - sharded.divergence).max()),
        "potential_diff": float(np.abs(reference.potential - sharded.potential).max()),
        "logits_diff": float(np.abs(logits_before - logits_after).max()),
        "logits_scale": float(np.abs(logits_before).max()),
        "q_spec": list(q.sharding.spec),
        "q_shape": list(q.shape),
        "q_shard_shapes": sorted({tuple(s.data.shape) for s in q.addressable_shards}),
        "q_devices": len(q.sharding.device_set),
        "k_spec": list(k.sharding.spec),
        "down_spec": list(base.layers[0].mlp.down_proj.kernel[...].sharding.spec),
        "embedding_spec": list(base.embedding[...].sharding.spec),
    }, sys.stdout)


if __name__ == "__main__":
    main()
