"""A LoRA expert on disk, apart from the weights it adapts: save, load, and the fingerprint
that ties an adapter to its base's weights.

An adapter directory holds adapter.safetensors (each adapted projection's a and b) and
adapter.json (format, rank, alpha, targets, layers, and the base's config and weight
fingerprint), so that decoding refuses an adapter meant for other weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from ngsd_jax.checkpoints.weights import CheckpointError
from ngsd_jax.models.decoder import Decoder
from ngsd_jax.models.lora import ALL_LINEAR, ATTENTION_PROJECTIONS, MLP_PROJECTIONS, LoRAAdapter, LoRALinear
from ngsd_jax.parallel import sharding as sh

ADAPTER_SUBDIR = "adapter"  # where `python -m ngsd_jax.train` keeps it, inside the merged expert's checkpoint
ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "ngsd-jax-lora-1"
# Elements sampled per weight tensor for the fingerprint: enough that any fine-tune (which
# moves essentially every element) changes it, cheap enough for an 8B base.
FINGERPRINT_SAMPLES = 4096


def _frozen_params(model: Decoder) -> list[tuple[str, jax.Array]]:
    """The model's own weights by name, as a plain Decoder names them (LoRA wrappers looked through)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    named = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        named.append((".".join(k for k in keys if k not in ("base", "value", "")), leaf))
    return sorted(named, key=lambda item: item[0])


