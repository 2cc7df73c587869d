"""The light touch of every gate setting at once, from one teacher-forced pass.

    python bench/gate_frontier.py [--expert PATH] [--sets harmful benign ordinary] [--limit N]
                                  [--base-cache FILE.json] [--out FILE.json]

Until NGSD first changes a token, its answer IS the base's greedy answer, so along that
answer everything the gate does is known from two forward passes over prompt + base answer
(base and expert, teacher-forced, no generation): the divergence D at every step, which
steps the neuron fires on for any tau and threshold, and at every step whether the merged
scores at a given alpha would pick another token than the base's. A benign answer stays
identical to the base's exactly when no step both spikes and changes the token at the
prompt's alpha, and the first such step is the first differing token. The alpha of each
prompt is the `expert` risk source's (10 x the expert's probability of opening with a
refusal, read at the same prompt end) through each mapping of the grid.

So one pass gives `identical`, `first differing token` and `prompts with a spike` (as
`python -m ngsd_jax.eval` and bench/light_touch.py measure them by decoding) for a whole
grid of thresholds, alpha levels and risk thresholds. What it cannot give is what happens
after the first change, e.g. whether a harmful answer then turns into a refusal: measure that
by decoding. Greedy only; the base's answers come from --base-cache when it has them (the
format bench/light_touch.py writes), else they are decoded here and cached.

The base is loaded and its answers decoded as `python -m ngsd_jax.decode --mode base` does
(bench/common.py's `load_default_pair`, then `decode_batch`: decode's preset, prompts,
distribution size and stop tokens); the merge's K, the soft reset and the alpha mapping are
decode's (`ngsd_jax.decoding.risk.alpha_from_risk`), the ROC AUC is
`ngsd_jax.evaluation.metrics.roc_auc`. The held-out sets are bench/common.py's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (SETS, add_pair_arguments, default_expert_path, expert_model, harmful_auc, heldout,  # noqa: E402
                    load_default_pair, model_flags)  # noqa: E402

BASE_BATCH = 64  # prompts per decode of the base's answers


def teacher_forced(base, expert, encode, vocab, merge_top_k, prompts, answers, alphas, batch_size, steps_max):
    """Per prompt: D along the base's answer, [steps, len(alphas)] whether the merged scores change
    the token, and how many steps' base argmax disagreed with the
    cached token (numerical near-ties between the cached and the teacher-forced pass). `encode`
    turns prompts into the base's prompt ids as decode encodes them; `vocab` is the size of the
    next-token distributions and `merge_top_k` the merge's K (decode's)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ngsd_jax.decoding.gate import total_variation, union_top_k_merge

    @jax.jit
    def step_quantities(p_b, p_e, next_tokens):
        d = total_variation(p_b, p_e)
        changes = jnp.stack([jnp.argmax(union_top_k_merge(p_b, p_e, a, merge_top_k), -1) != next_tokens
                             for a in alphas], -1)
        return d, changes, jnp.argmax(p_b, -1) != next_tokens

    def jitted_probabilities(model):
        graph, state = nnx.split(model)

        @jax.jit
        def probabilities(state, tokens, positions, picks):
            m = nnx.merge(graph, state)
            hidden, _ = m(tokens, positions)
            logits = m.logits(hidden[jnp.arange(tokens.shape[0])[:, None], picks])
            return jax.nn.softmax(logits[..., :vocab].astype(jnp.float32), -1)

        return lambda *arrays: probabilities(state, *arrays)

    base_probabilities, expert_probabilities = jitted_probabilities(base), jitted_probabilities(expert)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        encoded = encode([prompts[i] for i in chunk])
        steps = [len(answers[i]) for i in chunk]
        width = max(len(e) + n for e, n in zip(encoded, steps))
        width = -(-width // 64) * 64
        most = steps_max  # one program shape per width
        tokens = np.zeros((len(chunk), width), np.int32)
        picks = np.zeros((len(chunk), most), np.int32)
        nexts = np.zeros((len(chunk), most), np.int32)
        for row, (e, i) in enumerate(zip(encoded, chunk)):
            seq = e + answers[i]
            tokens[row, : len(seq)] = seq
            # The distribution of answer token j is read at the position before it.
            picks[row, : steps[row]] = np.arange(len(e) - 1, len(e) - 1 + steps[row])
            nexts[row, : steps[row]] = answers[i]
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
        p_b = base_probabilities(tokens, positions, picks)
        p_e = expert_probabilities(tokens, positions, picks)
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        d, changes, mismatch = step_quantities(flat(p_b), flat(p_e), nexts.reshape(-1))
        d = np.asarray(d).reshape(len(chunk), most)
        changes = np.asarray(changes).reshape(len(chunk), most, len(alphas))
        mismatch = np.asarray(mismatch).reshape(len(chunk), most)
        for row, n in enumerate(steps):
            out.append({"d": d[row, :n], "changes": changes[row, :n], "mismatch": int(mismatch[row, :n].sum())})
        print(f"  {min(start + batch_size, len(prompts))}/{len(prompts)}", flush=True)
    return out


def first_change(d, changes, tau, threshold, soft_reset):
    """(first step where the neuron fires and the token changes, or None; whether it fired at all)."""
    v, fired = 0.0, False
    for t in range(len(d)):
        v = (1.0 - 1.0 / tau) * v + d[t]
        if v >= threshold:
            fired = True
            if changes[t]:
                return t, True
            v = soft_reset * v
    return None, fired


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(parser)
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--limit", type=int, default=0, help="only N evenly spaced prompts of each set")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-cache", help="JSON of the base's answers (bench/light_touch.py's format)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[1.0, 1.5, 2.0, 3.0],
                        help="neuron thresholds theta to sweep (the paper: 1.0)")
    parser.add_argument("--tau", type=float, default=8.0)
    parser.add_argument("--risk-thresholds", default="5,6;7,8;8,9;9,9.5",
                        help="alpha mappings' risk thresholds to sweep, 'low,high;...' (the paper: 5,6)")
    parser.add_argument("--alpha-levels", default="0.1,0.5,0.9;0,0.5,0.9",
                        help="alpha levels to sweep, 'low,mid,high;...' (the paper: 0.1,0.5,0.9)")
    parser.add_argument("--out", help="write the table (and per-prompt quantities) to this JSON file")
    args = parser.parse_args()

    from flax import nnx

    from ngsd_jax.checkpoints.default_model import default_base_path
    from ngsd_jax.decoding.engine import Engine
    from ngsd_jax.decoding.pair import decode_batch, decode_settings, encode_prompts
    from ngsd_jax.decoding.risk import AlphaMapping, ExpertRisk, alpha_from_risk, opening_token_sequences, opening_trie
    from ngsd_jax.decoding.settings import DecodeSettings

    level_grid = [tuple(float(x) for x in s.split(",")) for s in args.alpha_levels.split(";")]
    mapping_grid = [tuple(float(x) for x in s.split(",")) for s in args.risk_thresholds.split(";")]
    alphas = sorted({a for levels in level_grid for a in levels if a > 0})

    sets = {name: prompts for name in args.sets if (prompts := heldout(name, args.limit))}
    # The base as decode loads it (its answers are decode's --mode base answers); the expert read
    # whole, as the teacher-forced pass runs it on its own.
    flags = [*model_flags(args.base, args.expert), "--max-new-tokens", str(args.max_new_tokens),
             "--batch-size", str(BASE_BATCH), "--tau", str(args.tau)]
    pair, options = load_default_pair(flags, ("base",), [p for prompts in sets.values() for p in prompts],
                                      mode="base")
    base_path = args.base or str(default_base_path())
    expert_path = args.expert or default_expert_path()
    base = nnx.merge(pair.engine.base_graph, pair.engine.base_params)
    expert = expert_model(base, expert_path)
    vocab = pair.engine.vocab_size
    # The expert's risk as the decode program reads it (--reflect expert), from its own prefill.
    risk_engine = Engine(None, expert, vocab, pair.engine.stop_ids, pad_id=pair.engine.pad_id)
    expert_risk = ExpertRisk(opening_trie(opening_token_sequences(pair.base_tokenizer), vocab))

    def risks(prompts):
        encoded = encode_prompts(pair, options, prompts)[0]
        return [float(r) for i in range(0, len(encoded), args.batch_size) for r in risk_engine.decode(
            encoded[i: i + args.batch_size], None, DecodeSettings(mode="expert", max_new_tokens=1),
            expert_risk=expert_risk).risk]

    cache_path = Path(args.base_cache) if args.base_cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    quantities = {}
    for name, prompts in sets.items():
        known = cache.get(name, {})
        missing = [p for p in prompts if p not in known]
        if missing:
            print(f"{name}: decoding the base's answers to {len(missing)} prompts", flush=True)
            for i in range(0, len(missing), BASE_BATCH):
                chunk = missing[i: i + BASE_BATCH]
                result, _ = decode_batch(pair, options, decode_settings(options, "base"), chunk)
                known.update({p: {"tokens": result.sequence(r)} for r, p in enumerate(chunk)})
            cache[name] = known
            if cache_path:
                cache_path.write_text(json.dumps(cache))
        print(f"{name}: teacher-forced base and expert over {len(prompts)} answers", flush=True)
        quantities[name] = teacher_forced(base, expert, lambda chunk: encode_prompts(pair, options, chunk)[0],
                                          vocab, options.merge_top_k, prompts,
                                          [known[p]["tokens"] for p in prompts], alphas, args.batch_size,
                                          args.max_new_tokens)
        for q, r in zip(quantities[name], risks(prompts)):
            q["risk"] = r

    report = {"base": base_path, "expert": str(expert_path), "sizes": {k: len(v) for k, v in sets.items()},
              "tau": options.tau, "rows": [], "auc": {}, "tv": {}}
    for name, q in quantities.items():
        d = np.concatenate([x["d"] for x in q])
        report["tv"][name] = {"mean": float(d.mean()), "median": float(np.median(d)),
                              "above_0.125": float((d > 0.125).mean()),
                              "mismatched_steps": int(sum(x["mismatch"] for x in q)), "steps": int(d.size)}
    if "harmful" in quantities:
        for other in quantities:
            if other != "harmful":
                report["auc"][f"harmful vs {other}"] = harmful_auc([x["risk"] for x in quantities["harmful"]],
                                                                   [x["risk"] for x in quantities[other]])
    print("TV along the base's answers:", json.dumps(report["tv"]))
    print("expert risk ROC AUC:", json.dumps(report["auc"]))
    print(f"{'theta':>5} {'risk thr':>8} {'levels':>13} {'set':<9} {'identical':>9} {'1st diff':>8} "
          f"{'w/ spike':>8} {'alpha 0.9':>9}")
    for theta, thresholds, levels in itertools.product(args.thresholds, mapping_grid, level_grid):
        for name, q in quantities.items():
            firsts, fired, high = [], [], []
            for x in q:
                alpha = alpha_from_risk(x["risk"], AlphaMapping(levels, thresholds))
                changes = x["changes"][:, alphas.index(alpha)] if alpha > 0 else np.zeros(len(x["d"]), bool)
                first, spiked = first_change(x["d"], changes, options.tau, theta, options.soft_reset)
                firsts.append(first)
                fired.append(spiked)
                high.append(alpha == levels[2])
            row = {"theta": theta, "risk_thresholds": thresholds, "alpha_levels": levels, "set": name,
                   "identical": float(np.mean([f is None for f in firsts])),
                   "mean_first_diff": float(np.mean([args.max_new_tokens if f is None else f for f in firsts])),
                   "with_spike": float(np.mean(fired)), "alpha_high": float(np.mean(high))}
            report["rows"].append(row)
            print(f"{theta:>5.2f} {'%g,%g' % thresholds:>8} {'%g,%g,%g' % levels:>13} {name:<9} "
                  f"{row['identical']:>9.1%} {row['mean_first_diff']:>8.1f} {row['with_spike']:>8.1%} "
                  f"{row['alpha_high']:>9.1%}", flush=True)
    if args.out:
        report["prompts"] = {name: [{"prompt": p, "risk": x["risk"], "d": np.round(x["d"], 4).tolist()}
                                    for p, x in zip(sets[name], q)] for name, q in quantities.items()}
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
