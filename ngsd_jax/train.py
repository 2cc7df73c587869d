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
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ngsd_jax.recipe import DEFAULT_RECIPE, METHODS, RECIPES_DIR, Recipe, UsageError, build_recipe
from ngsd_jax.train_data import BaseAnswers, prepare_examples
from ngsd_jax.train_state import (StopRequest, check_run_dir, checkpoint_manager, restore_state, save_state,
                                  truncate_metrics)
from ngsd_jax.train_step import (learning_rate_schedule, loss_metrics, make_optimizer, make_train_step,
                                 target_capacities)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"recipe name in train/recipes/ or a .json path (default {DEFAULT_RECIPE}); --list-recipes")
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
    from ngsd_jax import distributed

    distributed.add_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ngsd_jax.loading import CheckpointError
    from ngsd_jax.memory import MemoryPlanError
    from ngsd_jax.sharding import MeshError
    from ngsd_jax.tokenizer import TokenizerError
    from ngsd_jax.train_data import DataError

    try:
        if args.list_recipes:
            for path in sorted(RECIPES_DIR.glob("*.json")):
                print(f"{path.stem:32} {json.loads(path.read_text()).get('description', '')}")
            return 0
        return run(args)
    except (UsageError, DataError, CheckpointError, TokenizerError, MeshError, MemoryPlanError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def run(args) -> int:
    started = time.monotonic()
    recipe = build_recipe(args)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")

    from ngsd_jax.default_model import checkpoints_dir, default_base_path

    output = args.output or checkpoints_dir() / recipe.name
    hf_output = None if args.no_hf_export else (args.hf_output or checkpoints_dir() / f"{recipe.name}-hf")
    run_dir = (args.run_dir or checkpoints_dir() / "runs" / recipe.name).absolute()

    from ngsd_jax import distributed

    distributed.initialize(args.multi_host)  # before any other jax call
    # Orbax writes each process's shards of the training state and of the expert into one directory.
    distributed.check_shared_directory(run_dir, "--run-dir")
    distributed.check_shared_directory(Path(output).absolute().parent, "--output")
    check_run_dir(run_dir, recipe, args.resume, args.overwrite)
    import jax.numpy as jnp

    from ngsd_jax.engine import Engine
    from ngsd_jax.hub import resolve_checkpoint
    from ngsd_jax.loading import load_model
    from ngsd_jax.tokenizer import compare_vocabularies, load_tokenizer, stop_token_ids

    base_path = resolve_checkpoint(recipe.base) if recipe.base else default_base_path()
    init_path = resolve_checkpoint(recipe.expert_init) if recipe.expert_init else base_path
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[recipe.dtype]
    tokenizer = load_tokenizer(init_path)
    base_tokenizer = tokenizer if init_path == base_path else load_tokenizer(base_path)
    mismatch = compare_vocabularies(base_tokenizer, tokenizer)
    if mismatch:
        raise UsageError(mismatch)
    from ngsd_jax.train_sharding import choose_training_mesh

    mesh = choose_training_mesh(args, recipe, init_path, dtype)
    loaded: dict[Path, object] = {}

    def load(path: Path):
        if path not in loaded:
            loaded[path] = load_model(path, dtype, mesh)
        return loaded[path]

    def base_engine():
        base = load(base_path)
        stops = stop_token_ids(base_tokenizer, base.config, recipe.base_chat_template)
        return Engine(base, None, len(base_tokenizer), stops, pad_id=base_tokenizer.pad_token_id or 0, mesh=mesh)

    if recipe.distill_loss == "kl" and recipe.benign_data and init_path != base_path:
        raise UsageError("distill_loss 'kl' matches the starting model's distributions, so the expert must start "
                         "as the base (no expert_init); use --set distill_loss=tokens for a different expert")
    answers_from = BaseAnswers(str(Path(base_path).absolute()), base_tokenizer, base_engine)
    examples = prepare_examples(recipe, tokenizer, answers_from, run_dir, args.strict)
    model = load(init_path)
    loaded.clear()  # a base distinct from the expert is no longer needed
    data_done = time.monotonic()

    trained = train(recipe, model, examples, run_dir, pad_id=tokenizer.pad_token_id or 0, resume=args.resume,
                    mesh=mesh)
    if trained is None:
        return 130
    train_done = time.monotonic()
    provenance = {"recipe": dataclasses.asdict(recipe), "base": str(base_path), "expert_init": str(init_path),
                  "examples": len(examples), "run_dir": str(run_dir)}
    write_expert(trained, tokenizer, output, hf_output, provenance)
    distributed.say(f"ngsd-jax train: expert written to {output}" + (f" and {hf_output}" if hf_output else "") +
                    f" in {time.monotonic() - started:.0f} s (data {data_done - started:.0f} s, "
                    f"training {train_done - data_done:.0f} s, export {time.monotonic() - train_done:.0f} s)")
    return 0


def train(recipe: Recipe, model, examples, run_dir: Path, pad_id: int, resume: bool, mesh=None):
    """Trains `model` and returns it (LoRA adapters still apart: `write_expert` keeps them and merges);
    None when stopped by Ctrl-C after saving. Under a `mesh` (see ngsd_jax.train_sharding) weights,
    adapters and optimizer state are split over fsdp/tensor and each batch's rows over data/fsdp."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from ngsd_jax import train_data as td
    from ngsd_jax import sharding as sh
    from ngsd_jax import train_sharding as ts
    from ngsd_jax.distributed import is_primary
    from ngsd_jax.lora import apply_lora

    if recipe.method == "lora":
        layers = None
        if recipe.lora_top_layers is not None:
            count = len(model.layers)
            layers = range(max(0, count - recipe.lora_top_layers), count)
        apply_lora(model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets, layers, seed=recipe.seed)
        trainable_filter = nnx.LoRAParam
    else:
        trainable_filter = nnx.Param
    if mesh is not None:
        sh.shard_model(model, mesh)
    graph, trainable, frozen = nnx.split(model, trainable_filter, ...)
    # The starting point, kept as its own buffers (the trained state is donated) when some loss
    # matches the starting model's distributions.
    initial_state = jax.tree.map(jnp.copy, trainable) if any(ex.match_teacher for ex in examples) else None

    plan = td.plan_batches([ex.inputs_length for ex in examples], recipe.batch_size, recipe.bucket_widths,
                           recipe.epochs, recipe.seed)
    total = len(plan) - len(plan) % recipe.grad_accum  # a trailing partial accumulation would never apply
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps * recipe.grad_accum)
    plan = plan[:total]
    updates = total // recipe.grad_accum
    schedule = learning_rate_schedule(recipe, updates)
    optimizer = make_optimizer(recipe, schedule)
    opt_state = optimizer.init(trainable)
    if mesh is not None:
        opt_state = ts.place_optimizer_state(optimizer, opt_state, trainable, mesh)
    meta = {"seed": recipe.seed, "plan": td.plan_fingerprint(plan), "total_steps": total}

    manager = checkpoint_manager(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if resume:
        trainable, opt_state, saved = restore_state(manager, trainable, opt_state)
        if saved.get("plan") != meta["plan"]:
            raise UsageError(f"{run_dir}: the training data or batch order changed since the checkpoint; "
                             f"restore the data files or start over with --overwrite")
        start = int(saved["step"])
        truncate_metrics(metrics_path, start)
        td.warn(f"resuming at step {start} of {total}")
    trainable_count = sum(x.size for x in jax.tree.leaves(trainable))
    td.warn(f"{len(examples)} examples, {total} steps of {recipe.batch_size} (x{recipe.grad_accum} accumulation) "
            f"over {recipe.epochs} epoch(s), {recipe.method} with {trainable_count:,} trainable parameters")

    step_fn = make_train_step(graph, optimizer, None if mesh is None else ts.state_shardings(trainable, opt_state))
    capacities = target_capacities(examples, plan, recipe.batch_size)
    bar = tqdm(total=total, initial=start, unit="step", desc="training", dynamic_ncols=True, disable=not is_primary())
    rate = None
    # Every process runs the loop; process 0 alone keeps the log (the others write to nowhere).
    log_path = metrics_path if is_primary() else os.devnull
    with StopRequest() as stop, open(log_path, "a", encoding="utf-8") as log:
        step = start
        while step < total:
            batch = plan[step]
            arrays = td.collate(examples, batch, recipe.batch_size, pad_id, recipe.decision_tokens,
                                recipe.decision_weight)
            if mesh is not None:
                arrays = ts.place_batch(arrays, mesh)
            tick = time.perf_counter()
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, initial_state, arrays,
                                                    capacity=capacities[batch.width])
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics = {**loss_metrics(metrics), "weighted_loss": metrics["weighted_loss"],
                       "grad_norm": metrics["grad_norm"]}
            seconds = time.perf_counter() - tick
            step += 1
            tokens = int(sum(examples[i].inputs_length for i in batch.indices))
            rate = tokens / seconds if rate is None else 0.8 * rate + 0.2 * tokens / seconds
            record = {"step": step, "epoch": batch.epoch, "width": batch.width, **metrics,
                      "lr": float(schedule((step - 1) // recipe.grad_accum)), "tokens": tokens,
                      "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if step % recipe.checkpoint_every == 0 or step == total or stop.requested:
                save_state(manager, step, trainable, opt_state, meta)
            if stop.requested and step < total:
                bar.close()
                td.warn(f"stopped at step {step} of {total}; the state is saved in {run_dir} — "
                        f"continue with the same command plus --resume")
                return None
    bar.close()
    manager.close()
    return nnx.merge(graph, trainable, frozen)


def write_expert(model, tokenizer, output: Path, hf_output: Path | None, provenance: dict) -> None:
    """The project checkpoint (config.json, tokenizer, params/ with any LoRA merged in,
    ngsd_train.json, and for a LoRA expert its adapter in adapter/), staged next to `output`
    and moved in whole, then the Hugging Face export. Every process takes part (the weights
    are gathered or saved collectively); process 0 alone writes the files and moves them."""
    from flax import nnx

    from ngsd_jax.distributed import barrier, is_primary
    from ngsd_jax.loading import export_hf, save_params
    from ngsd_jax.lora import ADAPTER_SUBDIR, LoRALinear, extract_adapter, merge_lora, save_adapter

    # The adapter, with the identity of the weights it adapts, is read before merging changes them.
    has_lora = any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(model))
    adapter = extract_adapter(model) if has_lora else None
    model = merge_lora(model)
    output = output.absolute()
    primary = is_primary()
    # One name for every process: orbax saves each one's shards of params/ into the same directory.
    staging = output.with_name(f".{output.name}.partial")
    if primary:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier("expert staging created")
    try:
        if primary:
            (staging / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
            tokenizer.save_pretrained(str(staging))
            (staging / "ngsd_train.json").write_text(json.dumps(provenance, indent=2) + "\n")
            if adapter is not None:
                save_adapter(adapter, staging / ADAPTER_SUBDIR)
        save_params(model, staging)
        if primary and output.exists():
            aside = output.with_name(f".{output.name}.replaced-{int(time.time())}")
            os.replace(output, aside)
            os.replace(staging, output)
            shutil.rmtree(aside, ignore_errors=True)
        elif primary:
            os.replace(staging, output)
    finally:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
    barrier("expert written")
    if hf_output is not None:
        export_hf(model, hf_output, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
