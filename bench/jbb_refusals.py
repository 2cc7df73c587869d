"""Refusal rates of a pair on JailbreakBench's behaviours or on the project's held-out split,
through `python -m ngsd_jax.eval` with the settings of README's quality table.

    python bench/jbb_refusals.py PROMPTS.csv|heldout [any python -m ngsd_jax.eval option]

PROMPTS.csv has a `Goal` column and a `label` column (0 = harmful, 1 = benign), as
JailbreakBench's behaviours file does; `heldout` first writes the held-out split of the
project's own training data (train/data/*.jsonl) to OUT/heldout.jsonl. Then it runs eval:
greedy, 64 new tokens, batch 64, the base alone and NGSD at alpha 0.9, 0.5 and alpha from
self-reflection (`--alpha-sweep 0.9,0.5,reflect`), the keyword judge; options given after
the data set override these (e.g. `--limit 20`, `--reflect logit`, `--out DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ngsd_jax import eval as evaluate

DATA = Path(__file__).resolve().parent.parent / "train" / "data"
SETTINGS = ["--modes", "base,ngsd", "--alpha-sweep", "0.9,0.5,reflect", "--max-new-tokens", "64",
            "--batch-size", "64"]


def write_heldout(path: Path) -> None:
    """The held-out prompts of train/data as JSONL with a `label` of harmful or benign."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for label in ("harmful", "benign"):
            for line in (DATA / f"{label}.jsonl").read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["split"] == "heldout":
                    f.write(json.dumps({"prompt": record["prompt"], "label": label}) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="labelled prompts (.csv), or `heldout`")
    parser.add_argument("--out", type=Path, help="output directory (default eval_out/jbb or eval_out/heldout)")
    args, passed_on = parser.parse_known_args(argv)
    if args.source == "heldout":
        out = args.out or Path("eval_out/heldout")
        dataset = out / "heldout.jsonl"
        write_heldout(dataset)
        labels = ["--label-field", "label", "--harmful-label", "harmful"]
    else:
        out = args.out or Path("eval_out/jbb")
        dataset = Path(args.source)
        labels = ["--label-field", "label", "--harmful-label", "0"]
    return evaluate.main(["--dataset", str(dataset), "--out", str(out), *labels, *SETTINGS, *passed_on])


if __name__ == "__main__":
    sys.exit(main())
