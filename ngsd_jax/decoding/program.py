"""The traced decode program: prefill, both forward passes, divergence, neuron and token choice,
carried as one state pytree through one `lax.while_loop` (see `decoding.engine` for the host
side). Nothing here runs outside a trace but `compiler_options`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ngsd_jax.decoding import early_stop as es
from ngsd_jax.decoding import gate
from ngsd_jax.decoding.risk import alpha_from_risk_array, risk_from_opening_probabilities
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.models.config import rope_inverse_frequencies
from ngsd_jax.models.decoder import Decoder, StackedKV, init_cache, init_stacked_cache, tie_to_step
from ngsd_jax.parallel import sharding as sh


class DecodeState(NamedTuple):
    step: jax.Array  # scalar int32
    key: jax.Array
    base_cache: Any  # with an adapter expert: the one cache of the paired rows (see paired_forward)
    expert_cache: Any
    base_len: jax.Array  # [B] next write position in the base cache
    expert_len: jax.Array
    base_logits: jax.Array  # [B, V] fp32 logits for the next token
    expert_logits: jax.Array
    v: jax.Array  # [B] neuron potential
    done: jax.Array  # [B]
    tokens: jax.Array  # [B, N] generated tokens (pad after a stop)
    trace_d: jax.Array  # [B, N]
    trace_v: jax.Array
    trace_spike: jax.Array
    trace_alpha: jax.Array  # alpha in force (0 where the base choice stood)
    cap: Any = None  # [B] early stop only: length cap (a stopped row's length), NO_CAP until a trigger
    triggered: Any = None  # [B] early stop only



def prefill(model: Decoder, prompt, lengths, cache):
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    hidden, cache = model(prompt, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def step(model: Decoder, token, lengths, cache):
    hidden, cache = model(token[:, None], lengths[:, None], cache)
    return model.logits(hidden[:, 0]), cache


def paired_forward(model: Decoder, first_adapted: int, shared: bool, tokens, positions, cache):
    """One forward of base rows and expert rows over one copy of the weights (a decoder from
    `attach_expert_rows`). Not shared: tokens and positions are [2B, T], base rows first.
    Shared (identical prompts): they are [B, T]; the layers below `first_adapted` run once
    and their cache has B rows; from `first_adapted` on the rows are duplicated."""
    tokens, table = tie_to_step(tokens, model.embedding[...])
    x = jnp.take(table, tokens, axis=0)
    inv_freq = jnp.asarray(rope_inverse_frequencies(model.config))
    if model.scanned:
        new_cache = []
        for (start, stop), segment_cache in zip(segments(model, first_adapted), cache):
            if shared and start == first_adapted:
                x, positions = jnp.concatenate([x, x]), jnp.concatenate([positions, positions])
            wrap = model.expert_rows.wrap if start == first_adapted else None
            x, segment_cache = model.layers(x, positions, inv_freq, segment_cache, start, stop, wrap)
            new_cache.append(segment_cache)
        return model.final_norm(x), tuple(new_cache)
    new_cache = []
    for i, layer in enumerate(model.layers):
        if shared and i == first_adapted:
            x, positions = jnp.concatenate([x, x]), jnp.concatenate([positions, positions])
        x, layer_cache = layer(x, positions, inv_freq, cache[i])
        new_cache.append(layer_cache)
    return model.final_norm(x), tuple(new_cache)


def segments(model: Decoder, first_adapted: int) -> list[tuple[int, int]]:
    """A scanned paired decoder's layer ranges: those below the first adapted layer (no adapter
    there, and one row set when prompts are shared), then the adapted ones."""
    return [(start, stop) for start, stop in ((0, first_adapted), (first_adapted, len(model.layers))) if stop > start]


def paired_cache(model: Decoder, first_adapted: int, shared: bool, batch: int, max_len: int):
    if model.scanned:
        return tuple(init_stacked_cache(model.config, stop - start, batch if shared and stop <= first_adapted
                                        else 2 * batch, max_len, model.dtype)
                     for start, stop in segments(model, first_adapted))
    paired = init_cache(model.config, 2 * batch, max_len, model.dtype)
    if not shared:
        return paired
    return init_cache(model.config, batch, max_len, model.dtype)[:first_adapted] + paired[first_adapted:]


def paired_prefill(model: Decoder, first_adapted: int, shared: bool, prompt, lengths, cache):
    """Logits [2B, V] after each row's prompt; `lengths` is [2B] (base rows, then expert rows)."""
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    hidden, cache = paired_forward(model, first_adapted, shared, prompt, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def probabilities(logits, vocab_size):
    # Rows past the real vocabulary (padded embedding tables) never get probability mass.
    return jax.nn.softmax(logits[:, :vocab_size].astype(jnp.float32), axis=-1)


def choose_scores(settings: DecodeSettings, state: DecodeState, alpha, temperature, top_p, vocab_size):
    """Scores for this step, the neuron update and the trace entries, per the mode."""
    config = settings.gate
    batch = state.v.shape[0]
    zeros = jnp.zeros((batch,), jnp.float32)
    no_spike = jnp.zeros((batch,), bool)
    if settings.mode == "base":
        return probabilities(state.base_logits, vocab_size), zeros, state.v, no_spike, zeros
    if settings.mode == "expert":
        return probabilities(state.expert_logits, vocab_size), zeros, state.v, no_spike, zeros
    p_b = probabilities(state.base_logits, vocab_size)
    p_e = probabilities(state.expert_logits, vocab_size)
    d = gate.divergence(config.divergence, p_b, p_e)
    if settings.mode == "ngsd":
        v, spike = gate.lif_step(state.v, d, config)
        # A finished (or batch-padding) row's token is padding whatever it scores; letting it
        # spike would only make the merge below run for nothing.
        spike = spike & ~state.done
        # Most steps fire nowhere in the batch; skip the two top-k passes then.
        scores = jax.lax.cond(jnp.any(spike), lambda: gate.ngsd_scores(p_b, p_e, spike, alpha, config.top_k),
                              lambda: p_b)
        return scores, d, v, spike, jnp.where(spike, alpha, 0.0)
    if settings.mode == "always":
        scores = gate.union_top_k_merge(p_b, p_e, alpha, config.top_k)
        return scores, d, state.v, jnp.ones((batch,), bool), alpha
    # safedecoding: the expert steers only the first m tokens.
    active = state.step < settings.safedecoding_first_m
    # The merge ranks the whole vocabulary twice; after the first m tokens it is not needed.
    scores = jax.lax.cond(active, lambda: gate.safedecoding_scores(
        p_b, p_e, settings.safedecoding_alpha, settings.safedecoding_min_common), lambda: p_b)
    in_force = jnp.where(active, settings.safedecoding_alpha, 0.0) * jnp.ones((batch,), jnp.float32)
    return scores, d, state.v, jnp.broadcast_to(active, (batch,)), in_force


def _rows_per_opening(cache, repeats: int, batch: int, keep: int):
    """A prefill cache with each row repeated `repeats` times (row b's copies side by side; a
    paired layer's base rows and expert rows, 2 x batch, each repeated within its half) and only
    exactly `keep` positions (cut, or padded when the prefill's cache is shorter)."""
    def one(array, batch_axis):
        length_axis = batch_axis + 2
        array = jax.lax.slice_in_dim(array, 0, min(keep, array.shape[length_axis]), axis=length_axis)
        if array.shape[length_axis] < keep:  # a short decode budget: room for the openings' tokens
            padding = [(0, 0)] * array.ndim
            padding[length_axis] = (0, keep - array.shape[length_axis])
            array = jnp.pad(array, padding)
        if array.shape[batch_axis] == 2 * batch:
            halves = jnp.split(array, 2, axis=batch_axis)
            return jnp.concatenate([jnp.repeat(h, repeats, axis=batch_axis) for h in halves], axis=batch_axis)
        return jnp.repeat(array, repeats, axis=batch_axis)

    def layer(entry):
        if isinstance(entry, StackedKV):
            return StackedKV(one(entry.keys, 1), one(entry.values, 1))
        return tuple(one(x, 0) for x in entry)

    return tuple(layer(entry) for entry in cache)


def opening_probabilities(model: Decoder, cache, is_paired: bool, first_adapted, shared: bool, last_token, risk_len,
                          rows, width: int, vocab_size: int):
    """[B, R, D, V]: the expert's next-token distributions after its prompt's first `risk_len`
    tokens (the last of them `last_token`) and after each of the opening trie's `rows` ([R, D-1])
    fed on, teacher-forced: one batched pass of B x R rows of D tokens over copies of the
    prefill cache. The rows are written from position `risk_len - 1` on, so what the prefill
    held past the prompt (a forced answer start) is overwritten or out of sight: the risk
    depends on the prompt alone. `width` is the prompt's padded width."""
    batch, (count, depth) = last_token.shape[0], (rows.shape[0], rows.shape[1] + 1)
    tokens = jnp.concatenate([jnp.broadcast_to(last_token[:, None, None], (batch, count, 1)),
                              jnp.broadcast_to(rows[None], (batch, count, depth - 1))], axis=2)
    positions = (risk_len - 1)[:, None, None] + jnp.arange(depth)[None, None, :]
    tokens = tokens.reshape(batch * count, depth)
    positions = jnp.broadcast_to(positions, (batch, count, depth)).reshape(batch * count, depth)
    cache = _rows_per_opening(cache, count, batch, width + depth)
    if is_paired:
        if not shared:
            tokens, positions = jnp.concatenate([tokens, tokens]), jnp.concatenate([positions, positions])
        hidden, _ = paired_forward(model, first_adapted, shared, tokens, positions, cache)
        hidden = hidden[hidden.shape[0] // 2:]  # the expert rows
    else:
        hidden, _ = model(tokens, positions, cache)
    logits = model.logits(hidden).reshape(batch * count * depth, -1)
    return probabilities(logits, vocab_size).reshape(batch, count, depth, vocab_size)


def decode_program(base_graph, expert_graph, paired_graph, first_adapted, settings: DecodeSettings, vocab_size: int,
            params, inputs, mesh=None):
    paired = nnx.merge(paired_graph, params["paired"]) if paired_graph is not None else None
    base = nnx.merge(base_graph, params["base"]) if base_graph is not None else None
    expert = nnx.merge(expert_graph, params["expert"]) if expert_graph is not None else None
    alpha, temperature, top_p = inputs["alpha"], inputs["temperature"], inputs["top_p"]
    stop_ids, pad_id = inputs["stop_ids"], inputs["pad_id"]
    batch, n = inputs["alpha"].shape[0], settings.max_new_tokens
    placeholder = jnp.zeros((batch, 1), jnp.float32)
    shared = settings.shared_prompts

    def prefill_or_placeholder(model, prompt, lengths):
        if model is None:
            return placeholder, None
        cache = model.new_cache(batch, prompt.shape[1] + n)
        return prefill(model, prompt, lengths, cache)

    if paired is not None:
        lengths = jnp.concatenate([inputs["base_len"], inputs["expert_len"]])
        prompt = inputs["base_prompt"] if shared else jnp.concatenate([inputs["base_prompt"], inputs["expert_prompt"]])
        cache = paired_cache(paired, first_adapted, shared, batch, prompt.shape[1] + n)
        logits, base_cache = paired_prefill(paired, first_adapted, shared, prompt, lengths, cache)
        base_logits, expert_logits, expert_cache = logits[:batch], logits[batch:], None
    else:
        base_logits, base_cache = prefill_or_placeholder(base, inputs["base_prompt"], inputs["base_len"])
        expert_logits, expert_cache = prefill_or_placeholder(expert, inputs["expert_prompt"], inputs["expert_len"])
    risk = jnp.full((batch,), jnp.nan, jnp.float32)
    if settings.alpha_from_expert:
        # Self-reflection from the expert's prefill cache, inside the program: no host sync.
        trie = inputs["opening_trie"]
        prompt = inputs["expert_prompt"] if paired is None or not shared else inputs["base_prompt"]
        last = jnp.take_along_axis(prompt, (inputs["risk_len"] - 1)[:, None], axis=1)[:, 0]
        model, cache = (paired, base_cache) if paired is not None else (expert, expert_cache)
        opening = opening_probabilities(model, cache, paired is not None, first_adapted, shared, last,
                                        inputs["risk_len"], trie.rows, prompt.shape[1], vocab_size)
        risk = risk_from_opening_probabilities(opening, trie)
        alpha = alpha_from_risk_array(risk, inputs["alpha_levels"], inputs["risk_thresholds"])
    f32 = jnp.zeros((batch, n), jnp.float32)
    state = DecodeState(
        step=jnp.int32(0),
        key=inputs["key"],
        base_cache=base_cache,
        expert_cache=expert_cache,
        base_len=inputs["base_len"],
        expert_len=inputs["expert_len"],
        base_logits=base_logits,
        expert_logits=expert_logits,
        v=jnp.full((batch,), settings.gate.v_reset, jnp.float32),
        done=~inputs["active"],
        tokens=jnp.full((batch, n), pad_id, jnp.int32),
        trace_d=f32,
        trace_v=f32,
        trace_spike=jnp.zeros((batch, n), bool),
        trace_alpha=f32,
        cap=jnp.full((batch,), es.NO_CAP, jnp.int32) if settings.early_stop else None,
        triggered=jnp.zeros((batch,), bool) if settings.early_stop else None,
    )
    # Under a mesh every per-sequence array of the loop state (caches, neuron, traces) stays
    # split over the batch axes; without the constraint XLA may replicate freshly created ones.
    state = sh.constrain_batch(state, mesh)

    def choose(s: DecodeState) -> DecodeState:
        """Chooses and records the token at position s.step from the logits in s."""
        scores, d, v, spike, in_force = choose_scores(settings, s, alpha, temperature, top_p, vocab_size)
        if settings.sampling:
            key = jax.random.fold_in(s.key, s.step)
            token = gate.choose_token(scores, key, temperature, settings.sampling_top_k, top_p)
        else:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        token = jnp.where(s.done, pad_id, token)
        live = ~s.done
        record = lambda buf, x: buf.at[:, s.step].set(jnp.where(live, x, jnp.zeros_like(x)))  # noqa: E731
        new = s._replace(
            step=s.step + 1,
            v=jnp.where(live, v, s.v),
            done=s.done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1),
            tokens=s.tokens.at[:, s.step].set(token),
            trace_d=record(s.trace_d, d),
            trace_v=record(s.trace_v, v),
            trace_spike=record(s.trace_spike, spike),
            trace_alpha=record(s.trace_alpha, in_force),
        )
        if settings.early_stop:
            stop, cap, triggered = es.early_stop_step(inputs["early_stop"], settings.early_stop_rule, new.tokens,
                                                      s.step + 1, alpha, s.cap, s.triggered, live)
            new = new._replace(done=new.done | stop, cap=cap, triggered=triggered)
        return sh.constrain_batch(new, mesh)

    def forward(s: DecodeState) -> DecodeState:
        """Feeds the last chosen token to the model(s): the logits for the next choice."""
        token = s.tokens[:, s.step - 1]
        if paired is not None:
            if shared:
                tokens, positions = token[:, None], s.base_len[:, None]
            else:
                tokens = jnp.concatenate([token, token])[:, None]
                positions = jnp.concatenate([s.base_len, s.expert_len])[:, None]
            hidden, cache = paired_forward(paired, first_adapted, shared, tokens, positions, s.base_cache)
            logits = paired.logits(hidden[:, 0])
            base_logits, expert_logits, base_cache, expert_cache = logits[:batch], logits[batch:], cache, None
        else:
            base_logits, base_cache = (s.base_logits, s.base_cache) if base is None else step(
                base, token, s.base_len, s.base_cache)
            expert_logits, expert_cache = (s.expert_logits, s.expert_cache) if expert is None else step(
                expert, token, s.expert_len, s.expert_cache)
        return s._replace(base_cache=base_cache, expert_cache=expert_cache, base_len=s.base_len + 1,
                          expert_len=s.expert_len + 1, base_logits=base_logits, expert_logits=expert_logits)

    def cond(s: DecodeState):
        return (s.step < n) & ~jnp.all(s.done)

    # Choose, then (forward, choose) while a token is still wanted: no forward pass is spent
    # on logits that nothing would read after the last token.
    final = jax.lax.while_loop(cond, lambda s: choose(forward(s)), choose(state))
    outputs = final.tokens, final.trace_d, final.trace_v, final.trace_spike, final.trace_alpha, alpha, risk
    return outputs + (final.cap,) if settings.early_stop else outputs


def next_token_probabilities(graph, vocab_size, params, prompt, lengths):
    model = nnx.merge(graph, params)
    cache = model.new_cache(prompt.shape[0], prompt.shape[1])
    logits, _ = prefill(model, prompt, lengths, cache)
    return probabilities(logits, vocab_size)


def expert_rows_next_token_probabilities(graph, first_adapted, vocab_size, params, prompt, lengths):
    model = nnx.merge(graph, params)
    cache = paired_cache(model, first_adapted, True, prompt.shape[0], prompt.shape[1])
    logits, _ = paired_prefill(model, first_adapted, True, prompt, jnp.concatenate([lengths, lengths]), cache)
    return probabilities(logits[prompt.shape[0]:], vocab_size)


def compiler_options(*params) -> dict | None:
    """XLA options for programs over these parameters.

    XLA's CPU backend converts bf16 weights to fp32 for its matmuls (`model.tie_to_step` keeps
    the conversions inside the decode loop). Its default scheduler orders for concurrency and
    runs every conversion first, since each needs only a weight, so all the fp32 copies are
    alive at once (twice the bf16 model in temporaries); the memory-minimising scheduler
    places each conversion beside its matmul, into a buffer the next one reuses.
    """
    dtypes = {leaf.dtype for p in params if p is not None for leaf in jax.tree_util.tree_leaves(p)}
    if jax.default_backend() == "cpu" and dtypes - {jnp.dtype(jnp.float32)}:
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None
