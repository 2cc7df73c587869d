"""How lightly NGSD touches benign answers, and how well each risk source separates the labels.

    python bench/light_touch.py [--expert PATH] [--alpha 0.1 0.5 0.9] [--reflect expert json]
                                [--auc json logit expert] [--max-new-tokens 64] [--limit N] [--out FILE.json]

Prompts: the held-out split of the project's own data (`ngsd_jax.paths.DATA_DIR`, train/data/
in a checkout; bench/common.py's `heldout`): `harmful`,
`benign` (near-misses and short questions) and `ordinary` (everyday instructions);
`harmful` holds both the plain harmful requests and those in everyday task formats. JailbreakBench is not read here.

Greedy decoding, keyword judge (`ngsd_jax.evaluation.judges.refusal_keywords`, as `python -m ngsd_jax.eval` uses). Per condition and set:
refused, identical to the base's answer token for token, mean first differing token
(identical answers count as the full length), share of prompts with at least one spike,
mean spikes. Conditions: the base alone, the expert alone, NGSD at each fixed alpha and
with alpha from each self-reflection mode (`expert` is the decode default of the default
pair). Also: the per-token TV distance between base and expert along the base's own answer
(mode `always` at alpha 0 leaves the base's choice and records D), and the ROC AUC of each
risk source, harmful vs benign and harmful vs ordinary (`ngsd_jax.evaluation.metrics.roc_auc`).

The pair is loaded and decoded as `python -m ngsd_jax.decode` does (bench/common.py's
`load_default_pair`: decode's flags through `ngsd_jax.cli`, then `load_pair` and
`decode_batch`): decode's preset, distribution size, stop tokens and reflection settings, with
this script's --threshold, --alpha-levels, --risk-thresholds, --max-new-tokens and
--batch-size given to it as decode's flags of those names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (SETS, add_pair_arguments, default_expert_path, harmful_auc, heldout_rows,  # noqa: E402
                    load_default_pair, model_flags)

from ngsd_jax.evaluation.judges import refusal_keywords  # noqa: E402


def tv_stats(d) -> dict:
    """The per-token divergence D (TV by default) between base and expert, as a distribution."""
    if d.size == 0:
        return {}
    return {"tokens": int(d.size), "mean": float(d.mean()), "median": float(np.median(d)),
            "p90": float(np.quantile(d, 0.9)), "p99": float(np.quantile(d, 0.99)),
            "above_0.125": float((d > 0.125).mean()), "above_0.5": float((d > 0.5).mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(parser)
    parser.add_argument("--alpha", type=float, nargs="*", default=[], help="fixed NGSD alphas (the trade-off)")
    parser.add_argument("--reflect", nargs="*", default=["expert"], choices=["json", "logit", "expert"],
                        help="NGSD with alpha from these self-reflection modes (default: expert)")
    parser.add_argument("--alpha-levels", type=float, nargs=3, help="default: decode's (the preset's)")
    parser.add_argument("--risk-thresholds", type=float, nargs=2, help="default: decode's (the preset's)")
    parser.add_argument("--threshold", type=float, help="the neuron's threshold theta (default: decode's; paper 1.0)")
    parser.add_argument("--auc", nargs="*", default=[], choices=["json", "logit", "expert"],
                        help="risk sources whose ROC AUC to measure")
    parser.add_argument("--expert-alone", action="store_true", help="also decode with the expert alone")
    parser.add_argument("--no-decode", action="store_true", help="only the ROC AUC and TV figures")
    parser.add_argument("--base-cache", help="JSON file of the base's answers: read when it exists (the base "
                        "alone does not depend on the expert), else written")
    parser.add_argument("--tv", action="store_true", help="TV distance along the base's own answers")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="only N evenly spaced prompts of each set")
    parser.add_argument("--out", help="write every figure (and every answer) to this JSON file")
    args = parser.parse_args()

    from ngsd_jax.checkpoints.default_model import default_base_path
    from ngsd_jax.decoding.pair import alpha_mapping, decode_batch, decode_settings, reflect_prompts
    from ngsd_jax.decoding.risk import alpha_from_risk

    rows = {name: heldout_rows(name, args.limit) for name in args.sets}
    sets = {name: [r["prompt"] for r in rows[name]] for name in args.sets if rows[name]}
    categories = {name: [r["category"] for r in rows[name]] for name in sets}
    # decode's own options for these flags; each condition then sets its mode and alpha source.
    # Only the settings given here override decode's own (the default pair's preset, or the paper's).
    given = {"--threshold": args.threshold, "--alpha-levels": args.alpha_levels,
             "--risk-thresholds": args.risk_thresholds}
    flags = [*model_flags(args.base, args.expert),
             *[x for flag, value in given.items() if value is not None
               for x in (flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))],
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    modes = ["base", "ngsd"] + ["expert"] * args.expert_alone + ["always"] * args.tv
    pair, options = load_default_pair(flags, modes, [p for prompts in sets.values() for p in prompts])
    tok = pair.base_tokenizer
    base_path = args.base or str(default_base_path())
    expert_path = args.expert or default_expert_path()
    mapping = alpha_mapping(options)
    report = {"base": base_path, "expert": str(expert_path), "max_new_tokens": args.max_new_tokens,
              "threshold": options.threshold,
              "mapping": {"levels": mapping.levels, "thresholds": mapping.thresholds},
              "sizes": {k: len(v) for k, v in sets.items()}, "conditions": {}, "auc": {}, "tv": {}}
    print(f"sets: {report['sizes']}; base {base_path}; expert {expert_path}", flush=True)

    def batches(prompts):
        return [prompts[i: i + options.batch_size] for i in range(0, len(prompts), options.batch_size)]

    def run(prompts, mode, alpha=0.0, reflect_mode=None):
        """decode's answers in `mode`, alpha fixed or from `reflect_mode` (`expert`: inside the program)."""
        condition = dataclasses.replace(options, mode=mode, alpha=alpha, reflect=reflect_mode or "off")
        settings = decode_settings(condition, mode)
        out = []
        for chunk in batches(prompts):
            result, _ = decode_batch(pair, condition, settings, chunk)
            for row in range(len(chunk)):
                n = int(result.lengths[row])
                risk = None if result.risk is None else float(result.risk[row])
                out.append({"tokens": result.sequence(row), "spikes": int(result.spike[row, :n].sum()),
                            "alpha": float(result.alpha[row]), "risk": risk,
                            "d": result.divergence[row, :n].tolist()})
        return out

    base_answers = {}
    cache_path = Path(args.base_cache) if args.base_cache else None
    cached_base = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    cached_base = {k: v for k, v in cached_base.items() if all(p in v for p in sets.get(k, [None]))}
    conditions = [("base", "base", 0.0, None)]
    conditions += [("expert alone", "expert", 0.0, None)] if args.expert_alone else []
    conditions += [(f"ngsd reflect={m}", "ngsd", 0.0, m) for m in args.reflect]
    conditions += [(f"ngsd alpha={a}", "ngsd", a, None) for a in args.alpha]
    print(f"{'condition':<22} {'set':<9} {'refused':>8} {'identical':>9} {'1st diff':>8} {'w/ spike':>8} "
          f"{'spikes':>7} {'alpha':>6} {'s':>5}")
    for name, mode, alpha, reflect_mode in [] if args.no_decode else conditions:
        report["conditions"][name] = {}
        for set_name, prompts in sets.items():
            start = time.perf_counter()
            if name == "base" and set_name in cached_base:
                answers = [cached_base[set_name][p] for p in prompts]
            else:
                answers = run(prompts, mode, alpha, reflect_mode)
            seconds = time.perf_counter() - start
            if name == "base":
                base_answers[set_name] = answers
                if cache_path and set_name not in cached_base:
                    cached_base[set_name] = dict(zip(prompts, answers))
                    cache_path.write_text(json.dumps(cached_base))
            texts = [tok.decode(a["tokens"], skip_special_tokens=True) for a in answers]
            first_diff = []
            for a, b in zip(answers, base_answers[set_name]):
                x, y = a["tokens"], b["tokens"]
                same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                first_diff.append(args.max_new_tokens if x == y else same)
            refused = [refusal_keywords(p, t) for p, t in zip(prompts, texts)]
            by_category = {}
            for category, r in zip(categories[set_name], refused):
                by_category.setdefault(category, []).append(r)
            stats = {
                "refused": float(np.mean(refused)),
                "refused_by_category": {c: float(np.mean(v)) for c, v in sorted(by_category.items())},
                "identical": float(np.mean([a["tokens"] == b["tokens"] for a, b in zip(answers,
                                                                                     base_answers[set_name])])),
                "mean_first_diff": float(np.mean(first_diff)),
                "with_spike": float(np.mean([a["spikes"] > 0 for a in answers])),
                "spikes": float(np.mean([a["spikes"] for a in answers])),
                "mean_alpha": float(np.mean([a["alpha"] for a in answers])),
                "seconds": round(seconds, 1),
                "tv_along_answers": tv_stats(np.concatenate([np.asarray(a["d"], float) for a in answers])),
                "answers": [{"prompt": p, "response": t, "spikes": a["spikes"], "alpha": a["alpha"],
                             "risk": a["risk"]} for p, t, a in zip(prompts, texts, answers)],
            }
            report["conditions"][name][set_name] = stats
            print(f"{name:<22} {set_name:<9} {stats['refused']:>8.1%} {stats['identical']:>9.1%} "
                  f"{stats['mean_first_diff']:>8.1f} {stats['with_spike']:>8.1%} {stats['spikes']:>7.2f} "
                  f"{stats['mean_alpha']:>6.2f} {seconds:>5.0f}", flush=True)

    for set_name in sets if report["conditions"] else []:
        names = list(report["conditions"])
        print(f"\nrefused by category, {set_name}:\n| category | prompts | " + " | ".join(names) + " |\n|---|---|"
              + "---|" * len(names))
        for category in sorted(set(categories[set_name])):
            shares = [report["conditions"][n][set_name]["refused_by_category"][category] for n in names]
            print(f"| {category} | {categories[set_name].count(category)} | "
                  + " | ".join(f"{x:.0%}" for x in shares) + " |")

    if args.tv:
        print("TV distance between base and expert along the base's own answers (mode always, alpha 0):")
        for set_name, prompts in sets.items():
            stats = tv_stats(np.concatenate([np.asarray(a["d"], float) for a in run(prompts, "always", 0.0)]))
            report["tv"][set_name] = stats
            print(f"  {set_name:<9} " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in stats.items()), flush=True)

    for source in args.auc:
        rating = dataclasses.replace(options, reflect=source, max_new_tokens=1)

        def rate(chunk):
            # expert: read inside the decode program, as decode does; json and logit: a reflection call.
            if source == "expert":
                return decode_batch(pair, rating, decode_settings(rating, "ngsd"), chunk)[1]
            return reflect_prompts(pair, rating, "ngsd", chunk)

        risks = {set_name: [r.risk for chunk in batches(prompts) for r in rate(chunk)]
                 for set_name, prompts in sets.items()}
        aucs = {f"harmful vs {other}": harmful_auc(risks["harmful"], risks[other])
                for other in risks if other != "harmful" and "harmful" in risks}
        alpha_share = {k: {str(level): float(np.mean([alpha_from_risk(r, mapping) == level for r in v]))
                           for level in mapping.levels} for k, v in risks.items()}
        report["auc"][source] = {**aucs, "alpha_share": alpha_share, "risk": risks}
        print(f"ROC AUC {source}: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()) +
              "; alpha share by set " + json.dumps(alpha_share), flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
