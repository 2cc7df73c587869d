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
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "train" / "recipes"
DEFAULT_RECIPE = "smollm2-135m"
METHODS = ("lora", "full")
DECAYS = ("linear", "cosine", "constant")
DISTILL_LOSSES = ("kl", "tokens")
DTYPES = ("float32", "bfloat16")
# Recipe fields that change nothing about the trained weights; a resumed run may alter them.
RESUMABLE_CHANGES = {"description", "checkpoint_every"}


class UsageError(ValueError):
    """Bad input the user can fix; printed as one line."""


@dataclasses.dataclass
class Recipe:
    """Everything that defines a training run. Recipe files in train/recipes/ set these fields."""

    description: str = ""
    name: str = "smollm2-135m-safety-expert"  # output checkpoint name under checkpoints/
    base: str | None = None  # the model the expert serves, and whose answers are distilled; None = embedded default
    expert_init: str | None = None  # the expert's starting weights; None = the base itself
    # Default dataset (built from these when set) and extra/explicit record files.
    harmful_data: str | list[str] | None = "train/data/harmful.jsonl"
    benign_data: str | list[str] | None = "train/data/benign.jsonl"
    # Everyday instructions, self-distilled like the benign prompts; `ordinary_prompts` of their
    # train split are drawn at random (None = all).
    ordinary_data: str | None = None
    ordinary_prompts: int | None = None
    data: list[str] = dataclasses.field(default_factory=list)
    distill_prompts: int | None = None  # benign train prompts answered by the base (None = all)
    distill_max_new_tokens: int = 64
    generation_batch: int = 64
    recovery_prompts: int | None = 64  # harmful train prompts whose base answer seeds recovery examples (None = all)
    recovery_prefix_tokens: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20, 40])
    recovery_prefixes_per_prompt: int | None = None  # prefix lengths per recovery prompt, in turn (None = all)
    recovery_separator: str = ""  # text between the base's prefix and the refusal ("" = the paper's: none)
    harmful_weight: float = 1.0
    benign_weight: float = 1.0
    recovery_weight: float = 1.0
    decision_tokens: int = 0  # the first N targets of every response weigh decision_weight times more
    decision_weight: float = 1.0
    # "kl": on benign answers learn the base's whole next-token distribution (needs expert_init =
    # base), which keeps the neuron quiet there; "tokens": cross-entropy on the base's greedy tokens.
    distill_loss: str = "kl"
    system_prompt: str | None = None  # the expert's system prompt at decode time (None = template default)
    chat_template: str | None = None  # the expert's chat template (None = its tokenizer's)
    base_system_prompt: str | None = None  # how the base is prompted for its answers (as at decode time)
    base_chat_template: str | None = None
    # Model and optimisation.
    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 64.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_top_layers: int | None = None  # adapt only the top N layers (None = all): backprop stops below them
    dtype: str = "float32"
    learning_rate: float = 2e-3
    epochs: int = 2
    max_steps: int | None = None  # optimizer updates; cuts the epochs short when set
    batch_size: int = 8
    grad_accum: int = 1
    warmup_fraction: float = 0.03
    decay: str = "linear"
    weight_decay: float = 0.0
    clip_grad_norm: float = 0.3
    bucket_widths: list[int] = dataclasses.field(default_factory=lambda: [128, 192])
    seed: int = 0
    checkpoint_every: int = 50  # micro-batches between training-state checkpoints

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.decay in DECAYS, f"decay must be one of {', '.join(DECAYS)}"),
            (self.distill_loss in DISTILL_LOSSES, f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "lora_rank must be >= 1 and lora_alpha > 0"),
            (self.learning_rate > 0 and self.epochs >= 1, "learning_rate must be > 0 and epochs >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.clip_grad_norm >= 0 and self.weight_decay >= 0, "clip_grad_norm and weight_decay must be >= 0"),
            (bool(self.bucket_widths) and all(w >= 2 for w in self.bucket_widths), "bucket_widths must be >= 2"),
            (self.checkpoint_every >= 1 and self.generation_batch >= 1, "checkpoint_every, generation_batch >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (all(k >= 1 for k in self.recovery_prefix_tokens), "recovery_prefix_tokens must be >= 1"),
            (self.decision_tokens >= 0 and self.decision_weight > 0, "decision_tokens must be >= 0 and "
             "decision_weight > 0"),
            (self.recovery_prefixes_per_prompt is None or self.recovery_prefixes_per_prompt >= 1,
             "recovery_prefixes_per_prompt must be >= 1"),
            (self.ordinary_prompts is None or self.ordinary_prompts >= 0, "ordinary_prompts must be >= 0"),
            (bool(self.data) or bool(self.harmful_data) or bool(self.benign_data) or bool(self.ordinary_data),
             "no training data: set harmful_data/benign_data or give --data FILE"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"recipe: {message}")


def recipe_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Recipe)}


