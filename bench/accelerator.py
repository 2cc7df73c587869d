"""Decode speed of the paper's pairs on whatever accelerator JAX finds, against the HBM roofline.

    python bench/accelerator.py                      # all three pairs, batch 1, 8, 32 (GPU/TPU)
    python bench/accelerator.py --pairs llama3.1-8b+llama3.2-1b --batch 1
    python bench/accelerator.py --tiny               # tiny shapes: runs on a CPU in seconds (tested)
    python bench/accelerator.py --scan-layers        # the same with stacked, scanned layers (decode's flag)

Synthetic bf16 weights at the shapes of Llama-2-7B + TinyLlama-1.1B, Llama-3.1-8B +
Llama-3.2-1B and Qwen3-8B + Qwen3-1.7B (random, built on the device; nothing is
downloaded), a 128-token prompt per row, 128 new tokens, no stop token. For each pair and
batch, `base` (the base alone) and `ngsd` (base and expert) run in the same engine; each
case is compiled by a first call and timed over --repeats later ones, interleaved, median.

Per case: ms per generated token (wall time of the whole call, prefill included, divided by
the new tokens), tokens/s over the batch, and the fraction of the HBM roofline: the bytes
a decode step must read (every weight of the models it runs, plus their KV caches at the
full cache length the program reads: prompt bucket + new tokens) times the new tokens,
over the device bandwidth, divided by the measured time. The bandwidth comes from a table
keyed by `jax.devices()[0].device_kind`; `--bandwidth GB/s` overrides it. Each pair also
prints the fused ngsd program's `memory_analysis()` at batch 1 (arguments: the weights;
temporaries: KV caches, activations and any weight copy XLA keeps). Model shapes, byte counts
(`ngsd_jax.parallel.memory`'s, on one device) and the round-robin timing are bench/common.py's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import GB, MODELS, PAIRS, cache_bytes, model_bytes, time_round_robin
from flax import nnx
from program_memory import memory_line, program_memory

from ngsd_jax.decoding.batching import bucket_length
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.decoder import Decoder

# Peak HBM bandwidth in GB/s by device kind (first match of a substring, most specific first).
BANDWIDTH_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM, HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("TPU v6", 1640.0),
    ("TPU v5p", 2765.0),
    ("TPU v5", 819.0),  # v5e ("TPU v5 lite")
    ("TPU v4", 1200.0),
)
PAPER_PAIRS = ["llama2-7b+tinyllama-1.1b", "llama3.1-8b+llama3.2-1b", "qwen3-8b+qwen3-1.7b"]


def device_bandwidth(kind: str) -> float | None:
    for key, gbps in BANDWIDTH_GBPS:
        if key.lower() in kind.lower():
            return gbps
    return None


def synthetic_model(name: str, dtype, seed: int) -> Decoder:
    """Random weights at a model's shapes, created on the default device by one jitted call."""
    config = MODELS[name]
    graph, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, dtype, nnx.Rngs(seed))))
    params = jax.jit(lambda: nnx.state(Decoder(config, dtype, nnx.Rngs(seed))))()
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    return nnx.merge(graph, params)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=None, help="default: the paper's three")
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 8 32")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per row (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=None, help="device bandwidth in GB/s (overrides the table)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--scan-layers", action="store_true", help="stacked layers run by lax.scan (decode's "
                                                                    "--scan-layers) instead of unrolled ones")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, batch 1 and 2, 16-token prompts, 8 new "
                                                            "tokens: checks the script on any backend")
    args = parser.parse_args()
    pairs = args.pairs or (["tiny"] if args.tiny else PAPER_PAIRS)
    batches = args.batch or ([1, 2] if args.tiny else [1, 8, 32])
    prompt_len = args.prompt or (16 if args.tiny else 128)
    n = args.new_tokens or (8 if args.tiny else 128)
    dtype = getattr(jnp, args.dtype)

    device = jax.devices()[0]
    bandwidth = args.bandwidth or device_bandwidth(device.device_kind)
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"bandwidth {'unknown (pass --bandwidth)' if bandwidth is None else f'{bandwidth:.0f} GB/s'}"
          f"{' (--bandwidth)' if args.bandwidth else ''}")
    print(f"{args.dtype} synthetic weights, prompt {prompt_len} tokens (bucket {bucket_length(prompt_len)}), "
          f"{n} new tokens, median of {args.repeats}, {'scanned' if args.scan_layers else 'unrolled'} layers\n",
          flush=True)
    rows = []
    start_all = time.perf_counter()
    for pair in pairs:
        base_name, expert_name = PAIRS[pair]
        base, expert = synthetic_model(base_name, dtype, 0), synthetic_model(expert_name, dtype, 1)
        vocab = min(base.config.vocab_size, expert.config.vocab_size)
        engine = Engine(base, expert, vocab_size=vocab, stop_ids=[], pad_id=0, scan_layers=args.scan_layers)
        rng = np.random.default_rng(0)
        cases = {}
        for batch in batches:
            prompts = rng.integers(3, vocab, size=(batch, prompt_len)).tolist()
            for mode in ("base", "ngsd"):
                settings = DecodeSettings(mode=mode, max_new_tokens=n)
                cases[(mode, batch)] = (lambda p=prompts, s=settings, e=engine: e.decode(p, settings=s))
        compile_s, results, timings = time_round_robin(cases, args.repeats)
        assert all(results[key].tokens.shape == (key[1], n) for key in cases)
        # After the timed calls, so that the first-call column is each case's own compile; the
        # batch-1 ngsd program is then already compiled, for prompts of the same bucket.
        stats, _ = program_memory(engine, 1, prompt_len, n, "ngsd")
        print(f"{pair}, ngsd program at batch 1: {memory_line(engine, stats, 1, prompt_len, n)}", flush=True)
        length = bucket_length(prompt_len) + n
        for (mode, batch), times in timings.items():
            models = [base.config] if mode == "base" else [base.config, expert.config]
            step_bytes = sum(model_bytes(c, dtype) + cache_bytes(c, batch, length, dtype) for c in models)
            seconds = statistics.median(times)
            roofline = None if bandwidth is None else n * step_bytes / (bandwidth * GB) / seconds
            rows.append((pair, mode, batch, compile_s[(mode, batch)], 1e3 * seconds / n, batch * n / seconds,
                         step_bytes, roofline))
        del engine, base, expert

    print("\n| pair | mode | batch | first call (s) | ms/token | tokens/s | bytes/step (GB) | roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for pair, mode, batch, first, ms, rate, step_bytes, roofline in rows:
        fraction = "n/a" if roofline is None else f"{100 * roofline:.0f}%"
        print(f"| {pair} | {mode} | {batch} | {first:.1f} | {ms:.2f} | {rate:.1f} | {step_bytes / GB:.3g} | "
              f"{fraction} |")
    print()
    for pair in pairs:
        for batch in batches:
            speed = {mode: rate for p, mode, b, _, _, rate, _, _ in rows if p == pair and b == batch}
            print(f"{pair}, batch {batch}: ngsd / base alone {speed['ngsd'] / speed['base']:.2f}x")
    print(f"\ntotal {time.perf_counter() - start_all:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
