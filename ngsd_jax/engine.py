"""The fused decoder: prefill, both forward passes, divergence, neuron and token choice in
ONE jitted XLA program per bucket.

One state pytree (tokens, both KV caches, per-sequence potential v, alpha, done flags,
step, trace buffers) is carried through a single `lax.while_loop`; the host sees nothing
until every sequence is done or the budget is spent. Prompts are right-padded to a few
length buckets and the batch to a power of two, with real lengths passed as arrays, so a
new prompt of an already-seen bucket reuses the compiled program.

An expert given as a LoRA adapter over the base (`Engine(base, None, ..., adapter=...)`)
streams the base's weights once per step: base rows and expert rows go through the same
matmuls as one [2B, ...] batch, the adapter's low-rank delta added to the expert rows only
(`lora.attach_expert_rows`). When both row sets have the same prompt, the layers below the
first adapted one compute the same hidden states for both, so they run once on [B] rows
with one KV cache, and the rows are duplicated at the first adapted layer.

`Engine(..., scan_layers=True)` stacks each model's layers (`model.stack_layers`) and runs
them with `lax.scan`: one layer's operations in the program instead of one per layer, so
compile time stays flat in depth (an adapter pair scans two segments: the layers below the
first adapted one, then the adapted ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax import early_stop as es
from ngsd_jax import ngsd
from ngsd_jax import reflection
from ngsd_jax import sharding as sh
from ngsd_jax.config import rope_inverse_frequencies
from ngsd_jax.lora import LoRAAdapter, attach_expert_rows
from ngsd_jax.model import Decoder, init_cache, init_stacked_cache, stack_layers, tie_to_step

MODES = ("ngsd", "base", "expert", "always", "safedecoding")
# Powers of two and the 1.5x steps between them: a prompt pads by at most a third, since
# prefill FLOPs grow with the padded width (batch 8 x 128 tokens is most of a CPU decode).
PROMPT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Everything that shapes the compiled program; a change here means a new compilation."""

    mode: str = "ngsd"
    max_new_tokens: int = 128
    gate: ngsd.GateConfig = ngsd.GateConfig()
    sampling: bool = False  # set by Engine.decode from the temperature; greedy skips the vocabulary sort
    sampling_top_k: int = 0
    safedecoding_first_m: int = 2
    safedecoding_alpha: float = 3.0
    safedecoding_min_common: int = 5
    early_stop: bool = False  # the authors' early stop (spec §5), ngsd mode only; off: not traced at all
    early_stop_rule: es.EarlyStopRule = es.EarlyStopRule()
    shared_prompts: bool = False  # set by Engine.decode: an adapter expert whose prompts are the base's
    alpha_from_expert: bool = False  # set by Engine.decode when given an expert_risk

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")

    @property
    def uses_base(self) -> bool:
        return self.mode != "expert"

    @property
    def uses_expert(self) -> bool:
        return self.mode != "base"


class DecodeState(NamedTuple):
    step: jax.Array  # scalar int32
    key: jax.Array
    base_cache: Any  # with an adapter expert: the one cache of the paired rows (see _paired_forward)
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


