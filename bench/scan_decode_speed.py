"""Decode speed with unrolled layers against scanned ones (`--scan-layers`), side by side in one run.

    python bench/scan_decode_speed.py [--model PATH] [--new-tokens 64] [--repeats 5] [--batch 1]

The same cases as `bench/decode_speed.py` (engine base alone, ngsd with an adapter expert,
ngsd with the same adapter merged into a separate expert; the adapter has the default
recipe's shapes with random values), each on an unrolled and on a scanned copy of the
model. fp32, a ~40-token chat prompt, no stop tokens; the first call of each case compiles,
later calls run round-robin over all cases and the median is reported. Both layouts must
generate the same tokens (checked). The synthetic adapter, the prompt and the round-robin
timing are bench/common.py's.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from common import SHORT_PROMPT, synthetic_adapter, time_round_robin  # noqa: E402
from flax import nnx  # noqa: E402

from ngsd_jax.checkpoints.weights import load_model  # noqa: E402
from ngsd_jax.decoding.engine import Engine  # noqa: E402
from ngsd_jax.decoding.settings import DecodeSettings  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    from ngsd_jax.checkpoints.default_model import default_base_path
    from ngsd_jax.checkpoints.tokenizer import encode_chat, load_tokenizer

    path = args.model or str(default_base_path())
    tokenizer = load_tokenizer(path)
    prompt = encode_chat(tokenizer, SHORT_PROMPT)
    vocab, n = len(tokenizer), args.new_tokens
    cases = {}
    for scan in (False, True):
        model = load_model(path)
        adapter, merged = synthetic_adapter(model)
        layout = "scanned" if scan else "unrolled"
        # Each engine stacks its own copies (stacking is in place).
        engines = {"engine base": Engine(nnx.clone(model), None, vocab, stop_ids=[], scan_layers=scan),
                   "ngsd, adapter expert": Engine(nnx.clone(model), None, vocab, stop_ids=[], adapter=adapter,
                                                  scan_layers=scan),
                   "ngsd, merged expert": Engine(model, merged, vocab, stop_ids=[], scan_layers=scan)}
        for name, engine in engines.items():
            mode = "base" if name == "engine base" else "ngsd"
            cases[(name, layout)] = (lambda e=engine, m=mode: e.decode(
                [prompt] * args.batch, None, DecodeSettings(mode=m, max_new_tokens=n), alpha=0.9))

    load_before = os.getloadavg()
    first_call, results, timings = time_round_robin(cases, args.repeats, echo_first=True)
    for name, _ in cases:
        assert np.array_equal(results[(name, "unrolled")].tokens, results[(name, "scanned")].tokens), name
    load_after = os.getloadavg()

    print(f"model: {path}, fp32, batch {args.batch}, prompt {len(prompt)} tokens, {n} new tokens, median of "
          f"{args.repeats}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; tokens equal "
          f"in both layouts\n")
    print("| case | unrolled: first call (s) | scanned: first call (s) | unrolled: tokens/s | scanned: tokens/s "
          "| scanned / unrolled speed |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(name for name, _ in cases):
        rate = {layout: args.batch * n / statistics.median(timings[(name, layout)])
                for layout in ("unrolled", "scanned")}
        print(f"| {name} | {first_call[(name, 'unrolled')]:.1f} | {first_call[(name, 'scanned')]:.1f} | "
              f"{rate['unrolled']:.1f} | {rate['scanned']:.1f} | {rate['scanned'] / rate['unrolled']:.2f}x |")


if __name__ == "__main__":
    main()
