"""Low-rank adapters (LoRA) on the decoder's `Linear` layers, and merging them back.

`apply_lora` swaps chosen `Linear` modules for `LoRALinear` wrappers in place: the wrapped
layer keeps its frozen kernel and the adapter adds `scale * (x @ a) @ b` with `b` starting
at zero, so a fresh adapter leaves the model's outputs unchanged. The adapter matrices are
`nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates exactly what trains.
`merge_lora` folds every adapter into its kernel and puts the plain `Linear` back, leaving
a module with the original structure (what `save_params` and `export_hf` expect).

A trained adapter is also kept on its own (`LoRAAdapter`; its files and the fingerprint of the
weights it adapts are `checkpoints.adapter`'s), so that the
decode engine can run the expert as the base plus a low-rank delta over ONE copy of the
base's weights (`attach_expert_rows`): base rows and expert rows share every matmul, and
only the expert rows (the second half of the batch) receive the delta.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax.models.decoder import Decoder, Linear

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


class LoRALinear(nnx.Module):
    def __init__(self, base: Linear, rank: int, alpha: float, rngs: nnx.Rngs):
        din, dout = base.kernel.shape
        self.base = base
        self.scale = alpha / rank
        # PEFT's initialisation: a ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(din), 1/sqrt(din)), b = 0.
        bound = 1.0 / math.sqrt(din)
        # Adapters stay float32 whatever the frozen weights are, so small updates are not rounded away.
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (din, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), jnp.float32))

    def __call__(self, x):
        update = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
        return self.base(x) + (self.scale * update).astype(x.dtype)

    def merged(self) -> Linear:
        """The wrapped Linear with the adapter folded into its kernel."""
        kernel = self.base.kernel[...]
        delta = self.scale * (self.lora_a[...] @ self.lora_b[...])
        self.base.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        return self.base


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """"all-linear", "attention", "mlp" or a list of projection names (q_proj, v_proj, ...)."""
    groups = {"all-linear": ALL_LINEAR, "attention": ATTENTION_PROJECTIONS, "mlp": MLP_PROJECTIONS}
    names = [targets] if isinstance(targets, str) else list(targets)
    resolved: list[str] = []
    for name in names:
        if name in groups:
            resolved += groups[name]
        elif name in ALL_LINEAR:
            resolved.append(name)
        else:
            raise ValueError(f"unknown LoRA target '{name}'; use all-linear, attention, mlp or projection names "
                             f"({', '.join(ALL_LINEAR)})")
    return tuple(dict.fromkeys(resolved))


def apply_lora(model: Decoder, rank: int, alpha: float, targets: str | Sequence[str] = ("q_proj", "v_proj"),
               layers: Sequence[int] | None = None, seed: int = 0) -> int:
    """Wraps the target projections of the given layers (all by default) in place; returns how many."""
    if rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    names = resolve_targets(targets)
    layer_ids = range(len(model.layers)) if layers is None else layers
    rngs = nnx.Rngs(params=seed)
    count = 0
    for i in layer_ids:
        layer = model.layers[i]
        for name in names:
            owner = layer.attn if name in ATTENTION_PROJECTIONS else layer.mlp
            linear = getattr(owner, name)
            if isinstance(linear, LoRALinear):
                raise ValueError(f"layer {i} {name} already has a LoRA adapter")
            setattr(owner, name, LoRALinear(linear, rank, alpha, rngs))
            count += 1
    return count


def merge_lora(model: Decoder) -> Decoder:
    """Folds every adapter into its kernel in place; the model is then a plain Decoder again."""
    for layer in model.layers:
        for owner, names in ((layer.attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                module = getattr(owner, name)
                if isinstance(module, LoRALinear):
                    setattr(owner, name, module.merged())
    return model


@dataclasses.dataclass
class LoRAAdapter:
    """A trained LoRA expert kept apart from the weights it adapts.

    `weights[(layer, projection)]` is (a [din, rank], b [rank, dout]) in float32; the
    expert's projection is x @ kernel + scale * (x @ a) @ b. `base_config` (the adapted
    model's config as an HF dict) and `base_fingerprint` identify those weights.
    """

    rank: int
    alpha: float
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    base_config: dict
    base_fingerprint: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.weights}))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for name in ALL_LINEAR if any(name == n for _, n in self.weights))


class ExpertRowsLoRA(nnx.Module):
    """A Linear whose input holds base rows then expert rows ([2B, ...]): one matmul with the
    shared kernel for all rows, the low-rank delta added to the expert half only."""

    def __init__(self, base: Linear, a, b, scale: float):
        self.base = base
        self.scale = scale
        self.lora_a = nnx.LoRAParam(jnp.asarray(a, jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.asarray(b, jnp.float32))

    def __call__(self, x):
        y = self.base(x)
        half = x.shape[0] // 2
        expert_rows = x[half:]
        delta = (expert_rows @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
        return jnp.concatenate([y[:half], y[half:] + (self.scale * delta).astype(y.dtype)])


class StackedExpertRows(nnx.Module):
    """The adapter of a scanned paired decoder: per target projection, A and B stacked over the
    layers from the first adapted one to the last ([layers, din, rank], [layers, rank, dout]),
    zero for a layer or projection the adapter leaves alone (its delta is then exactly zero), so
    that one scan body serves every layer of the segment."""

    def __init__(self, adapter: LoRAAdapter, kernel_shapes: dict[str, tuple[int, int]], num_layers: int):
        self.first = min(adapter.layers)
        self.scale = adapter.scale
        count = num_layers - self.first
        a = {n: np.zeros((count, kernel_shapes[n][0], adapter.rank), np.float32) for n in adapter.targets}
        b = {n: np.zeros((count, adapter.rank, kernel_shapes[n][1]), np.float32) for n in adapter.targets}
        for (i, name), (a_i, b_i) in adapter.weights.items():
            a[name][i - self.first], b[name][i - self.first] = a_i, b_i
        self.lora_a = nnx.Dict({n: nnx.LoRAParam(jnp.asarray(x)) for n, x in a.items()})
        self.lora_b = nnx.Dict({n: nnx.LoRAParam(jnp.asarray(x)) for n, x in b.items()})

    def wrap(self, layer, i):
        """Layer i (a traced index, inside `model.LayerStack`'s scan) with its expert rows attached."""
        for name in self.lora_a:
            owner = layer.attn if name in ATTENTION_PROJECTIONS else layer.mlp
            a, b = (jax.lax.dynamic_index_in_dim(m[name][...], i - self.first, keepdims=False)
                    for m in (self.lora_a, self.lora_b))
            setattr(owner, name, ExpertRowsLoRA(getattr(owner, name), a, b, self.scale))
        return layer


def attach_expert_rows(base: Decoder, adapter: LoRAAdapter) -> Decoder:
    """A decoder over the SAME weight arrays as `base` (nothing is copied) whose adapted
    projections apply `adapter` to the second half of the batch: its rows [0, B) compute the
    base, rows [B, 2B) the expert. A scanned base keeps its stack and gets the adapter as
    `expert_rows` (a `StackedExpertRows`)."""
    graph, state = nnx.split(base)
    paired = nnx.merge(graph, state)
    kernels = {}
    for (i, name), (a, b) in sorted(adapter.weights.items()):
        if i >= len(paired.layers):
            raise ValueError(f"the adapter adapts layer {i}; the base has {len(paired.layers)} layers")
        layer = paired.layers.layer if paired.scanned else paired.layers[i]
        owner = layer.attn if name in ATTENTION_PROJECTIONS else layer.mlp
        linear = getattr(owner, name)
        kernels[name] = tuple(linear.kernel.shape[-2:])
        if kernels[name] != (a.shape[0], b.shape[1]):
            raise ValueError(f"the adapter's layer {i} {name} is {a.shape[0]}x{b.shape[1]}, the base's "
                             f"{kernels[name][0]}x{kernels[name][1]}")
        if not paired.scanned:
            setattr(owner, name, ExpertRowsLoRA(linear, a, b, adapter.scale))
    if paired.scanned:
        paired.expert_rows = StackedExpertRows(adapter, kernels, len(paired.layers))
    return paired
