"""What the benchmark scripts share, so that a published figure is computed the way the package
computes it.

- The model shapes (`MODELS`, `PAIRS`): the Hugging Face configs of the paper's models, for the
  benchmarks that compile or run at real shapes without weights (program_memory, compile_time,
  accelerator).
- The default recipe's adapter (`ADAPTER_RANK`, `ADAPTER_ALPHA`, `ADAPTER_TOP_LAYERS`,
  `synthetic_adapter`) and the short chat prompt of the speed benchmarks.
- The held-out split of the shipped training data (`SETS`, `heldout`), read from
  `ngsd_jax.paths.DATA_DIR`, and how well a risk score separates its sets (`harmful_auc`).
- The default pair, loaded the way `python -m ngsd_jax.decode` loads it (`decode_options`,
  `load_default_pair`): its flags go through `ngsd_jax.cli`, so the preset, the distribution
  size, the stop tokens and the reflection settings are decode's own.
- `time_round_robin`: first calls, then interleaved timed calls, for noisy machines.

The scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path: they import
this module as `common`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import numpy as np

from ngsd_jax.models.config import ModelConfig, RopeScaling
from ngsd_jax.paths import DATA_DIR

GB = 1e9


def _config(model_type, vocab, hidden, mlp, layers, heads, kv_heads, head_dim, theta, tie=False, rope=RopeScaling(),
            max_positions=4096):
    return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope_theta=theta, rope_scaling=rope, max_position_embeddings=max_positions,
                       tie_word_embeddings=tie, qk_norm=model_type == "qwen3")


# The shapes of each model's Hugging Face config.json (weights are never needed here).
MODELS = {
    "smollm2-135m": _config("llama", 49152, 576, 1536, 30, 9, 3, 64, 100000.0, tie=True, max_positions=8192),
    "llama2-7b": _config("llama", 32000, 4096, 11008, 32, 32, 32, 128, 10000.0),
    "tinyllama-1.1b": _config("llama", 32000, 2048, 5632, 22, 32, 4, 64, 10000.0, max_positions=2048),
    "llama3.1-8b": _config("llama", 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, max_positions=131072,
                           rope=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "llama3.2-1b": _config("llama", 128256, 2048, 8192, 16, 32, 8, 64, 500000.0, tie=True, max_positions=131072,
                           rope=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "qwen3-8b": _config("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1000000.0, max_positions=40960),
    "qwen3-1.7b": _config("qwen3", 151936, 2048, 6144, 28, 16, 8, 128, 1000000.0, tie=True, max_positions=40960),
    # Attention memory: 32 heads but narrow (the score tensor grows with heads and length, not width).
    "narrow-32-head": _config("llama", 1024, 256, 512, 2, 32, 8, 8, 10000.0, max_positions=8192),
    # For `--tiny` runs and tests: the same code paths at shapes a CPU compiles in seconds.
    "tiny-base": _config("llama", 512, 128, 256, 4, 4, 2, 32, 10000.0),
    "tiny-expert": _config("llama", 512, 64, 128, 2, 4, 2, 16, 10000.0, tie=True),
}
PAIRS = {
    "smollm2-135m": ("smollm2-135m", "smollm2-135m"),  # the embedded default: base and its own fine-tune
    "llama2-7b+tinyllama-1.1b": ("llama2-7b", "tinyllama-1.1b"),
    "llama3.1-8b+llama3.2-1b": ("llama3.1-8b", "llama3.2-1b"),
    "qwen3-8b+qwen3-1.7b": ("qwen3-8b", "qwen3-1.7b"),
    "tiny": ("tiny-base", "tiny-expert"),
    "narrow-32-head": ("narrow-32-head", "narrow-32-head"),
}


@functools.cache
def model_bytes(config: ModelConfig, dtype) -> int:
    """Bytes of every parameter of one model on one device (`ngsd_jax.parallel.memory`'s count,
    from the abstract model's parameters: seconds for an 8B model, hence cached)."""
    from ngsd_jax.parallel.memory import parameter_bytes
    from ngsd_jax.parallel.sharding import MeshShape

    return parameter_bytes(config, dtype, MeshShape())


def cache_bytes(config: ModelConfig, batch: int, length: int, dtype) -> int:
    """Keys and values of every layer for `batch` rows of `length` positions, on one device."""
    from ngsd_jax.parallel.memory import kv_cache_bytes
    from ngsd_jax.parallel.sharding import MeshShape

    return kv_cache_bytes(config, dtype, MeshShape(), batch, length)


# With SmolLM2's default system prompt this is a ~40-token chat prompt.
SHORT_PROMPT = "Why is the sky blue?"
ADAPTER_RANK, ADAPTER_ALPHA, ADAPTER_TOP_LAYERS = 16, 64.0, 10  # train/recipes/smollm2-135m.json


def synthetic_adapter(model, seed: int = 0):
    """(adapter, merged expert): the default recipe's adapter shapes over `model` with random,
    non-zero values, and the same adapter merged into a copy of the model."""
    import jax
    from flax import nnx

    from ngsd_jax.checkpoints.adapter import extract_adapter
    from ngsd_jax.models.lora import apply_lora, merge_lora

    adapted = nnx.clone(model)
    count = len(adapted.layers)
    apply_lora(adapted, ADAPTER_RANK, ADAPTER_ALPHA, "all-linear", range(count - ADAPTER_TOP_LAYERS, count), seed)
    key = jax.random.key(seed)
    for _, variable in nnx.iter_graph(adapted):
        if isinstance(variable, nnx.LoRAParam) and variable.shape[0] == ADAPTER_RANK:
            key, sub = jax.random.split(key)
            variable.set_value(1e-3 * jax.random.normal(sub, variable.shape))
    return extract_adapter(adapted), merge_lora(adapted)


def expert_model(base, expert_path):
    """The expert as a whole model beside `base`: a checkpoint as it is, an adapter (the shipped
    default's) merged into a copy of the base (kernel + scale * a @ b)."""
    from flax import nnx

    from ngsd_jax.checkpoints.adapter import is_adapter, load_adapter
    from ngsd_jax.checkpoints.weights import load_model
    from ngsd_jax.models.lora import ATTENTION_PROJECTIONS

    if not is_adapter(expert_path):
        return load_model(expert_path)
    adapter = load_adapter(expert_path)
    merged = nnx.clone(base)
    for (i, name), (a, b) in adapter.weights.items():
        layer = merged.layers[i]
        linear = getattr(layer.attn if name in ATTENTION_PROJECTIONS else layer.mlp, name)
        kernel = linear.kernel[...]
        linear.kernel.set_value(kernel + (adapter.scale * (a @ b)).astype(kernel.dtype))
    return merged


def default_expert_path() -> str | None:
    from ngsd_jax.checkpoints.default_model import default_expert

    found = default_expert()
    return None if found is None else str(found.path)


# The held-out split of the shipped training data, by set: `harmful` holds the plain harmful
# requests, those in everyday task formats and those over the hazard taxonomy; `benign` the
# near-misses of both files; `ordinary` the generated everyday instructions and the messy ones.
SETS = {"harmful": ("harmful.jsonl", "harmful_tasks.jsonl", "harmful_taxonomy.jsonl"),
        "benign": ("benign.jsonl", "nearmiss.jsonl"), "ordinary": ("ordinary.jsonl", "ordinary_messy.jsonl")}


def heldout_rows(name: str, limit: int = 0) -> list[dict]:
    """The held-out rows of one set (prompt, category...); `limit` > 0 keeps that many evenly
    spaced ones, so every category and file of the set stays represented."""
    rows = [json.loads(line) for file in SETS[name] if (DATA_DIR / file).is_file()
            for line in (DATA_DIR / file).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "heldout"]
    if 0 < limit < len(rows):
        rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, limit)]
    return rows


