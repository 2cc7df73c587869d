"""One `flax.nnx` decoder for Llama, Mistral, Qwen2 and Qwen3.

The families differ only by flags on `ModelConfig` (qkv bias, q/k norm, rope scaling,
tied embeddings). The KV cache is an explicit pytree rather than NNX state so that the
decode loop can carry and donate it: one preallocated `[batch, kv_heads, max_len,
head_dim]` pair per layer, written at each sequence's own position. Heads come before
positions so that attention reads the cache in place; position-major would make XLA
transpose every layer's whole cache at every step.

With `stack_layers` the layers are instead ONE `DecoderLayer` whose parameters carry a
leading "layers" axis, run by `jax.lax.scan` (`LayerStack`): the program then holds one
layer's operations however deep the model is, so compile time stays flat in depth. Its KV
cache is one `StackedKV` pair of `[layers, batch, kv_heads, max_len, head_dim]` arrays.

Padding convention: prompts are right-padded. A query at position p attends keys at
positions <= p only, so a padded slot is never read before the sequence writes its own
token there, and rotary positions stay 0..len-1 for every sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax.models.config import ModelConfig, rope_inverse_frequencies

# One (keys, values) pair per layer, each [batch, kv_heads, max_len, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


class StackedKV(NamedTuple):
    """The KV cache of a `LayerStack`: keys and values of consecutive layers, each [layers, batch,
    kv_heads, max_len, head_dim] (its own type, so that the batch is known to be the second axis)."""

    keys: jax.Array
    values: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    # No sliding-window check here: slots past a sequence's real length are masked, so a cache
    # longer than the window is exact; callers check the real lengths (Engine.decode).
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def init_stacked_cache(config: ModelConfig, num_layers: int, batch: int, max_len: int, dtype=jnp.float32) -> StackedKV:
    shape = (num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return StackedKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))

    def __call__(self, x):
        # Normalise in fp32 and cast back before the scale, as HF does, so bf16 matches too.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def tie_to_step(x, weight):
    """Returns (x, weight) such that XLA cannot convert `weight` (an array or a pytree of arrays) once
    for the whole decode loop.

    XLA's CPU backend has no bf16 matmul: it converts both operands to fp32. A weight's
    conversion does not depend on the step, so loop-invariant code motion hoists it out of
    the `while_loop` and the program keeps an fp32 copy of every weight alive for the whole
    decode (twice the bf16 model's size in temporaries). Passing the weight through an
    optimization barrier together with the step's activation makes the conversion depend on
    the step, and the engine's memory-minimising CPU scheduler (`decoding.program.compiler_options`)
    places it beside its matmul, into a buffer the next matmul reuses. fp32 weights and
    accelerators (native bf16 matmuls) skip the barrier.
    """
    if jax.default_backend() != "cpu" or all(w.dtype == jnp.float32 for w in jax.tree.leaves(weight)):
        return x, weight
    return jax.lax.optimization_barrier((x, weight))


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, axes: tuple[str, str], dtype, rngs: nnx.Rngs, bias: bool = False):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), logical_axes=(axes[1],)) if bias else None

    def __call__(self, x):
        x, kernel = tie_to_step(x, self.kernel[...])
        y = x @ kernel
        return y if self.bias is None else y + self.bias[...]


def apply_rope(x, positions, inv_freq):
    """Rotary embedding in HF's half-split layout. x: [B, T, H, hd]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _write_cache(cache, new, starts):
    """Writes new [B, H, T, hd] into cache [B, H, S, hd] at each row's own start."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, s, 0)))(
        cache, new, starts
    )


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        bias = config.qkv_bias
        self.q_proj = Linear(d, config.num_heads * hd, ("embed", "heads"), dtype, rngs, bias)
        self.k_proj = Linear(d, config.num_kv_heads * hd, ("embed", "kv_heads"), dtype, rngs, bias)
        self.v_proj = Linear(d, config.num_kv_heads * hd, ("embed", "kv_heads"), dtype, rngs, bias)
        self.o_proj = Linear(config.num_heads * hd, d, ("heads", "embed"), dtype, rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, inv_freq, layer_cache):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv_heads, T, hd]
        if layer_cache is None:
            keys, values, key_positions = k, v, positions
        else:
            keys = _write_cache(layer_cache[0], k, positions[:, 0])
            values = _write_cache(layer_cache[1], v, positions[:, 0])
            layer_cache = (keys, values)
            key_positions = jnp.broadcast_to(jnp.arange(keys.shape[2]), (b, keys.shape[2]))

        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        if keys.shape[2] <= DENSE_ATTENTION_MAX_KEYS:
            out = _dense_attention(q, keys, values, positions, key_positions)
        else:
            # With a cache, key i sits at position i, so key blocks past the queries' last
            # position can be skipped: a prefill reads its prompt's blocks, not the budget, and a
            # decode step the blocks up to the longest live row.
            out = _blocked_attention(q, keys, values, positions, key_positions, ATTENTION_BLOCK,
                                     skip_future=layer_cache is not None)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), layer_cache


# Up to this many keys attention scores all keys at once ([B, heads, T, S] fp32 is at most
# heads x B x 1 MB); beyond, it runs over blocks of ATTENTION_BLOCK queries and keys with an
# online softmax, so no more than [B, heads, block, block] scores exist at a time.
DENSE_ATTENTION_MAX_KEYS = 512
ATTENTION_BLOCK = 256


def _dense_attention(q, keys, values, positions, key_positions):
    """q: [B, T, kv_heads, groups, hd]; keys, values: [B, kv_heads, S, hd] -> [B, T, kv_heads, groups, hd]."""
    scores = jnp.einsum(
        "btkgh,bksh->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32
    ) / np.sqrt(q.shape[-1]).astype(np.float32)
    visible = key_positions[:, None, None, None, :] <= positions[:, None, None, :, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", weights, values.astype(q.dtype))


def _blocked_attention(q, keys, values, positions, key_positions, block: int, skip_future: bool):
    """The same attention as `_dense_attention`, one block of queries and one of keys at a time
    (online softmax, as in flash attention). With `skip_future`, key index i must be position
    i (a KV cache), and a query block stops at the key block holding its last position."""
    b, t, kv_heads, groups, hd = q.shape
    s = keys.shape[2]
    query_block = min(t, block)
    query_blocks, key_blocks = -(-t // query_block), -(-s // block)
    pad = query_blocks * query_block - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), mode="edge")
    scale = 1.0 / np.sqrt(hd).astype(np.float32)
    lowest = jnp.finfo(jnp.float32).min

    def one_query_block(c, out):
        q_c = jax.lax.dynamic_slice_in_dim(q, c * query_block, query_block, axis=1)
        pos_c = jax.lax.dynamic_slice_in_dim(positions, c * query_block, query_block, axis=1)

        def one_key_block(i, carry):
            running_max, denominator, accumulated = carry
            # The last block is moved back to end at S (slices stay in bounds); keys it
            # shares with the block before are masked so that none is counted twice.
            start = jnp.minimum(i * block, s - block)
            k_i = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2)
            v_i = jax.lax.dynamic_slice_in_dim(values, start, block, axis=2)
            key_pos = jax.lax.dynamic_slice_in_dim(key_positions, start, block, axis=1)
            new_key = start + jnp.arange(block) >= i * block
            scores = jnp.einsum("btkgh,bksh->bkgts", q_c, k_i.astype(q.dtype),
                                preferred_element_type=jnp.float32) * scale
            visible = (key_pos[:, None, None, None, :] <= pos_c[:, None, None, :, None]) & new_key
            scores = jnp.where(visible, scores, lowest)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            weights = jnp.exp(scores - new_max[..., None])
            rescale = jnp.exp(running_max - new_max)
            accumulated = accumulated * rescale[..., None] + jnp.einsum(
                "bkgts,bksh->bkgth", weights.astype(q.dtype), v_i.astype(q.dtype), preferred_element_type=jnp.float32)
            return new_max, denominator * rescale + weights.sum(axis=-1), accumulated

        stats_shape = (b, kv_heads, groups, query_block)
        init = (jnp.full(stats_shape, lowest), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (hd,), jnp.float32))
        # Block 0 holds position 0, which every query sees, so the running max is a real score
        # after it and masked keys then weigh exp(lowest - max) = 0.
        last = jnp.minimum(key_blocks, jnp.max(pos_c) // block + 1) if skip_future else key_blocks
        _, denominator, accumulated = jax.lax.fori_loop(0, last, one_key_block, init)
        block_out = (accumulated / denominator[..., None]).astype(q.dtype).transpose(0, 3, 1, 2, 4)
        return jax.lax.dynamic_update_slice_in_dim(out, block_out, c * query_block, axis=1)

    out = jax.lax.fori_loop(0, query_blocks, one_query_block, jnp.zeros_like(q))
    return out[:, :t]


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), dtype, rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), dtype, rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, inv_freq, layer_cache):
        attended, layer_cache = self.attn(self.input_norm(x), positions, inv_freq, layer_cache)
        x = x + attended
        return x + self.mlp(self.post_attn_norm(x)), layer_cache


class Decoder(nnx.Module):
    """A causal LM. `__call__` returns hidden states; `logits` projects chosen ones to fp32 logits."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embedding = nnx.Param(
            _normal(rngs, (config.vocab_size, config.hidden_size), dtype), logical_axes=("vocab", "embed")
        )
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype, rngs)
        )

    def __call__(self, tokens, positions, cache: KVCache | None = None):
        """tokens, positions: [B, T] int32. With a cache, the T tokens are written into it at
        positions[:, 0] onwards; without one, they attend only to each other (training)."""
        tokens, table = tie_to_step(tokens, self.embedding[...])
        x = jnp.take(table, tokens, axis=0)
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config))
        if self.scanned:
            x, cache = self.layers(x, positions, inv_freq, cache)
            return self.final_norm(x), cache
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, inv_freq, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    @property
    def scanned(self) -> bool:
        """Whether the layers are stacked and scanned (`stack_layers`) rather than unrolled."""
        return isinstance(self.layers, LayerStack)

    def new_cache(self, batch: int, max_len: int):
        """An empty KV cache in this decoder's layout (per layer, or stacked when scanned)."""
        if self.scanned:
            return init_stacked_cache(self.config, self.config.num_layers, batch, max_len, self.dtype)
        return init_cache(self.config, batch, max_len, self.dtype)

    def logits(self, hidden):
        # A tied head contracts the embedding table's own rows: a transposed copy of the table
        # would be loop-invariant, and XLA would keep it for the whole decode.
        tied = self.lm_head is None
        hidden, head = tie_to_step(hidden, self.embedding[...] if tied else self.lm_head.kernel[...])
        contract = ((hidden.ndim - 1,), (1 if tied else 0,)), ((), ())
        return jax.lax.dot_general(hidden, head.astype(hidden.dtype), contract, preferred_element_type=jnp.float32)

    @property
    def dtype(self):
        return self.embedding[...].dtype


