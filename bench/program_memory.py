"""Memory of the fused decode program as XLA plans it, from shapes alone (no weights allocated).

    python bench/program_memory.py                  # the default pair and Llama-3.1-8B + Llama-3.2-1B
    python bench/program_memory.py --pairs llama3.1-8b+llama3.2-1b --dtype bfloat16 --batch 8
    python bench/program_memory.py --pairs narrow-32-head --dtype float32 --batch 8 --prompt 4096 \
        --new-tokens 1 --mode base              # a long prefill's attention memory

Each model is built with `nnx.eval_shape` (`abstract_decoder`), so its parameters are
`jax.ShapeDtypeStruct`s: the 8B + 1B program is compiled for the local backend without
16 GB of weights. `compiled.memory_analysis()` then gives the program's arguments (the
weights and inputs) and temporaries (KV caches, activations, and any copy of the weights
XLA decides to keep). Also imported by `bench/accelerator.py` for the model shapes and the
memory line.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from ngsd_jax.models.config import ModelConfig, RopeScaling
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.batching import bucket_length
from ngsd_jax.models.decoder import abstract_decoder

GB = 1e9


def _config(model_type, vocab, hidden, mlp, layers, heads, kv_heads, head_dim, theta, tie=False, rope=RopeScaling(),
            max_positions=4096):
    return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope_theta=theta, rope_scaling=rope, max_position_embeddings=max_positions,
                       tie_word_embeddings=tie, qk_norm=model_type == "qwen3")


# The shapes of each model's Hugging Face config.json (weights are never needed here).
MODELS = {
    "smollm2-135m": _config("llama", 49152, 576, 1536, 30, 9, 3, 64, 100000.0, tie=True, max_positions=8192),
    "llama2-7b": _config("llama", 32000, 4096, 11008, 32, 32, 32, 128, 10000.0),
    "tinyllama-1.1b": _config("llama", 32000, 2048, 5632, 22, 32, 4, 64, 10000.0, max_positions=2048),
    "llama3.1-8b": _config("llama", 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, max_positions=131072,
                           rope=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "llama3.2-1b": _config("llama", 128256, 2048, 8192, 16, 32, 8, 64, 500000.0, tie=True, max_positions=131072,
                           rope=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "qwen3-8b": _config("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1000000.0, max_positions=40960),
    "qwen3-1.7b": _config("qwen3", 151936, 2048, 6144, 28, 16, 8, 128, 1000000.0, tie=True, max_positions=40960),
    # Attention memory: 32 heads but narrow (the score tensor grows with heads and length, not width).
    "narrow-32-head": _config("llama", 1024, 256, 512, 2, 32, 8, 8, 10000.0, max_positions=8192),
    # For `--tiny` runs and tests: the same code paths at shapes a CPU compiles in seconds.
    "tiny-base": _config("llama", 512, 128, 256, 4, 4, 2, 32, 10000.0),
    "tiny-expert": _config("llama", 512, 64, 128, 2, 4, 2, 16, 10000.0, tie=True),
}
PAIRS = {
    "smollm2-135m": ("smollm2-135m", "smollm2-135m"),  # the embedded default: base and its own fine-tune
    "llama2-7b+tinyllama-1.1b": ("llama2-7b", "tinyllama-1.1b"),
    "llama3.1-8b+llama3.2-1b": ("llama3.1-8b", "llama3.2-1b"),
    "qwen3-8b+qwen3-1.7b": ("qwen3-8b", "qwen3-1.7b"),
    "tiny": ("tiny-base", "tiny-expert"),
    "narrow-32-head": ("narrow-32-head", "narrow-32-head"),
}


def parameter_bytes(config: ModelConfig, dtype) -> int:
    return config.num_params * jnp.dtype(dtype).itemsize


def kv_cache_bytes(config: ModelConfig, batch: int, length: int, dtype) -> int:
    """Keys and values of every layer for `batch` rows of `length` positions."""
    return 2 * config.num_layers * batch * config.num_kv_heads * length * config.head_dim * jnp.dtype(dtype).itemsize


def abstract_engine(base: ModelConfig, expert: ModelConfig, dtype) -> Engine:
    """An engine over weightless models: enough to lower and compile its programs."""
    return Engine(abstract_decoder(base, dtype), abstract_decoder(expert, dtype),
                  vocab_size=min(base.vocab_size, expert.vocab_size), stop_ids=[], pad_id=0)


def program_memory(engine: Engine, batch: int, prompt_len: int, new_tokens: int, mode: str = "ngsd"):
    """(memory_analysis of the decode program for batch x prompt_len prompts, compile seconds)."""
    start = time.perf_counter()
    lowered = engine.lower([[1] * prompt_len] * batch, DecodeSettings(mode=mode, max_new_tokens=new_tokens))
    stats = lowered.compile().memory_analysis()
    return stats, time.perf_counter() - start


def memory_line(engine: Engine, stats, batch: int, prompt_len: int, new_tokens: int, mode: str = "ngsd") -> str:
    """One line: arguments and temporaries against the weights and KV caches they should hold."""
    models = [c for c, used in ((engine.base_config, mode != "expert"), (engine.expert_config, mode != "base"))
              if c is not None and used]
    dtype = next(iter(jax.tree_util.tree_leaves(engine.base_params or engine.expert_params))).dtype
    weights = sum(parameter_bytes(c, dtype) for c in models)
    length = bucket_length(prompt_len) + new_tokens
    kv = sum(kv_cache_bytes(c, batch, length, dtype) for c in models)
    return (f"arguments {stats.argument_size_in_bytes / GB:.3f} GB (weights {weights / GB:.3f} GB), "
            f"temporaries {stats.temp_size_in_bytes / GB:.3f} GB (KV caches {kv / GB:.3f} GB, "
            f"{stats.temp_size_in_bytes / weights:.2f}x the weights)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["smollm2-135m", "llama3.1-8b+llama3.2-1b"], choices=PAIRS)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens (padded to its bucket)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--mode", default="ngsd")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; batch "
          f"{args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, mode {args.mode}")
    for pair in args.pairs:
        for dtype_name in args.dtype:
            engine = abstract_engine(*(MODELS[m] for m in PAIRS[pair]), getattr(jnp, dtype_name))
            stats, seconds = program_memory(engine, args.batch, args.prompt, args.new_tokens, args.mode)
            print(f"{pair} {dtype_name}: " + memory_line(engine, stats, args.batch, args.prompt, args.new_tokens,
                                                          args.mode) + f"; compiled in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