@dataclasses.dataclass
class DecodeResult:
    tokens: np.ndarray  # [B, N]; entries past `lengths` are padding
    lengths: np.ndarray  # [B] generated tokens per sequence, stop token included
    divergence: np.ndarray  # [B, N]
    potential: np.ndarray
    spike: np.ndarray
    alpha_in_force: np.ndarray
    alpha: np.ndarray  # [B] the alpha each sequence decoded with
    risk: np.ndarray | None = None  # [B] r from the expert's prefill, when alpha came from it

    def sequence(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


def bucket_length(n: int, buckets=PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"prompt of {n} tokens is longer than the largest bucket ({buckets[-1]})")


def bucket_batch(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_prompts(prompts: list[list[int]], batch: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts into a [batch, bucket] array; rows past len(prompts) are dummies of length 1."""
    array = np.full((batch, bucket_length(max(map(len, prompts)))), pad_id, np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, p in enumerate(prompts):
        array[i, : len(p)] = p
        lengths[i] = len(p)
    return array, lengths


def _prefill(model: Decoder, prompt, lengths, cache):
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    hidden, cache = model(prompt, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def _step(model: Decoder, token, lengths, cache):
    hidden, cache = model(token[:, None], lengths[:, None], cache)
    return model.logits(hidden[:, 0]), cache


def _paired_forward(model: Decoder, first_adapted: int, shared: bool, tokens, positions, cache):
    """One forward of base rows and expert rows over one copy of the weights (a decoder from
    `attach_expert_rows`). Not shared: tokens and positions are [2B, T], base rows first.
    Shared (identical prompts): they are [B, T]; the layers below `first_adapted` run once
    and their cache has B rows; from `first_adapted` on the rows are duplicated."""
    tokens, table = tie_to_step(tokens, model.embedding[...])
    x = jnp.take(table, tokens, axis=0)
    inv_freq = jnp.asarray(rope_inverse_frequencies(model.config))
    if model.scanned:
        new_cache = []
        for (start, stop), segment_cache in zip(_segments(model, first_adapted), cache):
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


def _segments(model: Decoder, first_adapted: int) -> list[tuple[int, int]]:
    """A scanned paired decoder's layer ranges: those below the first adapted layer (no adapter
    there, and one row set when prompts are shared), then the adapted ones."""
    return [(start, stop) for start, stop in ((0, first_adapted), (first_adapted, len(model.layers))) if stop > start]


def _paired_cache(model: Decoder, first_adapted: int, shared: bool, batch: int, max_len: int):
    if model.scanned:
        return tuple(init_stacked_cache(model.config, stop - start, batch if shared and stop <= first_adapted
                                        else 2 * batch, max_len, model.dtype)
                     for start, stop in _segments(model, first_adapted))
    paired = init_cache(model.config, 2 * batch, max_len, model.dtype)
    if not shared:
        return paired
    return init_cache(model.config, batch, max_len, model.dtype)[:first_adapted] + paired[first_adapted:]


def _paired_prefill(model: Decoder, first_adapted: int, shared: bool, prompt, lengths, cache):
    """Logits [2B, V] after each row's prompt; `lengths` is [2B] (base rows, then expert rows)."""
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    hidden, cache = _paired_forward(model, first_adapted, shared, prompt, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def _probabilities(logits, vocab_size):
    # Rows past the real vocabulary (padded embedding tables) never get probability mass.
    return jax.nn.softmax(logits[:, :vocab_size].astype(jnp.float32), axis=-1)


def _choose(settings: DecodeSettings, state: DecodeState, alpha, temperature, top_p, vocab_size):
    """Scores for this step, the neuron update and the trace entries, per the mode."""
    gate = settings.gate
    batch = state.v.shape[0]
    zeros = jnp.zeros((batch,), jnp.float32)
    no_spike = jnp.zeros((batch,), bool)
    if settings.mode == "base":
        return _probabilities(state.base_logits, vocab_size), zeros, state.v, no_spike, zeros
    if settings.mode == "expert":
        return _probabilities(state.expert_logits, vocab_size), zeros, state.v, no_spike, zeros
    p_b = _probabilities(state.base_logits, vocab_size)
    p_e = _probabilities(state.expert_logits, vocab_size)
    d = ngsd.divergence(gate.divergence, p_b, p_e)
    if settings.mode == "ngsd":
        v, spike = ngsd.lif_step(state.v, d, gate)
        # A finished (or batch-padding) row's token is padding whatever it scores; letting it
        # spike would only make the merge below run for nothing.
        spike = spike & ~state.done
        # Most steps fire nowhere in the batch; skip the two top-k passes then.
        scores = jax.lax.cond(jnp.any(spike), lambda: ngsd.ngsd_scores(p_b, p_e, spike, alpha, gate.top_k),
                              lambda: p_b)
        return scores, d, v, spike, jnp.where(spike, alpha, 0.0)
    if settings.mode == "always":
        scores = ngsd.union_top_k_merge(p_b, p_e, alpha, gate.top_k)
        return scores, d, state.v, jnp.ones((batch,), bool), alpha
    # safedecoding: the expert steers only the first m tokens.
    active = state.step < settings.safedecoding_first_m
    # The merge ranks the whole vocabulary twice; after the first m tokens it is not needed.
    scores = jax.lax.cond(active, lambda: ngsd.safedecoding_scores(
        p_b, p_e, settings.safedecoding_alpha, settings.safedecoding_min_common), lambda: p_b)
    in_force = jnp.where(active, settings.safedecoding_alpha, 0.0) * jnp.ones((batch,), jnp.float32)
    return scores, d, state.v, jnp.broadcast_to(active, (batch,)), in_force


def _decode(base_graph, expert_graph, paired_graph, first_adapted, settings: DecodeSettings, vocab_size: int,
            params, inputs, mesh=None):
    paired = nnx.merge(paired_graph, params["paired"]) if paired_graph is not None else None
    base = nnx.merge(base_graph, params["base"]) if base_graph is not None else None
    expert = nnx.merge(expert_graph, params["expert"]) if expert_graph is not None else None
    alpha, temperature, top_p = inputs["alpha"], inputs["temperature"], inputs["top_p"]
    stop_ids, pad_id = inputs["stop_ids"], inputs["pad_id"]
    batch, n = inputs["alpha"].shape[0], settings.max_new_tokens
    placeholder = jnp.zeros((batch, 1), jnp.float32)
    shared = settings.shared_prompts

    def prefill(model, prompt, lengths):
        if model is None:
            return placeholder, None
        cache = model.new_cache(batch, prompt.shape[1] + n)
        return _prefill(model, prompt, lengths, cache)

    if paired is not None:
        lengths = jnp.concatenate([inputs["base_len"], inputs["expert_len"]])
        prompt = inputs["base_prompt"] if shared else jnp.concatenate([inputs["base_prompt"], inputs["expert_prompt"]])
        cache = _paired_cache(paired, first_adapted, shared, batch, prompt.shape[1] + n)
        logits, base_cache = _paired_prefill(paired, first_adapted, shared, prompt, lengths, cache)
        base_logits, expert_logits, expert_cache = logits[:batch], logits[batch:], None
    else:
        base_logits, base_cache = prefill(base, inputs["base_prompt"], inputs["base_len"])
        expert_logits, expert_cache = prefill(expert, inputs["expert_prompt"], inputs["expert_len"])
    risk = jnp.full((batch,), jnp.nan, jnp.float32)
    if settings.alpha_from_expert:
        # Self-reflection from the prefill the decode runs anyway: no extra pass, no host sync.
        risk = reflection.risk_from_refusal_opening(_probabilities(expert_logits, vocab_size),
                                                    inputs["refusal_opening"])
        alpha = reflection.alpha_from_risk_array(risk, inputs["alpha_levels"], inputs["risk_thresholds"])
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
        scores, d, v, spike, in_force = _choose(settings, s, alpha, temperature, top_p, vocab_size)
        if settings.sampling:
            key = jax.random.fold_in(s.key, s.step)
            token = ngsd.choose_token(scores, key, temperature, settings.sampling_top_k, top_p)
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
            hidden, cache = _paired_forward(paired, first_adapted, shared, tokens, positions, s.base_cache)
            logits = paired.logits(hidden[:, 0])
            base_logits, expert_logits, base_cache, expert_cache = logits[:batch], logits[batch:], cache, None
        else:
            base_logits, base_cache = (s.base_logits, s.base_cache) if base is None else _step(
                base, token, s.base_len, s.base_cache)
            expert_logits, expert_cache = (s.expert_logits, s.expert_cache) if expert is None else _step(
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


class Engine:
    """Holds a base/expert pair split into pure parameter pytrees and one jitted program per bucket.

    The expert is either a model of its own or `adapter`, a LoRA adapter over `base`'s own
    weights (then `expert` is None and the pair streams one copy of the weights per step).
    `scan_layers` stacks the models' layers IN PLACE (`model.stack_layers`) and scans them;
    models stacked before run scanned whatever it says.
    """

    def __init__(self, base: Decoder | None, expert: Decoder | None, vocab_size: int, stop_ids, pad_id: int = 0,
                 early_stop_tables: es.EarlyStopTables | None = None, adapter: LoRAAdapter | None = None,
                 mesh=None, scan_layers: bool = False):
        """`mesh` (a ngsd_jax.sharding mesh; models already placed on it with `shard_model`)
        splits the batch over its data and fsdp axes."""
        if base is None and expert is None:
            raise ValueError("an engine needs at least one model")
        if adapter is not None and (base is None or expert is not None):
            raise ValueError("an adapter expert needs the base it adapts and no separate expert model")
        self.vocab_size = int(vocab_size)
        for name, model in (("base", base), ("expert", expert)):
            if model is not None and model.config.vocab_size < self.vocab_size:
                raise ValueError(f"{name} model has {model.config.vocab_size} embedding rows, fewer than the "
                                 f"tokenizer's {self.vocab_size} tokens; the pair does not share a vocabulary")
        if scan_layers:
            base, expert = (None if m is None else stack_layers(m) for m in (base, expert))
        self.base_graph, self.base_params = nnx.split(base) if base is not None else (None, None)
        self.expert_graph, self.expert_params = nnx.split(expert) if expert is not None else (None, None)
        self.base_config = None if base is None else base.config
        self.expert_config = None if expert is None else expert.config
        self.paired_graph = self.paired_params = None
        self.first_adapted = None
        if adapter is not None:
            paired = attach_expert_rows(base, adapter)
            if mesh is not None:  # the base is placed already; its adapter goes beside each weight it adapts
                sh.shard_model(paired, mesh)
            self.paired_graph, self.paired_params = nnx.split(paired)
            self.first_adapted = min(adapter.layers)
            self.expert_config = base.config
        self.stop_ids = _stop_array(stop_ids)
        self.pad_id = int(pad_id)
        # Needed only by ngsd settings with early_stop=True; on the device once (the automaton is V x ~120).
        self.early_stop_tables = None if early_stop_tables is None else jax.device_put(early_stop_tables)
        self.compilations = 0
        self.mesh = mesh
        self.output_sharding = None  # the generated tokens' placement in the last decode
        options = _compiler_options(self.base_params, self.expert_params, self.paired_params)
        self._jitted = jax.jit(self._traced, static_argnums=(0, 1, 2, 3, 4, 5), compiler_options=options)
        self._prefill_jitted = jax.jit(_next_token_probabilities, static_argnums=(0, 1), compiler_options=options)
        self._expert_rows_prefill_jitted = jax.jit(_expert_rows_next_token_probabilities, static_argnums=(0, 1, 2),
                                                   compiler_options=options)

    @property
    def has_adapter(self) -> bool:
        return self.paired_graph is not None

    def _traced(self, base_graph, expert_graph, paired_graph, first_adapted, settings, vocab_size, params, inputs):
        self.compilations += 1  # runs only while tracing, so it counts compilations
        return _decode(base_graph, expert_graph, paired_graph, first_adapted, settings, vocab_size, params, inputs,
                       self.mesh)

    def decode(
        self,
        base_prompts: list[list[int]],
        expert_prompts: list[list[int]] | None = None,
        settings: DecodeSettings = DecodeSettings(),
        alpha=0.5,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids=None,
        early_stop_tables: es.EarlyStopTables | None = None,
        expert_risk: reflection.ExpertRisk | None = None,
    ) -> DecodeResult:
        """Decodes a batch. `expert_prompts` (same user messages in the expert's own chat format)
        default to the base prompts; `alpha` is a scalar or one value per prompt; `stop_ids`
        replaces the engine's stop tokens for this call; `early_stop_tables` (else the engine's)
        serve settings with early_stop=True. With `expert_risk`, `alpha` is ignored: each
        sequence's alpha is set inside the program from the expert's probability of opening
        with a refusal (`--reflect expert`)."""
        arguments, real, stops = self._program_arguments(base_prompts, expert_prompts, settings, alpha, temperature,
                                                         top_p, seed, stop_ids, early_stop_tables, expert_risk)
        outputs = self._jitted(*arguments)
        self.output_sharding = outputs[0].sharding
        tokens, d, v, spike, alpha_in_force, row_alpha, risk, *cap = (sh.fetch(x)[:real] for x in outputs)
        lengths = _generated_lengths(tokens, stops)
        if cap:  # an early-stopped row's cap is its length
            lengths = np.minimum(lengths, cap[0]).astype(np.int32)
        return DecodeResult(tokens, lengths, d, v, spike, alpha_in_force, row_alpha,
                            risk if expert_risk is not None else None)

    def lower(self, base_prompts: list[list[int]], settings: DecodeSettings = DecodeSettings()) -> jax.stages.Lowered:
        """The program `decode` would run for these prompts, lowered without running it: its
        `.compile().memory_analysis()` gives the arguments and temporaries it needs, and the
        engine's parameters may be abstract (`jax.ShapeDtypeStruct`, e.g. from `abstract_decoder`)."""
        arguments, _, _ = self._program_arguments(base_prompts, None, settings, 0.5, 0.0, 1.0, 0, None, None, None)
        return self._jitted.lower(*arguments)

    def _program_arguments(self, base_prompts, expert_prompts, settings, alpha, temperature, top_p, seed, stop_ids,
                           early_stop_tables, expert_risk):
        """The jitted program's arguments for a batch, its real size and the stop tokens in force."""
        expert_prompts = base_prompts if expert_prompts is None else expert_prompts
        if len(expert_prompts) != len(base_prompts):
            raise ValueError("base and expert prompts must be the same batch")
        has_expert = self.expert_graph is not None or self.has_adapter
        if settings.uses_base and self.base_graph is None or settings.uses_expert and not has_expert:
            raise ValueError(f"mode '{settings.mode}' needs a model this engine was not given")
        paired = self.has_adapter and settings.uses_expert
        # The authors early-stop inside NGSD only: every other mode decodes its answers whole.
        settings = dataclasses.replace(settings, sampling=bool((np.asarray(temperature) > 0).any()),
                                       early_stop=settings.early_stop and settings.mode == "ngsd",
                                       shared_prompts=paired and list(map(list, expert_prompts)) == list(
                                           map(list, base_prompts)),
                                       alpha_from_expert=expert_risk is not None)
        if expert_risk is not None and not settings.uses_expert:
            raise ValueError(f"expert_risk needs the expert, which mode '{settings.mode}' does not run")
        tables = self.early_stop_tables if early_stop_tables is None else early_stop_tables
        if settings.early_stop:
            if tables is None:
                raise ValueError("early_stop needs token tables: early_stop.early_stop_tables(tokenizer, vocab_size)")
            if len(tables.ends_sentence) != self.vocab_size:
                raise ValueError(f"early-stop tables cover {len(tables.ends_sentence)} tokens, the engine "
                                 f"{self.vocab_size}")
        real = len(base_prompts)
        batch = sh.pad_batch(bucket_batch(real), self.mesh)
        # Only the models this mode runs, and the real lengths: cache slots past them are masked.
        for name, config, prompts in (("base", self.base_config if settings.uses_base else None, base_prompts),
                                      ("expert", self.expert_config if settings.uses_expert else None, expert_prompts)):
            if config is not None and any(len(p) == 0 for p in prompts):
                raise ValueError(f"an empty {name} prompt: every prompt needs at least one token")
            if config is not None:
                config.check_sequence_length(max(map(len, prompts)) + settings.max_new_tokens, name)

        base_prompt, base_len = pack_prompts(base_prompts, batch, self.pad_id)
        expert_prompt, expert_len = pack_prompts(expert_prompts, batch, self.pad_id)
        if paired and base_prompt.shape[1] != expert_prompt.shape[1]:  # the row sets share one [2B, T] prefill
            width = max(base_prompt.shape[1], expert_prompt.shape[1])
            widen = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=self.pad_id)  # noqa: E731
            base_prompt, expert_prompt = widen(base_prompt), widen(expert_prompt)
        stops = self.stop_ids if stop_ids is None else _stop_array(stop_ids)
        inputs = {
            "base_prompt": base_prompt,
            "base_len": base_len,
            "expert_prompt": expert_prompt,
            "expert_len": expert_len,
            "alpha": _per_row("alpha", alpha, real, batch),
            "temperature": _per_row("temperature", temperature, real, batch),
            "top_p": _per_row("top_p", top_p, real, batch),
            "active": np.arange(batch) < real,
            "stop_ids": stops,
            "pad_id": np.int32(self.pad_id),
            "key": jax.random.key(seed),
        }
        if self.mesh is not None:
            inputs = self._place_batch(inputs)
        if settings.early_stop:
            inputs["early_stop"] = tables
        if expert_risk is not None:
            inputs["refusal_opening"] = np.asarray(expert_risk.opening_mask, np.float32)[: self.vocab_size]
            inputs["alpha_levels"] = np.asarray(expert_risk.mapping.levels, np.float32)
            inputs["risk_thresholds"] = np.asarray(expert_risk.mapping.thresholds, np.float32)
        if paired:
            graphs, params = (None, None, self.paired_graph), {"paired": self.paired_params}
        else:
            graphs = (self.base_graph if settings.uses_base else None,
                      self.expert_graph if settings.uses_expert else None, None)
            params = {"base": self.base_params if settings.uses_base else None,
                      "expert": self.expert_params if settings.uses_expert else None}
        arguments = (*graphs, self.first_adapted if paired else None, settings, self.vocab_size, params, inputs)
        return arguments, real, stops

    def next_token_distribution(self, prompts: list[list[int]], model: str = "base") -> np.ndarray:
        """p(next token) after each prompt, from one prefill: [len(prompts), vocab_size] fp32."""
        config = self.base_config if model == "base" else self.expert_config
        config.check_sequence_length(max(map(len, prompts)), model)
        array, lengths = pack_prompts(prompts, sh.pad_batch(bucket_batch(len(prompts)), self.mesh), self.pad_id)
        if self.mesh is not None:
            array, lengths = self._place_batch({"array": array, "lengths": lengths}).values()
        if model == "expert" and self.has_adapter:
            probabilities = self._expert_rows_prefill_jitted(self.paired_graph, self.first_adapted, self.vocab_size,
                                                             self.paired_params, array, lengths)
            return sh.fetch(probabilities)[: len(prompts)]
        graph, params = (self.base_graph, self.base_params) if model == "base" else (
            self.expert_graph, self.expert_params)
        probabilities = self._prefill_jitted(graph, self.vocab_size, params, array, lengths)
        return sh.fetch(probabilities)[: len(prompts)]

    def _place_batch(self, inputs: dict) -> dict:
        """The per-sequence host arrays onto the mesh, split over its batch axes (the rest replicated)."""
        return {k: sh.place_rows(x, sh.batch_sharding(self.mesh, x.ndim)) if k in _PER_SEQUENCE else x
                for k, x in inputs.items()}


_PER_SEQUENCE = ("base_prompt", "base_len", "expert_prompt", "expert_len", "alpha", "temperature", "top_p", "active",
                 "array", "lengths")


def _per_row(name: str, value, real: int, batch: int) -> np.ndarray:
    """A scalar or one value per prompt as [batch] float32 (padding rows repeat real ones).

    Checked here because inside the program a NaN alpha or temperature silently turns every
    score of its row into NaN, and a list of the wrong length would be cut or repeated."""
    array = np.asarray(value, np.float32)
    if array.ndim:
        chex.assert_shape(array, (real,), custom_message=f"{name}: give a scalar or one value per prompt")
    chex.assert_tree_all_finite(array, custom_message=f"{name} must be finite")
    return np.resize(np.broadcast_to(array, (real,)), (batch,))


def _next_token_probabilities(graph, vocab_size, params, prompt, lengths):
    model = nnx.merge(graph, params)
    cache = model.new_cache(prompt.shape[0], prompt.shape[1])
    logits, _ = _prefill(model, prompt, lengths, cache)
    return _probabilities(logits, vocab_size)


def _compiler_options(*params) -> dict | None:
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


def _expert_rows_next_token_probabilities(graph, first_adapted, vocab_size, params, prompt, lengths):
    model = nnx.merge(graph, params)
    cache = _paired_cache(model, first_adapted, True, prompt.shape[0], prompt.shape[1])
    logits, _ = _paired_prefill(model, first_adapted, True, prompt, jnp.concatenate([lengths, lengths]), cache)
    return _probabilities(logits[prompt.shape[0]:], vocab_size)


def _stop_array(stop_ids) -> np.ndarray:
    # -1 never matches a token, and keeps the array non-empty when there are no stops.
    return np.asarray(sorted(set(int(t) for t in stop_ids)) or [-1], np.int32)


def _generated_lengths(tokens: np.ndarray, stop_ids: np.ndarray) -> np.ndarray:
    is_stop = np.isin(tokens, stop_ids)
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int32)
