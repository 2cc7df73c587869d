"""Self-reflection on a labelled prompt set: alpha for harmful vs benign prompts, per mode.

    python bench/reflection_eval.py PROMPTS.csv [--model PATH] [--batch-size 16] [--limit N]

PROMPTS.csv has a `Goal` column (the request) and a `label` column (0 = harmful, 1 =
benign), as JailbreakBench's behaviours file does. For `json` and `logit` reflection it
prints the alpha distribution per label, how often the JSON failed to parse, and the
wall time of reflecting the whole set next to a 128-token `base` decode of the same
prompts (same batches, same engine, measured after compilation).

The base is loaded, decoded and asked to rate as `python -m ngsd_jax.decode --mode base`
and `--reflect json|logit` do (bench/common.py's `load_default_pair`, then `decode_batch`
and `reflect_prompts`): decode's preset, stop tokens and reflection settings.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import load_default_pair, model_flags  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv_path")
    parser.add_argument("--model", help="base checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts of each label")
    args = parser.parse_args()

    from ngsd_jax.checkpoints.default_model import default_base_path
    from ngsd_jax.decoding.pair import decode_batch, decode_settings, reflect_prompts

    with open(args.csv_path, newline="", encoding="utf-8") as f:
        rows = [(r["Goal"], int(r["label"])) for r in csv.DictReader(f)]
    if args.limit:
        rows = [r for label in (0, 1) for r in [x for x in rows if x[1] == label][: args.limit]]
    # The base as `python -m ngsd_jax.decode --mode base` loads it, with decode's reflection settings.
    flags = [*model_flags(args.model), "--max-new-tokens", "128", "--batch-size", str(args.batch_size)]
    pair, options = load_default_pair(flags, ("base",), [g for g, _ in rows], mode="base")
    path = args.model or str(default_base_path())
    batches = [rows[i: i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    def timed(fn):
        fn(batches[0])  # compile this program outside the timing
        start = time.perf_counter()
        out = [x for batch in batches for x in fn(batch)]
        return out, time.perf_counter() - start

    settings = decode_settings(options, "base")
    _, decode_s = timed(lambda b: [decode_batch(pair, options, settings, [g for g, _ in b])])
    print(f"model {path}; {len(rows)} prompts; batch {args.batch_size}")
    print(f"128-token base decode of the set: {decode_s:.1f} s\n")
    for mode in ("json", "logit"):
        rating = dataclasses.replace(options, reflect=mode)
        reflections, seconds = timed(lambda b, o=rating: reflect_prompts(pair, o, "ngsd", [g for g, _ in b]))
        print(f"## {mode}: {seconds:.1f} s = {seconds / decode_s:.2f}x the 128-token decode")
        for label, name in ((0, "harmful"), (1, "benign")):
            chosen = [r for r, (_, lab) in zip(reflections, rows) if lab == label]
            counts = collections.Counter(r.alpha for r in chosen)
            mean_risk = sum(r.risk for r in chosen) / len(chosen)
            spread = ", ".join(f"alpha {a}: {counts.get(a, 0)}" for a in (0.1, 0.5, 0.9))
            print(f"{name:>8} ({len(chosen)}): {spread}; mean risk {mean_risk:.2f}")
        if mode == "json":
            failed = sum(not r.parsed for r in reflections)
            print(f"JSON failed to parse: {failed}/{len(reflections)}")
            distinct = collections.Counter(tuple(sorted(r.scores.items())) for r in reflections)
            print(f"distinct score tuples: {len(distinct)}; most common: {distinct.most_common(1)[0]}")
        print()


if __name__ == "__main__":
    main()
