"""Refusal rates of a pair on JailbreakBench's behaviours or on the project's held-out split,
through `python -m ngsd_jax.eval` with the settings of README's quality table.

    python bench/jbb_refusals.py PROMPTS.csv|heldout [any python -m ngsd_jax.eval option]

PROMPTS.csv has a `Goal` column and a `label` column (0 = harmful, 1 = benign), as
JailbreakBench's behaviours file does; `heldout` first writes the held-out split of the
project's own training data (`ngsd_jax.paths.DATA_DIR`: bench/common.py's sets, labelled
harmful, benign and ordinary; eval counts every label but harmful as benign) to
OUT/heldout.jsonl, `--per-set N` evenly spaced prompts of each set, and after eval prints
each set's figures from OUT/samples.jsonl (`ngsd_jax.evaluation.metrics.label_metrics`).
Then it runs eval through its public entry point, `ngsd_jax.eval.main`:
greedy, 64 new tokens, batch 64, the base alone and NGSD at alpha 0.9, 0.5 and alpha from
self-reflection (`--alpha-sweep 0.9,0.5,reflect`), the keyword judge; options given after
the data set override these (e.g. `--limit 20`, `--reflect logit`, `--out DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import SETS, heldout

from ngsd_jax import eval as eval_cli
from ngsd_jax.evaluation.metrics import label_metrics

SETTINGS = ["--modes", "base,ngsd", "--alpha-sweep", "0.9,0.5,reflect", "--max-new-tokens", "64",
            "--batch-size", "64"]


def write_heldout(path: Path, per_set: int = 0) -> dict[str, str]:
    """The held-out prompts of the shipped training data as JSONL with a `label` naming their set; returns
    prompt -> set. `per_set` > 0 keeps that many evenly spaced prompts of each set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sets = {}
    with path.open("w", encoding="utf-8") as f:
        for name in SETS:
            for prompt in heldout(name, per_set):
                f.write(json.dumps({"prompt": prompt, "label": name}) + "\n")
                sets[prompt] = name
    return sets


def print_per_set(samples: Path, sets: dict[str, str]) -> None:
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    print("| condition | set | prompts | refused | identical to the base | first differing token (mean of "
          "those that differ) | prompts with a spike |")
    print("|---|---|---|---|---|---|---|")
    for condition in dict.fromkeys(r["condition"] for r in rows):
        for name in SETS:
            mine = [r for r in rows if r["condition"] == condition and sets.get(r["prompt"]) == name]
            m = label_metrics(mine, name == "harmful")
            if not mine:
                continue
            cells = [m["refusal_rate"], m["identical_to_base"], m["first_diff_mean"], m["spike_rate"]]
            print(f"| {condition} | {name} | {m['n']} | " + " | ".join(
                "-" if v is None else f"{v:.1f}" if i == 2 else f"{v:.1%}" for i, v in enumerate(cells)) + " |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="labelled prompts (.csv), or `heldout`")
    parser.add_argument("--out", type=Path, help="output directory (default eval_out/jbb or eval_out/heldout)")
    parser.add_argument("--per-set", type=int, default=0, help="heldout: N evenly spaced prompts of each set")
    args, passed_on = parser.parse_known_args(argv)
    if args.source == "heldout":
        out = args.out or Path("eval_out/heldout")
        dataset = out / "heldout.jsonl"
        sets = write_heldout(dataset, args.per_set)
        labels = ["--label-field", "label", "--harmful-label", "harmful"]
    else:
        out = args.out or Path("eval_out/jbb")
        dataset = Path(args.source)
        labels = ["--label-field", "label", "--harmful-label", "0"]
    status = eval_cli.main(["--dataset", str(dataset), "--out", str(out), *labels, *SETTINGS, *passed_on])
    if args.source == "heldout" and status == 0:
        print_per_set(out / "samples.jsonl", sets)
    return status


if __name__ == "__main__":
    sys.exit(main())