def load_recipe(name_or_path: str) -> dict:
    """A recipe's fields from train/recipes/NAME.json or a .json path."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise UsageError(f"unknown recipe '{name_or_path}'; known: {known} (or a path to a .json file)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    unknown = sorted(set(values) - set(recipe_fields()))
    if unknown:
        raise UsageError(f"{path}: unknown recipe field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(recipe_fields())}")
    return values


def parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, null, lists), else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in recipe_fields():
        raise UsageError(f"--set {text!r}: expected KEY=VALUE with KEY one of {', '.join(recipe_fields())}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


# What each annotation in Recipe admits from JSON (an integer is a valid float).
_SCALAR_TYPES = {"str": (str,), "int": (int,), "float": (int, float)}


def _admits(annotation: str, value) -> bool:
    if isinstance(value, bool):
        return False
    if annotation.startswith("list["):
        item = _SCALAR_TYPES[annotation[5:-1]]
        return isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    return isinstance(value, _SCALAR_TYPES[annotation])


def check_field_types(recipe: Recipe) -> None:
    for field in dataclasses.fields(Recipe):
        value = getattr(recipe, field.name)
        kinds = [k.strip() for k in str(field.type).split("|")]
        if not (value is None and "None" in kinds) and not any(_admits(k, value) for k in kinds if k != "None"):
            raise UsageError(f"recipe field {field.name}: {value!r} is not {field.type}")


def build_recipe(args) -> Recipe:
    values = load_recipe(args.recipe)
    flags = {"name": args.name, "base": args.base, "expert_init": args.expert_init, "epochs": args.epochs,
             "max_steps": args.max_steps, "learning_rate": args.lr, "batch_size": args.batch_size,
             "grad_accum": args.grad_accum, "method": args.method, "seed": args.seed}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.data:
        values.update(data=[str(p) for p in args.data], harmful_data=None, benign_data=None, ordinary_data=None)
    values.update(dict(parse_override(item) for item in args.set))
    recipe = Recipe(**values)
    check_field_types(recipe)
    recipe.validate()
    return recipe


# ----------------------------------------------------------------------------- paths

def resolve_data_path(name: str) -> Path:
    """Relative data paths are tried from the current directory, then from the repository root."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class BaseAnswers:
    """The base model as the source of self-distilled answers, loaded only if some are missing."""

    name: str  # identifies the answers in the run directory's cache
    tokenizer: object  # the base's own, for its own chat format (the vocabulary is the expert's)
    make_engine: object  # () -> a base-mode Engine


def prepare_examples(recipe: Recipe, tokenizer, answers_from: BaseAnswers, run_dir: Path, strict: bool):
    """All training examples: the default dataset (built/cached in run_dir/data) plus recipe data files."""
    from ngsd_jax import train_data as td

    eot = td.end_of_turn_id(tokenizer, recipe.chat_template)
    sources: list[Path] = []
    if recipe.harmful_data or recipe.benign_data or recipe.ordinary_data:
        sources.append(build_default_dataset(recipe, tokenizer, answers_from, eot, run_dir, strict))
    sources += [resolve_data_path(p) for p in recipe.data]
    examples = []
    for path in sources:
        for origin, record in td.read_jsonl(path, td.parse_record, strict):
            try:
                examples.append(td.encode_record(record, tokenizer, eot, origin, recipe.chat_template,
                                                 recipe.system_prompt))
            except td.DataError as err:
                if strict:
                    raise
                td.warn(f"{err}; line skipped")
    if not examples:
        raise UsageError("no usable training examples in " + ", ".join(map(str, sources)))
    return td.fit_to_width(examples, max(recipe.bucket_widths))