class LayerStack(nnx.Module):
    """Consecutive decoder layers as ONE `DecoderLayer` whose parameters carry a leading "layers"
    axis, run by `jax.lax.scan`. Built by `stack_layers`, which consumes the per-layer modules."""

    def __init__(self, layers: list[DecoderLayer]):
        self.num_layers = len(layers)
        self.layer = _stack_in_place(layers)

    def __len__(self) -> int:
        return self.num_layers

    def __call__(self, x, positions, inv_freq, cache: StackedKV | None, start: int = 0, stop: int | None = None,
                 wrap=None):
        """Runs layers [start, stop) (all by default); `cache` holds exactly those layers. `wrap(layer,
        i)`, given, returns layer i's module to run (the adapter's expert rows use it)."""
        stop = self.num_layers if stop is None else stop
        graph, stacked = nnx.split(self.layer)

        def one_layer(x, inputs):
            i, layer_cache = inputs
            # Tied to the step before slicing, or XLA converts whole bf16 stacks to fp32 once,
            # outside the loop, on a CPU (see `tie_to_step`).
            x, layers = tie_to_step(x, stacked)
            # Slicing layer i inside the loop keeps one copy of the weights: the other segment of a
            # paired decoder (decoding.program.paired_forward) scans other indices of the same arrays. (XLA's
            # CPU backend copies each slice out before its matmuls, which makes decoding slower.)
            layer = nnx.merge(graph, jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False),
                                                  layers))
            if wrap is not None:
                layer = wrap(layer, i)
            x, layer_cache = layer(x, positions, inv_freq, layer_cache)
            return x, None if layer_cache is None else StackedKV(*layer_cache)

        return jax.lax.scan(one_layer, x, (jnp.arange(start, stop), cache))


