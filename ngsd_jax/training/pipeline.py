"""A training run from start to finish: recipe -> models on their mesh -> examples (the base's
own answers generated once into the run directory) -> the trained expert -> its files."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp

from ngsd_jax.checkpoints.default_model import default_base_path
from ngsd_jax.checkpoints.resolve import resolve_checkpoint
from ngsd_jax.checkpoints.tokenizer import compare_vocabularies, load_tokenizer, stop_token_ids
from ngsd_jax.checkpoints.weights import load_model
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.errors import UsageError
from ngsd_jax.files import directory_problem
from ngsd_jax.parallel import distributed
from ngsd_jax.parallel.memory import DeviceOptions
from ngsd_jax.paths import checkpoints_dir
from ngsd_jax.training.data import BaseAnswers, prepare_examples
from ngsd_jax.training.export import write_expert
from ngsd_jax.training.loop import train
from ngsd_jax.training.recipe import Recipe
from ngsd_jax.training.sharding import choose_training_mesh
from ngsd_jax.training.state import check_run_dir


@dataclasses.dataclass
class TrainOptions:
    """A training run: the recipe, where its results go (None: under the checkpoints directory,
    named after the recipe), and how it starts."""

    recipe: Recipe
    output: Path | None = None
    hf_output: Path | None = None
    hf_export: bool = True
    run_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    strict: bool = False  # a malformed data line is fatal instead of skipped
    devices: DeviceOptions = DeviceOptions()


def train_expert(opts: TrainOptions) -> int:
    """Runs the training `opts` describes; 0 when the expert is written, 130 when Ctrl-C stopped it
    (the state saved for `resume`)."""
    started = time.monotonic()
    recipe = opts.recipe
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    output = opts.output or checkpoints_dir() / recipe.name
    hf_output = None if not opts.hf_export else (opts.hf_output or checkpoints_dir() / f"{recipe.name}-hf")
    run_dir = (opts.run_dir or checkpoints_dir() / "runs" / recipe.name).absolute()
    for directory, flag in ((run_dir, "--run-dir"), (output, "--output"), (hf_output, "--hf-output")):
        problem = directory and directory_problem(directory, flag)
        if problem:
            raise UsageError(problem)

    distributed.initialize(opts.devices.multi_host)  # before any other jax call
    distributed.enable_compilation_cache(opts.devices.compilation_cache)
    # Orbax writes each process's shards of the training state and of the expert into one directory.
    distributed.check_shared_directory(run_dir, "--run-dir")
    distributed.check_shared_directory(Path(output).absolute().parent, "--output")
    check_run_dir(run_dir, recipe, opts.resume, opts.overwrite)

    base_path = resolve_checkpoint(recipe.base) if recipe.base else default_base_path()
    init_path = resolve_checkpoint(recipe.expert_init) if recipe.expert_init else base_path
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[recipe.dtype]
    tokenizer = load_tokenizer(init_path)
    base_tokenizer = tokenizer if init_path == base_path else load_tokenizer(base_path)
    mismatch = compare_vocabularies(base_tokenizer, tokenizer)
    if mismatch:
        raise UsageError(mismatch)
    mesh = choose_training_mesh(opts.devices, recipe, init_path, dtype)
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
    examples = prepare_examples(recipe, tokenizer, answers_from, run_dir, opts.strict)
    model = load(init_path)
    loaded.clear()  # a base distinct from the expert is no longer needed
    data_done = time.monotonic()

    trained = train(recipe, model, examples, run_dir, pad_id=tokenizer.pad_token_id or 0, resume=opts.resume,
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