def build_default_dataset(recipe: Recipe, tokenizer, answers_from: BaseAnswers, eot: int, run_dir: Path,
                          strict: bool) -> Path:
    """run_dir/data/train.jsonl from the harmful and benign prompt files (train split only)."""
    import numpy as np

    from ngsd_jax import train_data as td

    def train_split(paths, parse):
        paths = [paths] if isinstance(paths, str) else (paths or [])
        return [row for path in paths for _, row in td.read_jsonl(resolve_data_path(path), parse, strict)
                if row["split"] == "train"]

    harmful = train_split(recipe.harmful_data, td.parse_harmful)
    benign = train_split(recipe.benign_data, td.parse_benign)
    rng = np.random.default_rng(recipe.seed)
    if recipe.distill_prompts is not None and recipe.distill_prompts < len(benign):
        benign = [benign[i] for i in sorted(rng.choice(len(benign), recipe.distill_prompts, replace=False))]
    recovery_count = len(harmful) if recipe.recovery_prompts is None else min(recipe.recovery_prompts, len(harmful))
    recovery_count = recovery_count if recipe.recovery_prefix_tokens else 0
    recovery = [harmful[i]["id"] for i in sorted(rng.choice(len(harmful), recovery_count, replace=False))]
    ordinary = train_split(recipe.ordinary_data, td.parse_benign)
    if recipe.ordinary_prompts is not None and recipe.ordinary_prompts < len(ordinary):
        ordinary = [ordinary[i] for i in sorted(rng.choice(len(ordinary), recipe.ordinary_prompts, replace=False))]
    benign = benign + ordinary
    by_id = {r["id"]: r for r in harmful}
    requests = [(r["id"], r["prompt"]) for r in benign] + [(rid, by_id[rid]["prompt"]) for rid in recovery]
    data_dir = run_dir / "data"
    answers = {}
    if requests:
        answers = td.generate_answers(answers_from.make_engine, answers_from.tokenizer, requests,
                                      recipe.distill_max_new_tokens, recipe.generation_batch,
                                      data_dir / "base_answers.jsonl", answers_from.name,
                                      recipe.base_chat_template, recipe.base_system_prompt)
    records = td.build_default_records(
        harmful, benign, answers, recovery_ids=recovery, recovery_prefix_tokens=recipe.recovery_prefix_tokens,
        prefixes_per_prompt=recipe.recovery_prefixes_per_prompt, eot_id=eot, tokenizer=tokenizer,
        harmful_weight=recipe.harmful_weight, benign_weight=recipe.benign_weight,
        recovery_weight=recipe.recovery_weight, match_teacher=recipe.distill_loss == "kl",
        recovery_separator=recipe.recovery_separator)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    td.warn("default dataset: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    path = data_dir / "train.jsonl"
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


# ----------------------------------------------------------------------------- optimisation

def learning_rate_schedule(recipe: Recipe, total_updates: int):
    """Linear warmup from lr/warmup to lr, then linear/cosine decay towards 0 (or constant)."""
    import jax.numpy as jnp

    peak = recipe.learning_rate
    warmup = math.ceil(recipe.warmup_fraction * total_updates)
    span = max(1, total_updates - warmup)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((count - warmup) / span, 0.0, 1.0)
        decayed = {"linear": peak * (1.0 - progress),
                   "cosine": peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
                   "constant": peak + 0.0 * progress}[recipe.decay]
        return jnp.where(count < warmup, peak * (count + 1) / max(warmup, 1), decayed)

    return schedule


def make_optimizer(recipe: Recipe, schedule):
    import optax

    chain = []
    if recipe.clip_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(recipe.clip_grad_norm))
    chain.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=recipe.weight_decay))
    optimizer = optax.chain(*chain)
    return optax.MultiSteps(optimizer, every_k_schedule=recipe.grad_accum) if recipe.grad_accum > 1 else optimizer


