"""Run by tests/test_sharding.py in a fresh interpreter with 8 fake CPU devices (XLA_FLAGS must
be set before jax initialises, which the pytest process has already done).

Decodes a tiny random Llama pair in mode "ngsd" on one device, then again with both models
loaded straight onto several (data, fsdp, tensor) meshes, and once with scanned (stacked)
layers on one mesh, and prints what the test asserts on as JSON.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from ngsd_jax.checkpoints.adapter import extract_adapter
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.lora import LoRALinear, apply_lora
from ngsd_jax.parallel.sharding import make_mesh, parse_mesh

PROMPTS = [[1, 17, 42, 99, 7], [1, 5, 250, 3, 60, 61, 62, 8, 9], [1, 4, 4, 200]]
# (mesh, expert placement)
MESHES = [("data=8", "sharded"), ("tensor=8", "sharded"), ("data=2,tensor=4", "sharded"),
          ("data=2,fsdp=2,tensor=2", "sharded"), ("data=2,tensor=4", "replicated")]
ADAPTER_MESHES = ["data=8", "tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"]


def tiny_llama(seed: int, directory: str):
    torch.manual_seed(seed)
    # Sharp, unrelated distributions (initializer_range 0.3), so the gate fires and the merge runs.
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(directory)


def decode(base, expert, mesh=None, scan_layers=False, adapter=None):
    engine = Engine(base, expert, vocab_size=256, stop_ids=[2], mesh=mesh, scan_layers=scan_layers, adapter=adapter)
    calls = []
    program = engine._jitted
    engine._jitted = lambda *args: calls.append(args) or program(*args)  # keeps the arguments for lowering
    result = engine.decode(PROMPTS, settings=DecodeSettings(mode="ngsd", max_new_tokens=16), alpha=0.9)
    return result, engine, program.lower(*calls[0]).compile().as_text()


def cache_shapes(hlo: str) -> list[list[int]]:
    """The per-device [rows, kv heads] of every KV-cache-shaped buffer ([*, *, 16 + 16, head_dim 16])
    in the partitioned program."""
    return sorted({(int(b), int(h)) for b, h in re.findall(r"f32\[(\d+),(\d+),32,16\]", hlo)})


def stacked_cache_shapes(hlo: str) -> list[list[int]]:
    """The same for stacked caches ([2 layers, rows, kv heads, 32, 16])."""
    return sorted({(int(b), int(h)) for b, h in re.findall(r"f32\[2,(\d+),(\d+),32,16\]", hlo)})


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


def lora_adapter(base_dir):
    """A rank-4 all-linear LoRA adapter of the base's top layer, b random so the delta matters."""
    model = load_model(base_dir)
    apply_lora(model, rank=4, alpha=8.0, targets="all-linear", layers=[1], seed=1)
    rng = np.random.RandomState(0)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            node.lora_b.set_value(0.5 * rng.randn(*node.lora_b.shape).astype(np.float32))
    return extract_adapter(model)


def adapter_specs(engine):
    """The placements of the adapter's A and B of the top layer's q and down projections."""
    layer = nnx.merge(engine.paired_graph, engine.paired_params).layers[1]
    return {name: {"a": spec(module.lora_a[...]), "b": spec(module.lora_b[...]),
                   "kernel": spec(module.base.kernel[...])}
            for name, module in (("q_proj", layer.attn.q_proj), ("down_proj", layer.mlp.down_proj))}


def spec(array):
    return [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]


def main():
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    out = {"meshes": {}}
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as expert_dir:
        tiny_llama(0, base_dir)
        tiny_llama(1, expert_dir)
        tokens = np.array(PROMPTS[1:2], np.int32)
        reference, _, hlo = decode(load_model(base_dir), load_model(expert_dir))
        out["one_device_cache_shapes"] = cache_shapes(hlo)
        logits_before = forward_logits(load_model(base_dir), tokens)
        out["spikes"] = int(reference.spike.sum())
        for text, expert_placement in MESHES:
            mesh = make_mesh(parse_mesh(text, jax.device_count()))
            base = load_model(base_dir, mesh=mesh)
            expert = load_model(expert_dir, mesh=mesh, placement=expert_placement)
            sharded, engine, hlo = decode(base, expert, mesh)
            logits_after = forward_logits(base, tokens)
            out["meshes"][f"{text}/{expert_placement}"] = {
                "tokens_equal": bool(np.array_equal(reference.tokens, sharded.tokens)),
                "lengths_equal": bool(np.array_equal(reference.lengths, sharded.lengths)),
                "divergence_diff": float(np.abs(reference.divergence - sharded.divergence).max()),
                "potential_diff": float(np.abs(reference.potential - sharded.potential).max()),
                "logits_diff": float(np.abs(logits_before - logits_after).max()),
                "logits_scale": float(np.abs(logits_before).max()),
                "output_spec": list(engine.output_sharding.spec),
                "cache_shapes": cache_shapes(hlo),
                "output_shard_rows": sorted({s.data.shape[0] for s in jax.device_put(
                    np.zeros((8, 1)), engine.output_sharding).addressable_shards}),
                "q_spec": spec(base.layers[0].attn.q_proj.kernel[...]),
                "q_shape": list(base.layers[0].attn.q_proj.kernel[...].shape),
                "q_shard_shapes": sorted({tuple(s.data.shape)
                                          for s in base.layers[0].attn.q_proj.kernel[...].addressable_shards}),
                "k_spec": spec(base.layers[0].attn.k_proj.kernel[...]),
                "down_spec": spec(base.layers[0].mlp.down_proj.kernel[...]),
                "embedding_spec": spec(base.embedding[...]),
                "expert_q_spec": spec(expert.layers[0].attn.q_proj.kernel[...]),
            }
        mesh = make_mesh(parse_mesh("data=2,fsdp=2,tensor=2", jax.device_count()))
        base, expert = load_model(base_dir, mesh=mesh), load_model(expert_dir, mesh=mesh)
        scanned, _, hlo = decode(base, expert, mesh, scan_layers=True)
        out["scanned"] = {"tokens_equal": bool(np.array_equal(reference.tokens, scanned.tokens)),
                          "q_spec": spec(base.layers.layer.attn.q_proj.kernel[...]),
                          "cache_shapes": stacked_cache_shapes(hlo)}
        # The expert as a LoRA adapter over the (sharded) base: one weight stream.
        adapter = lora_adapter(base_dir)
        reference, _, _ = decode(load_model(base_dir), None, adapter=adapter)
        out["adapter_spikes"] = int(reference.spike.sum())
        out["adapter"] = {}
        for text in ADAPTER_MESHES:
            mesh = make_mesh(parse_mesh(text, jax.device_count()))
            sharded, engine, _ = decode(load_model(base_dir, mesh=mesh), None, mesh, adapter=adapter)
            out["adapter"][text] = {
                "tokens_equal": bool(np.array_equal(reference.tokens, sharded.tokens)),
                "lengths_equal": bool(np.array_equal(reference.lengths, sharded.lengths)),
                "divergence_diff": float(np.abs(reference.divergence - sharded.divergence).max()),
                "potential_diff": float(np.abs(reference.potential - sharded.potential).max()),
                "output_spec": list(engine.output_sharding.spec),
                "specs": adapter_specs(engine),
            }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