def heldout(name: str, limit: int = 0) -> list[str]:
    return [r["prompt"] for r in heldout_rows(name, limit)]


def harmful_auc(harmful: list[float], other: list[float]) -> float | None:
    """ROC AUC of a risk score separating the harmful prompts from another set's
    (`ngsd_jax.evaluation.metrics.roc_auc`, harmful as the positives)."""
    from ngsd_jax.evaluation.metrics import roc_auc

    return roc_auc(list(harmful) + list(other), [True] * len(harmful) + [False] * len(other))


def add_pair_arguments(parser) -> None:
    """--base and --expert, named as decode names them (`model_flags` hands them on to it)."""
    parser.add_argument("--base", help="base checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--expert", help="expert checkpoint (default: the one `python -m ngsd_jax.train` builds)")


def model_flags(base: str | None = None, expert: str | None = None) -> list[str]:
    """decode's --base and --expert flags for the models a script was given (none: the default pair)."""
    return [*(["--base", base] if base else []), *(["--expert", expert] if expert else [])]


def decode_options(flags=(), **fields):
    """The `DecodeOptions` that `python -m ngsd_jax.decode FLAGS` runs with (`ngsd_jax.cli.decode_options`:
    the flags over the preset, the default pair's own when no model is named, over the built-in
    defaults), checked as decode checks them; `fields` then set what a script varies itself
    (mode, alpha, reflect, ...)."""
    import argparse

    from ngsd_jax import cli
    from ngsd_jax.decoding.pair import check_options

    parser = argparse.ArgumentParser(add_help=False)
    cli.add_decode_options(parser)
    options = dataclasses.replace(cli.decode_options(parser.parse_args(list(flags))), **fields)
    check_options(options)
    return options


def load_default_pair(flags, modes, prompts: list[str], **fields):
    """(LoadedPair, DecodeOptions): the pair decode would load for FLAGS (see `decode_options`),
    with the models `modes` need, through `ngsd_jax.decoding.pair.load_pair`: the same engine
    (distribution size, stop tokens, pad id), tokenizers and memory plan as decode."""
    from ngsd_jax.decoding.pair import load_pair

    options = decode_options(flags, **fields)
    return load_pair(options, tuple(modes), prompts), options


def time_round_robin(cases: dict, repeats: int, echo_first: bool = False, echo_each: bool = False):
    """(first-call seconds, first-call results, later seconds per case), keyed like `cases` (key ->
    a function of no arguments). Every case is called once first (compilation or warm-up), then
    `repeats` rounds call every case in turn, so that a noisy machine's drift hits all cases
    alike. `echo_first` / `echo_each` print a `# first call, KEY: s` / `# KEY: s` line as each
    call ends (flushed: they survive a timeout)."""
    first_call, first_result = {}, {}
    for key, run in cases.items():
        start = time.perf_counter()
        first_result[key] = run()
        first_call[key] = time.perf_counter() - start
        if echo_first:
            print(f"# first call, {_label(key)}: {first_call[key]:.2f} s", flush=True)
    timings = {key: [] for key in cases}
    for _ in range(repeats):
        for key, run in cases.items():
            start = time.perf_counter()
            run()
            timings[key].append(time.perf_counter() - start)
            if echo_each:
                print(f"# {_label(key)}: {timings[key][-1]:.3f} s", flush=True)
    return first_call, first_result, timings


def _label(key) -> str:
    return ", ".join(map(str, key)) if isinstance(key, tuple) else str(key)