def weights_fingerprint(model: Decoder) -> str:
    """A hash of a strided sample of every weight, rounded to bfloat16 so that the same
    weights loaded as float32 or bfloat16 give the same fingerprint."""
    digest = hashlib.sha256()
    for name, leaf in _frozen_params(model):
        flat = jnp.ravel(leaf)
        sample = flat[:: max(1, flat.size // FINGERPRINT_SAMPLES)].astype(jnp.bfloat16)
        digest.update(f"{name}:{tuple(leaf.shape)};".encode())
        digest.update(sh.fetch(sample).view(np.uint16).tobytes())
    return digest.hexdigest()[:32]


def extract_adapter(model: Decoder) -> LoRAAdapter:
    """The adapters of a model wrapped by `apply_lora` (before `merge_lora`), with the identity of
    the weights they adapt."""
    weights, ranks, alphas = {}, set(), set()
    for i, layer in enumerate(model.layers):
        for owner, names in ((layer.attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                module = getattr(owner, name)
                if isinstance(module, LoRALinear):
                    a, b = (sh.fetch(m[...]).astype(np.float32) for m in (module.lora_a, module.lora_b))
                    weights[(i, name)] = (a, b)
                    ranks.add(a.shape[1])
                    alphas.add(module.scale * a.shape[1])
    if not weights:
        raise ValueError("the model has no LoRA adapters to extract")
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("the adapters differ in rank or alpha; one LoRAAdapter holds one rank and alpha")
    return LoRAAdapter(ranks.pop(), float(alphas.pop()), weights, model.config.to_hf_dict(),
                       weights_fingerprint(model))


def save_adapter(adapter: LoRAAdapter, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, name), (a, b) in adapter.weights.items():
        tensors[f"layers.{layer}.{name}.lora_a"] = np.ascontiguousarray(a)
        tensors[f"layers.{layer}.{name}.lora_b"] = np.ascontiguousarray(b)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    meta = {"format": ADAPTER_FORMAT, "rank": adapter.rank, "alpha": adapter.alpha, "scale": adapter.scale,
            "targets": list(adapter.targets), "layers": list(adapter.layers),
            "base_fingerprint": adapter.base_fingerprint, "base_config": adapter.base_config}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def load_adapter(directory: str | Path) -> LoRAAdapter:
    """The adapter in `directory`, checked whole: a corrupt or inconsistent one is a CheckpointError
    naming the file, never a traceback or an expert that decodes wrongly."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    fix = "retrain the expert (python -m ngsd_jax.train) or re-export its adapter"

    def refuse(path: Path, problem: str):
        raise CheckpointError(f"{path}: {problem}; {fix}")

    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        refuse(config_path, f"cannot be read ({err})")
    except json.JSONDecodeError as err:
        refuse(config_path, f"not JSON ({err.msg} at line {err.lineno})")
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        refuse(config_path, f"not an ngsd-jax LoRA adapter (format {found!r}, expected {ADAPTER_FORMAT!r})")
    kinds = {"rank": int, "alpha": (int, float), "base_config": dict, "base_fingerprint": str}
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            refuse(config_path, f"'{key}' is missing or not {getattr(kind, '__name__', 'a number')}")
    rank, alpha = meta["rank"], float(meta["alpha"])
    if rank < 1 or not (math.isfinite(alpha) and alpha > 0):
        refuse(config_path, f"rank {rank} and alpha {alpha} must be >= 1 and a positive number")
    if not weights_path.is_file():
        refuse(weights_path, "missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # a truncated or overwritten file: safetensors' own error type
        refuse(weights_path, f"unreadable ({' '.join(str(err).split())[:120]})")
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = re.fullmatch(r"layers\.(\d+)\.(\w+)\.lora_([ab])", key)
        if match is None or match[2] not in ALL_LINEAR:
            refuse(weights_path, f"unexpected tensor '{key}' (expected layers.N.PROJECTION.lora_a/lora_b, with "
                                 f"PROJECTION one of {', '.join(ALL_LINEAR)})")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = array
    if not pairs:
        refuse(weights_path, "holds no adapter tensors")
    layers = meta["base_config"].get("num_hidden_layers")
    weights = {}
    for (layer, name), found in sorted(pairs.items()):
        where = f"layers.{layer}.{name}"
        if set(found) != {"a", "b"}:
            refuse(weights_path, f"{where} has lora_{next(iter(found))} without lora_{'b' if 'a' in found else 'a'}")
        a, b = found["a"], found["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            refuse(weights_path, f"{where} has lora_a {a.shape} and lora_b {b.shape}, not rank {rank} as "
                                 f"{ADAPTER_CONFIG} says ([in, {rank}] and [{rank}, out])")
        if isinstance(layers, int) and layer >= layers:
            refuse(weights_path, f"{where} adapts layer {layer} of a {layers}-layer base")
        if not (np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and np.isfinite(b).all()):
            refuse(weights_path, f"{where} holds non-finite or non-float values")
        weights[(layer, name)] = (a, b)
    return LoRAAdapter(rank, alpha, weights, meta["base_config"], meta["base_fingerprint"])


def adapter_mismatch(adapter: LoRAAdapter, base: Decoder, base_name: str,
                     base_fingerprint: str | None = None) -> str | None:
    """One line saying why `adapter` does not belong to `base` (whose `weights_fingerprint`, when
    already known, is `base_fingerprint`), or None when it does."""
    if adapter.base_config != base.config.to_hf_dict():
        return (f"the expert adapter was trained on a different model than the base {base_name} (their configs "
                f"differ); pass the --base it was trained on, or a merged expert checkpoint")
    base_fingerprint = base_fingerprint or weights_fingerprint(base)
    if adapter.base_fingerprint != base_fingerprint:
        return (f"the expert adapter was trained on different weights than the base {base_name} (fingerprint "
                f"{adapter.base_fingerprint}, the base's {base_fingerprint}); pass the --base it was "
                f"trained on, or a merged expert checkpoint")
    return None


def adapter_fingerprint(adapter: LoRAAdapter) -> str:
    """A hash of everything an adapter expert computes with: the fingerprint of the weights it
    adapts, its rank and alpha, and every one of its arrays whole."""
    digest = hashlib.sha256(f"{adapter.base_fingerprint};{adapter.rank};{adapter.alpha};".encode())
    for (layer, name), (a, b) in sorted(adapter.weights.items()):
        digest.update(f"{layer}.{name}:{a.shape}{b.shape};".encode())
        digest.update(np.ascontiguousarray(a, np.float32).tobytes() + np.ascontiguousarray(b, np.float32).tobytes())
    return digest.hexdigest()[:32]
