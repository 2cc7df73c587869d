"""First-call compile time of the fused decode program, unrolled layers against scanned ones
(`--scan-layers`), side by side in one run, from shapes alone (no weights allocated).

    python bench/compile_time.py                       # SmolLM2-135M (30 layers), Qwen3-8B + Qwen3-1.7B (36 + 28)
    python bench/compile_time.py --pairs smollm2-135m --repeats 3
    python bench/compile_time.py --pairs llama3.1-8b+llama3.2-1b --dtype bfloat16

Each case builds a fresh engine over weightless models (`abstract_decoder`, parameters are
`jax.ShapeDtypeStruct`s), so nothing is cached between cases and an 8B program compiles
without 16 GB of weights; it times `Engine.lower` (tracing to StableHLO) and `.compile()`
(XLA) of the program `decode` would run for one prompt. Cases: `base` (the base alone),
`ngsd` (base and a separate expert) and, for a pair whose expert has the base's shapes,
`ngsd-adapter` (the expert as a LoRA adapter on the top 10 layers, rank 16, all linear
projections: the default recipe's shapes). Repeats run round-robin over the cases; the
median is printed. Batch 1, a 128-token prompt, 128 new tokens, fp32 unless --dtype. The model
shapes and the adapter's are bench/common.py's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import ADAPTER_ALPHA, ADAPTER_RANK, ADAPTER_TOP_LAYERS, MODELS, PAIRS

from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.decoder import abstract_decoder
from ngsd_jax.models.lora import ALL_LINEAR, ATTENTION_PROJECTIONS, LoRAAdapter


def zero_adapter(config) -> LoRAAdapter:
    """The default recipe's adapter shapes (values do not change the program)."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim, \
        config.num_kv_heads * config.head_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, f),
              "up_proj": (d, f), "down_proj": (f, d)}
    assert set(shapes) == set(ALL_LINEAR) and set(ATTENTION_PROJECTIONS) < set(shapes)
    layers = range(config.num_layers - ADAPTER_TOP_LAYERS, config.num_layers)
    weights = {(i, name): (np.zeros((din, ADAPTER_RANK), np.float32), np.zeros((ADAPTER_RANK, dout), np.float32))
               for i in layers for name, (din, dout) in shapes.items()}
    return LoRAAdapter(ADAPTER_RANK, ADAPTER_ALPHA, weights, {}, "")


def compile_seconds(pair: str, case: str, scan_layers: bool, dtype, prompt_len: int,
                    new_tokens: int) -> tuple[float, float]:
    """(lower seconds, compile seconds) of a fresh engine's decode program."""
    base_config, expert_config = (MODELS[m] for m in PAIRS[pair])
    base = abstract_decoder(base_config, dtype, scan_layers)
    expert = abstract_decoder(expert_config, dtype, scan_layers) if case == "ngsd" else None
    adapter = zero_adapter(base_config) if case == "ngsd-adapter" else None
    vocab = min(base_config.vocab_size, expert_config.vocab_size)
    engine = Engine(base, expert, vocab, stop_ids=[], pad_id=0, adapter=adapter)
    settings = DecodeSettings(mode="base" if case == "base" else "ngsd", max_new_tokens=new_tokens)
    start = time.perf_counter()
    lowered = engine.lower([[1] * prompt_len], settings)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["smollm2-135m", "qwen3-8b+qwen3-1.7b"], choices=PAIRS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; {args.dtype}, batch 1, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}", flush=True)
    cases = []
    for pair in args.pairs:
        base_config, expert_config = (MODELS[m] for m in PAIRS[pair])
        kinds = ["base", "ngsd"] + (["ngsd-adapter"] if base_config == expert_config else [])
        cases += [(pair, kind, scan) for kind in kinds for scan in (False, True)]
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            times[case].append(compile_seconds(*case, getattr(jnp, args.dtype), args.prompt, args.new_tokens))
            lower_s, compile_s = times[case][-1]
            print(f"  {case[0]} {case[1]} {'scanned' if case[2] else 'unrolled'}: lower {lower_s:.1f} s, "
                  f"compile {compile_s:.1f} s", flush=True)

    print("\n| pair (layers) | case | unrolled: lower + compile (s) | scanned: lower + compile (s) | "
          "scanned / unrolled |")
    print("|---|---|---|---|---|")
    for pair, kind, scan in cases:
        if scan:
            continue
        base_config, expert_config = (MODELS[m] for m in PAIRS[pair])
        layers = str(base_config.num_layers) + ("" if kind != "ngsd" else f" + {expert_config.num_layers}")
        unrolled = [statistics.median(x) for x in zip(*times[(pair, kind, False)])]
        scanned = [statistics.median(x) for x in zip(*times[(pair, kind, True)])]
        print(f"| {pair} ({layers}) | {kind} | {unrolled[0]:.1f} + {unrolled[1]:.1f} = {sum(unrolled):.1f} | "
              f"{scanned[0]:.1f} + {scanned[1]:.1f} = {sum(scanned):.1f} | {sum(scanned) / sum(unrolled):.2f}x |")


if __name__ == "__main__":
    main()