def _stack_in_place(layers: list[DecoderLayer]) -> DecoderLayer:
    """Turns layers[0] into the stack of all `layers` (each parameter [len(layers), ...], its logical
    axes led by "layers") and empties the others. Parameter by parameter, each layer's array is
    released once it is copied into the stack, so that at most one parameter's worth of layers is
    held twice: an 8B model is never in memory twice."""
    per_layer = [{path: node for path, node in nnx.iter_graph(layer) if isinstance(node, nnx.Variable)}
                 for layer in layers]
    for path, first in per_layer[0].items():
        variables = [variables[path] for variables in per_layer]
        # On a mesh the stack keeps its layers' placement, the layer axis whole (XLA propagates it).
        stacked = jnp.stack([v[...] for v in variables])
        for v in variables[1:]:
            v.set_value(jnp.zeros((0,), v.dtype))  # released: the module is discarded
        first.set_value(stacked)
        if first.has_metadata("logical_axes"):
            first.set_metadata("logical_axes", ("layers",) + tuple(first.get_metadata()["logical_axes"]))
    return layers[0]


def stack_layers(model: Decoder) -> Decoder:
    """Stacks the model's layers in place for `jax.lax.scan` (see `LayerStack`); returns the model.

    In place, so that the weights exist once: an engine or paired decoder built over the model
    before must not be used after. Loading, LoRA training and export work on per-layer models;
    stack after them. A model already stacked is returned as it is."""
    if not model.scanned:
        model.layers = LayerStack(list(model.layers))
    return model


def abstract_decoder(config: ModelConfig, dtype=jnp.float32, scan_layers: bool = False) -> Decoder:
    """The module's structure and shapes without allocating weights (for loading into, or lowering)."""
    if scan_layers:
        return nnx.eval_shape(lambda: stack_layers(Decoder(config, dtype, nnx.Rngs(0))))
    return nnx.eval_shape(lambda: Decoder(config, dtype, nnx.Rngs(0)))
