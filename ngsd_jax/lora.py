"""Low-rank adapters (LoRA) on the decoder's `Linear` layers, and merging them back.

`apply_lora` swaps chosen `Linear` modules for `LoRALinear` wrappers in place: the wrapped
layer keeps its frozen kernel and the adapter adds `scale * (x @ a) @ b` with `b` starting
at zero, so a fresh adapter leaves the model's outputs unchanged. The adapter matrices are
`nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates exactly what trains.
`merge_lora` folds every adapter into its kernel and puts the plain `Linear` back, leaving
a module with the original structure (what `save_params` and `export_hf` expect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ngsd_jax.model import Decoder, Linear

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