def response_loss(model, hidden, batch, capacity: int, teacher=None, teacher_hidden=None):
    """(weighted mean token loss, sums) over the loss positions, projecting only those onto the
    vocabulary.

    The vocabulary projection is the costliest matmul of a small model, and about half the
    positions of a batch are prompt or padding. The first `capacity` positions in an order that
    puts the targets first are gathered and projected; `capacity` (static, one per bucket width)
    is at least the number of targets of every batch of that width, so no target is dropped.
    The token loss is cross-entropy on the target token, or where `soft` is set (with a
    teacher), KL(teacher || model) between the next-token distributions. `sums` holds the
    unweighted totals and counts of both kinds, for the log.
    """
    import jax
    import jax.numpy as jnp
    import optax

    order = jnp.argsort(-batch["mask"].reshape(-1), stable=True)[:capacity]
    picked = {k: batch[k].reshape(-1)[order] for k in ("targets", "weights", "mask", "soft")}
    logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[order])
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, picked["targets"])
    soft = picked["soft"] > 0
    if teacher is not None:
        teacher_logp = jax.nn.log_softmax(teacher.logits(teacher_hidden.reshape(-1, hidden.shape[-1])[order]))
        teacher_logp = jax.lax.stop_gradient(teacher_logp)
        kl = (jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(logits))).sum(-1)
        token_loss = jnp.where(soft, kl, token_loss)
    hard = picked["mask"] * ~soft
    sums = {"ce_sum": (token_loss * hard).sum(), "ce_count": hard.sum(),
            "kl_sum": (token_loss * picked["mask"] * soft).sum(), "kl_count": (picked["mask"] * soft).sum()}
    return (token_loss * picked["weights"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0), sums


def loss_metrics(sums: dict) -> dict:
    """Mean cross-entropy on token targets and mean KL on matched distributions (None where a batch
    has none), and their mean over all targets."""
    count = sums["ce_count"] + sums["kl_count"]
    return {"loss": (sums["ce_sum"] + sums["kl_sum"]) / max(count, 1.0),
            "ce": sums["ce_sum"] / sums["ce_count"] if sums["ce_count"] else None,
            "kl": sums["kl_sum"] / sums["kl_count"] if sums["kl_count"] else None}


def target_capacities(examples, plan, batch_size: int, multiple: int = 64) -> dict[int, int]:
    """Per bucket width, the most loss targets any batch of that width has, rounded up to `multiple`."""
    most: dict[int, int] = {}
    for batch in plan:
        targets = sum(int(examples[i].loss_mask[1:].sum()) for i in batch.indices)
        most[batch.width] = max(most.get(batch.width, 0), targets)
    return {w: min(batch_size * w, -(-n // multiple) * multiple) for w, n in most.items()}


def make_train_step(graph, optimizer, state_shardings=None):
    """One jitted micro-step: loss on the masked targets, gradients for the trainable state only
    (so nothing below the lowest trainable layer is back-propagated), optimizer update.

    `initial_state` is the trainable state the run started from (None when no example matches
    the starting model): with it the same graph is the starting model, the teacher of `soft`
    targets. With LoRA only in the top layers, XLA shares the identical lower layers of the
    two forward passes. `state_shardings` ((trainable, optimizer state) shardings, under a mesh)
    keeps the updated state where it came from, so each step's output feeds the next unmoved.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(trainable, frozen, initial_state, batch, capacity):
        model = nnx.merge(graph, trainable, frozen)
        positions = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32), batch["inputs"].shape)
        hidden, _ = model(batch["inputs"], positions)
        if initial_state is None:
            return response_loss(model, hidden, batch, capacity)
        teacher = nnx.merge(graph, initial_state, frozen)
        teacher_hidden, _ = teacher(batch["inputs"], positions)
        return response_loss(model, hidden, batch, capacity, teacher, jax.lax.stop_gradient(teacher_hidden))

    def step(trainable, opt_state, frozen, initial_state, batch, capacity):
        (weighted, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, initial_state,
                                                                            batch, capacity)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {**sums, "weighted_loss": weighted, "grad_norm": optax.tree.norm(grads)}

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), static_argnames=("capacity",), out_shardings=out_shardings)


# ----------------------------------------------------------------------------- training state

class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step; a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nngsd-jax train: stopping after this step and saving the training state "
              "(Ctrl-C again to abandon it)", file=sys.stderr, flush=True)


def checkpoint_manager(run_dir: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager((run_dir / "state").absolute(), options=options)


def save_state(manager, step: int, trainable, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(
        train=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
        meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
    manager.wait_until_finished()


def restore_state(manager, trainable, opt_state):
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt_state": opt_state})
    restored = manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    return restored["train"]["trainable"], restored["train"]["opt_state"], restored["meta"]


# ----------------------------------------------------------------------------- the run

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
    check_run_dir(run_dir, recipe, args.resume, args.overwrite)

    from ngsd_jax import distributed

    distributed.initialize(args.multi_host)  # before any other jax call
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
    print(f"ngsd-jax train: expert written to {output}" + (f" and {hf_output}" if hf_output else "") +
          f" in {time.monotonic() - started:.0f} s (data {data_done - started:.0f} s, "
          f"training {train_done - data_done:.0f} s, export {time.monotonic() - train_done:.0f} s)",
          file=sys.stderr)
    return 0


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuses to mix runs: a run directory with state needs --resume (same recipe) or --overwrite."""
    state, saved_recipe = run_dir / "state", run_dir / "recipe.json"
    has_state = state.is_dir() and any(state.iterdir())
    if overwrite:
        shutil.rmtree(state, ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    elif has_state and not resume:
        raise UsageError(f"{run_dir} already holds a training run; pass --resume to continue it or "
                         f"--overwrite to start over")
    elif resume and not has_state:
        raise UsageError(f"{run_dir}: nothing to resume (no training state); run without --resume")
    current = dataclasses.asdict(recipe)
    if resume and saved_recipe.is_file():
        saved = json.loads(saved_recipe.read_text())
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            raise UsageError(f"--resume with different settings ({', '.join(changed)}) than {saved_recipe}; "
                             f"resume with the same ones or start a new --run-dir")
    _write_atomic(saved_recipe, json.dumps(current, indent=2) + "\n")


def train(recipe: Recipe, model, examples, run_dir: Path, pad_id: int, resume: bool, mesh=None):
    """Trains `model` and returns it (LoRA adapters still apart: `write_expert` keeps them and merges);
    None when stopped by Ctrl-C after saving. Under a `mesh` (see ngsd_jax.train_sharding) weights,
    adapters and optimizer state are split over fsdp/tensor and each batch's rows over data/fsdp."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from ngsd_jax import train_data as td
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
        ts.place_model(model, mesh)
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
        _truncate_metrics(metrics_path, start)
        td.warn(f"resuming at step {start} of {total}")
    trainable_count = sum(x.size for x in jax.tree.leaves(trainable))
    td.warn(f"{len(examples)} examples, {total} steps of {recipe.batch_size} (x{recipe.grad_accum} accumulation) "
            f"over {recipe.epochs} epoch(s), {recipe.method} with {trainable_count:,} trainable parameters")

    step_fn = make_train_step(graph, optimizer, None if mesh is None else ts.state_shardings(trainable, opt_state))
    capacities = target_capacities(examples, plan, recipe.batch_size)
    bar = tqdm(total=total, initial=start, unit="step", desc="training", dynamic_ncols=True, disable=not is_primary())
    rate = None
    with StopRequest() as stop, open(metrics_path, "a", encoding="utf-8") as log:
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops log lines past the restored step (written by the run that was killed)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines(keepends=True) if json.loads(ln)["step"] <= step]
        _write_atomic(path, "".join(lines))


def write_expert(model, tokenizer, output: Path, hf_output: Path | None, provenance: dict) -> None:
    """The project checkpoint (config.json, tokenizer, params/ with any LoRA merged in,
    ngsd_train.json, and for a LoRA expert its adapter in adapter/), staged next to `output`
    and moved in whole, then the Hugging Face export."""
    from flax import nnx

    from ngsd_jax.loading import export_hf, save_params
    from ngsd_jax.lora import ADAPTER_SUBDIR, LoRALinear, extract_adapter, merge_lora, save_adapter

    # The adapter, with the identity of the weights it adapts, is read before merging changes them.
    has_lora = any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(model))
    adapter = extract_adapter(model) if has_lora else None
    model = merge_lora(model)
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
    try:
        (staging / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        tokenizer.save_pretrained(str(staging))
        save_params(model, staging)
        (staging / "ngsd_train.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if adapter is not None:
            save_adapter(adapter, staging / ADAPTER_SUBDIR)
        if output.exists():
            aside = output.with_name(f".{output.name}.replaced-{int(time.time())}")
            os.replace(output, aside)
            os.replace(staging, output)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if hf_output is not None:
        export_hf(model, hf_output, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
