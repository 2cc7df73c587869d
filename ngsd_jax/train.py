"""`python -m ngsd_jax.train`: fine-tune a small safety expert for NGSD.

    python -m ngsd_jax.train                                # the default expert for SmolLM2-135M
    python -m ngsd_jax.train --recipe tinyllama-for-llama2  # a paper pair (recipes in train/recipes/)
    python -m ngsd_jax.train --data mine.jsonl --base DIR --name my-expert --set epochs=3
    python -m ngsd_jax.train --resume                       # continue a killed or interrupted run

With no arguments it builds `checkpoints/smollm2-135m-safety-expert` from the embedded
SmolLM2-135M-Instruct base: refusals for the harmful prompts of train/data/harmful.jsonl,
the base model's own greedy answers to the benign prompts of train/data/benign.jsonl
(self-distillation, generated once and cached in the run directory), and deep-alignment
recovery examples (the base's own first k tokens of an answer to a harmful prompt, then
a refusal). Only lines with split "train" are trained on. The loss covers response
tokens only.

The run directory (default checkpoints/runs/NAME) holds the generated data, the orbax
training state (adapters or weights, optimizer state, step; the last 2 kept), the
resolved recipe and metrics.jsonl. Ctrl-C saves the state before exiting; --resume picks
it up (also after a kill) and ends exactly where an uninterrupted run ends. The result is
a project checkpoint (checkpoints/NAME: config.json, tokenizer, params/) and a Hugging
Face export (checkpoints/NAME-hf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ngsd_jax import cli
from ngsd_jax.errors import print_error
from ngsd_jax.training.pipeline import TrainOptions, train_expert
from ngsd_jax.training.recipe import DEFAULT_RECIPE, METHODS, build_recipe, list_recipes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"recipe name (train/recipes/ in a checkout, shipped in the package) or a .json path (default {DEFAULT_RECIPE}); --list-recipes")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes with their descriptions")
    models = p.add_argument_group("models and data (override the recipe)")
    models.add_argument("--base", help="base model (checkpoint dir, HF dir or .gguf, a name under checkpoints/, or a Hugging Face Hub id ORG/NAME)")
    models.add_argument("--expert-init", help="the expert's starting weights (default: the base)")
    models.add_argument("--data", type=Path, action="append", default=[],
                        help="JSONL of {messages} or {prompt, response} records (repeatable); replaces the "
                             "default harmful/benign dataset")
    models.add_argument("--strict", action="store_true", help="a malformed data line is fatal instead of skipped")
    train = p.add_argument_group("training (override the recipe)")
    train.add_argument("--method", choices=METHODS)
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int, help="optimizer updates (cuts the epochs short)")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer update")
    train.add_argument("--seed", type=int)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any recipe field, VALUE as JSON (e.g. --set lora_targets='[\"q_proj\"]'); repeatable")
    out = p.add_argument_group("output")
    out.add_argument("--name", help="output checkpoint name (checkpoints/NAME)")
    out.add_argument("--output", type=Path, help="output checkpoint directory (default checkpoints/NAME)")
    out.add_argument("--hf-output", type=Path, help="Hugging Face export directory (default checkpoints/NAME-hf)")
    out.add_argument("--no-hf-export", action="store_true", help="skip the Hugging Face export")
    out.add_argument("--run-dir", type=Path, help="run directory (default checkpoints/runs/NAME)")
    out.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    out.add_argument("--overwrite", action="store_true",
                     help="discard the run directory's training state and start over (generated data is kept)")
    cli.add_device_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_recipes:
            for name, description in list_recipes():
                print(f"{name:32} {description}")
            return 0
        flags = {"name": args.name, "base": args.base, "expert_init": args.expert_init, "epochs": args.epochs,
                 "max_steps": args.max_steps, "learning_rate": args.lr, "batch_size": args.batch_size,
                 "grad_accum": args.grad_accum, "method": args.method, "seed": args.seed}
        recipe = build_recipe(args.recipe, flags, args.data, args.set)
        return train_expert(TrainOptions(recipe, output=args.output, hf_output=args.hf_output,
                                         hf_export=not args.no_hf_export, run_dir=args.run_dir, resume=args.resume,
                                         overwrite=args.overwrite, strict=args.strict,
                                         devices=cli.device_options(args)))
    except (ValueError, OSError) as err:  # UsageError, DataError, CheckpointError, TokenizerError, MeshError...
        return print_error(err)


if __name__ == "__main__":
    sys.exit(main())
