"""Memory of the fused decode program as XLA plans it, from shapes alone (no weights allocated).

    python bench/program_memory.py                  # the default pair and Llama-3.1-8B + Llama-3.2-1B
    python bench/program_memory.py --pairs llama3.1-8b+llama3.2-1b --dtype bfloat16 --batch 8
    python bench/program_memory.py --pairs narrow-32-head --dtype float32 --batch 8 --prompt 4096 \
        --new-tokens 1 --mode base              # a long prefill's attention memory

Each model is built with `nnx.eval_shape` (`abstract_decoder`), so its parameters are
`jax.ShapeDtypeStruct`s: the 8B + 1B program is compiled for the local backend without
16 GB of weights. `compiled.memory_analysis()` then gives the program's arguments (the
weights and inputs) and temporaries (KV caches, activations, and any copy of the weights
XLA decides to keep). The model shapes are bench/common.py's; the weights and KV caches the
line compares them with are `ngsd_jax.parallel.memory`'s counts on one device. Also imported
by `bench/accelerator.py` for the compiled program's memory and its line.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import GB, MODELS, PAIRS, cache_bytes, model_bytes

from ngsd_jax.decoding.batching import bucket_length
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.config import ModelConfig
from ngsd_jax.models.decoder import abstract_decoder


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
    weights = sum(model_bytes(c, dtype) for c in models)
    length = bucket_length(prompt_len) + new_tokens
    kv = sum(cache_bytes(c, batch, length, dtype) for c in models)
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
