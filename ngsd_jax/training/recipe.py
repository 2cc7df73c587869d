"""Training recipes: the `Recipe` fields that define a run, read from train/recipes/NAME.json
(or a .json path), overridden by the train CLI's flags and `--set KEY=VALUE`, type-checked and
validated before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ngsd_jax.errors import UsageError
from ngsd_jax.paths import DATA_DIR, RECIPES_DIR

DEFAULT_RECIPE = "smollm2-135m"
METHODS = ("lora", "full")
DECAYS = ("linear", "cosine", "constant")
DISTILL_LOSSES = ("kl", "tokens")
DTYPES = ("float32", "bfloat16")
# Recipe fields that change nothing about the trained weights; a resumed run may alter them.
RESUMABLE_CHANGES = {"description", "checkpoint_every"}
# The train CLI's own flags for recipe fields (every field also takes --set FIELD=VALUE).
FIELD_FLAGS = {"learning_rate": "--lr", "epochs": "--epochs", "max_steps": "--max-steps", "batch_size": "--batch-size",
               "grad_accum": "--grad-accum", "seed": "--seed"}


@dataclasses.dataclass
class Recipe:
    """Everything that defines a training run. Recipe files in train/recipes/ set these fields."""

    description: str = ""
    name: str = "smollm2-135m-safety-expert"  # output checkpoint name under checkpoints/
    base: str | None = None  # the model the expert serves, and whose answers are distilled; None = embedded default
    expert_init: str | None = None  # the expert's starting weights; None = the base itself
    # Default dataset (built from these when set) and extra/explicit record files.
    harmful_data: str | list[str] | None = "harmful.jsonl"
    benign_data: str | list[str] | None = "benign.jsonl"
    # Everyday instructions, self-distilled like the benign prompts; `ordinary_prompts` of their
    # train split are drawn at random (None = all).
    ordinary_data: str | list[str] | None = None
    ordinary_prompts: int | None = None
    data: list[str] = dataclasses.field(default_factory=list)
    distill_prompts: int | None = None  # benign train prompts answered by the base (None = all)
    distill_max_new_tokens: int = 64
    generation_batch: int = 64
    refusal_prompts: int | None = None  # harmful train prompts trained as plain refusals (None = all)
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
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = FIELD_FLAGS.get(field.name, f"--set {field.name}=VALUE")
                raise UsageError(f"recipe: {field.name} must be a finite number (got {value}); set it with {flag}")
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
            (self.refusal_prompts is None or self.refusal_prompts >= 0, "refusal_prompts must be >= 0"),
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


def build_recipe(name_or_path: str, flags: dict | None = None, data: list | None = None,
                 overrides: list[str] | None = None) -> Recipe:
    """The recipe `name_or_path` with `flags` (field -> value, None meaning unset) over it, `data`
    files replacing its default dataset, then `overrides` (KEY=VALUE strings); type-checked and
    validated."""
    values = load_recipe(name_or_path)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    if data:
        values.update(data=[str(p) for p in data], harmful_data=None, benign_data=None, ordinary_data=None)
    values.update(dict(parse_override(item) for item in overrides or ()))
    recipe = Recipe(**values)
    check_field_types(recipe)
    recipe.validate()
    return recipe


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every recipe shipped with the package."""
    return [(path.stem, json.loads(path.read_text(encoding="utf-8")).get("description", ""))
            for path in sorted(RECIPES_DIR.glob("*.json"))]


def resolve_data_path(name: str) -> Path:
    """A data file as named (absolute, or relative to the current directory), else the file of that
    name among the training data shipped with the package."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return DATA_DIR / path
