"""`python -m ngsd_jax.eval`: attack success, over-refusal and how much of each benign answer
stays the base's, for several modes side by side in one engine.

    python -m ngsd_jax.eval --dataset prompts.csv --label-field label --harmful-label harmful --out runs/eval
    python -m ngsd_jax.eval --dataset advbench.csv --prefill-field target --prefill-tokens 10 --modes base,ngsd
    python -m ngsd_jax.eval --dataset mixed.jsonl --label-field label --harmful-label 1 --alpha-sweep 0.1,0.5,0.9

Every decode option (models, presets, reflection, gate, sampling) applies to every mode.
Writes DIR/samples.jsonl (one line per prompt and condition, appended batch by batch),
DIR/results.json (every figure, recomputable from samples.jsonl), DIR/report.md and two
plots, DIR/tradeoff.png and DIR/trace.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ngsd_jax import cli
from ngsd_jax.decoding.prompts import PROMPT_FIELDS
from ngsd_jax.decoding.settings import MODES
from ngsd_jax.errors import print_error
from ngsd_jax.evaluation.runner import EvalOptions, evaluate

EVAL_FIELDS = ("dataset", "prompt_field", "label_field", "harmful_label", "prefill_field", "prefill_tokens",
               "answer_field", "limit", "modes", "alpha_sweep", "judge", "out", "resume", "trace_prompt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", type=Path, required=True, help=".csv, .jsonl, .json (a list) or .txt (one per line)")
    data.add_argument("--prompt-field", help=f"the prompt field (default: the first of {', '.join(PROMPT_FIELDS)}, any case)")
    data.add_argument("--label-field", help="the label field; without one every prompt counts as harmful")
    data.add_argument("--harmful-label", help="the label value of harmful prompts (default 'harmful'); others are benign")
    data.add_argument("--prefill-field", help="prefilling attack: force the start of this field's text as the response's start")
    data.add_argument("--prefill-tokens", type=int, help="how many tokens of the prefill field to force (default: all)")
    data.add_argument("--answer-field", help="the expected answer, for the exact-answer judge (last number in the output)")
    data.add_argument("--limit", type=int, help="only the first N prompts of each label")
    run = p.add_argument_group("evaluation")
    run.add_argument("--modes", default="base,ngsd,safedecoding",
                     help=f"comma-separated, run side by side ({', '.join(MODES)}; default base,ngsd,safedecoding); "
                          f"base also runs whenever there are benign prompts, to compare their answers with")
    run.add_argument("--alpha-sweep", help="comma-separated fixed alphas for ngsd and always, one condition each; "
                                           "'reflect' adds alpha as --reflect/--alpha set it (e.g. reflect,0.1,0.5,0.9)")
    run.add_argument("--judge", help="refusal judge: keywords (the default: the project's refusal keywords), reference "
                                     "(the authors' keyword judge, DictJudge) or module:function or "
                                     "file.py:function, called (prompt, response) -> True for a refusal; the ASR "
                                     "under both keyword judges is reported whatever the judge")
    run.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory (default eval_out)")
    run.add_argument("--resume", action="store_true", help="continue a run in --out, skipping the rows it holds")
    run.add_argument("--trace-prompt", type=int, help="dataset index of the answer drawn in trace.png "
                                                      "(default: the ngsd answer with the most spikes)")
    cli.add_decode_options(p, single_mode=False)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return evaluate(EvalOptions(decode=cli.decode_options(args), **{k: getattr(args, k) for k in EVAL_FIELDS}))
    except KeyboardInterrupt:
        print(f"interrupted; finished batches are in {args.out / 'samples.jsonl'}: rerun with --resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        return print_error(err)


if __name__ == "__main__":
    sys.exit(main())
