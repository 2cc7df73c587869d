"""The fused decoder: prefill, both forward passes, divergence, neuron and token choice in
ONE jitted XLA program per bucket.

One state pytree (tokens, both KV caches, per-sequence potential v, alpha, done flags,
step, trace buffers) is carried through a single `lax.while_loop`; the host sees nothing
until every sequence is done or the budget is spent. Prompts are right-padded to a few
length buckets and the batch to a power of two, with real lengths passed as arrays, so a
new prompt of an already-seen bucket reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax import early_stop as es
from ngsd_jax import ngsd
from ngsd_jax import reflection
from ngsd_jax.model import Decoder, init_cache

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
    early_stop: bool = False  # the reference's early-stop heuristic (spec §5); off: not traced at all
    early_stop_rule: es.EarlyStopRule = es.EarlyStopRule()
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
    base_cache: Any
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
        # Most steps fire nowhere in the batch; skip the two top-k passes then.
        scores = jax.lax.cond(jnp.any(spike), lambda: ngsd.ngsd_scores(p_b, p_e, spike, alpha, gate.top_k),
                              lambda: p_b)
        return scores, d, v, spike, jnp.where(spike, alpha, 0.0)
    if settings.mode == "always":
        scores = ngsd.union_top_k_merge(p_b, p_e, alpha, gate.top_k)
        return scores, d, state.v, jnp.ones((batch,), bool), alpha
    # safedecoding: the expert steers only the first m tokens.
    active = state.step < settings.safedecoding_first_m
    merged = ngsd.safedecoding_scores(p_b, p_e, settings.safedecoding_alpha, settings.safedecoding_min_common)
    scores = jnp.where(active, merged, p_b)
    in_force = jnp.where(active, settings.safedecoding_alpha, 0.0) * jnp.ones((batch,), jnp.float32)
    return scores, d, state.v, jnp.broadcast_to(active, (batch,)), in_force


def _decode(base_graph, expert_graph, settings: DecodeSettings, vocab_size: int, params, inputs):
    base = nnx.merge(base_graph, params["base"]) if settings.uses_base else None
    expert = nnx.merge(expert_graph, params["expert"]) if settings.uses_expert else None
    alpha, temperature, top_p = inputs["alpha"], inputs["temperature"], inputs["top_p"]
    stop_ids, pad_id = inputs["stop_ids"], inputs["pad_id"]
    batch, n = inputs["alpha"].shape[0], settings.max_new_tokens
    placeholder = jnp.zeros((batch, 1), jnp.float32)

    def prefill(model, prompt, lengths):
        if model is None:
            return placeholder, None
        cache = init_cache(model.config, batch, prompt.shape[1] + n, model.dtype)
        return _prefill(model, prompt, lengths, cache)

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

    def body(s: DecodeState) -> DecodeState:
        scores, d, v, spike, in_force = _choose(settings, s, alpha, temperature, top_p, vocab_size)
        if settings.sampling:
            key = jax.random.fold_in(s.key, s.step)
            token = ngsd.choose_token(scores, key, temperature, settings.sampling_top_k, top_p)
        else:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        token = jnp.where(s.done, pad_id, token)
        live = ~s.done
        record = lambda buf, x: buf.at[:, s.step].set(jnp.where(live, x, jnp.zeros_like(x)))  # noqa: E731
        base_logits, base_cache = (s.base_logits, s.base_cache) if base is None else _step(
            base, token, s.base_len, s.base_cache)
        expert_logits, expert_cache = (s.expert_logits, s.expert_cache) if expert is None else _step(
            expert, token, s.expert_len, s.expert_cache)
        new = DecodeState(
            step=s.step + 1,
            key=s.key,
            base_cache=base_cache,
            expert_cache=expert_cache,
            base_len=s.base_len + 1,
            expert_len=s.expert_len + 1,
            base_logits=base_logits,
            expert_logits=expert_logits,
            v=jnp.where(live, v, s.v),
            done=s.done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1),
            tokens=s.tokens.at[:, s.step].set(token),
            trace_d=record(s.trace_d, d),
            trace_v=record(s.trace_v, v),
            trace_spike=record(s.trace_spike, spike),
            trace_alpha=record(s.trace_alpha, in_force),
            cap=s.cap,
            triggered=s.triggered,
        )
        if settings.early_stop:
            stop, cap, triggered = es.early_stop_step(inputs["early_stop"], settings.early_stop_rule, new.tokens,
                                                      s.step + 1, token, alpha, s.cap, s.triggered, live)
            new = new._replace(done=new.done | stop, cap=cap, triggered=triggered)
        return new

    def cond(s: DecodeState):
        return (s.step < n) & ~jnp.all(s.done)

    final = jax.lax.while_loop(cond, body, state)
    outputs = final.tokens, final.trace_d, final.trace_v, final.trace_spike, final.trace_alpha, alpha, risk
    return outputs + (final.cap,) if settings.early_stop else outputs


class Engine:
    """Holds a base/expert pair split into pure parameter pytrees and one jitted program per bucket."""

    def __init__(self, base: Decoder | None, expert: Decoder | None, vocab_size: int, stop_ids, pad_id: int = 0,
                 early_stop_tables: es.EarlyStopTables | None = None):
        if base is None and expert is None:
            raise ValueError("an engine needs at least one model")
        self.vocab_size = int(vocab_size)
        for name, model in (("base", base), ("expert", expert)):
            if model is not None and model.config.vocab_size < self.vocab_size:
                raise ValueError(f"{name} model has {model.config.vocab_size} embedding rows, fewer than the "
                                 f"tokenizer's {self.vocab_size} tokens; the pair does not share a vocabulary")
        self.base_graph, self.base_params = nnx.split(base) if base is not None else (None, None)
        self.expert_graph, self.expert_params = nnx.split(expert) if expert is not None else (None, None)
        self.base_config = None if base is None else base.config
        self.expert_config = None if expert is None else expert.config
        self.stop_ids = _stop_array(stop_ids)
        self.pad_id = int(pad_id)
        self.early_stop_tables = early_stop_tables  # needed only by settings with early_stop=True
        self.compilations = 0
        self._jitted = jax.jit(self._traced, static_argnums=(0, 1, 2, 3))
        self._prefill_jitted = jax.jit(_next_token_probabilities, static_argnums=(0, 1))

    def _traced(self, base_graph, expert_graph, settings, vocab_size, params, inputs):
        self.compilations += 1  # runs only while tracing, so it counts compilations
        return _decode(base_graph, expert_graph, settings, vocab_size, params, inputs)

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
        expert_prompts = base_prompts if expert_prompts is None else expert_prompts
        if len(expert_prompts) != len(base_prompts):
            raise ValueError("base and expert prompts must be the same batch")
        if settings.uses_base and self.base_graph is None or settings.uses_expert and self.expert_graph is None:
            raise ValueError(f"mode '{settings.mode}' needs a model this engine was not given")
        settings = dataclasses.replace(settings, sampling=bool((np.asarray(temperature) > 0).any()),
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
        batch = bucket_batch(real)
        for name, config, prompts in (("base", self.base_config, base_prompts),
                                      ("expert", self.expert_config, expert_prompts)):
            if config is not None and any(len(p) == 0 for p in prompts):
                raise ValueError(f"an empty {name} prompt: every prompt needs at least one token")
            if config is not None:
                config.check_sequence_length(bucket_length(max(map(len, prompts))) + settings.max_new_tokens)

        base_prompt, base_len = pack_prompts(base_prompts, batch, self.pad_id)
        expert_prompt, expert_len = pack_prompts(expert_prompts, batch, self.pad_id)
        stops = self.stop_ids if stop_ids is None else _stop_array(stop_ids)
        per_row = lambda x: np.resize(np.broadcast_to(np.asarray(x, np.float32), (real,)), (batch,))  # noqa: E731
        inputs = {
            "base_prompt": base_prompt,
            "base_len": base_len,
            "expert_prompt": expert_prompt,
            "expert_len": expert_len,
            "alpha": per_row(alpha),
            "temperature": per_row(temperature),
            "top_p": per_row(top_p),
            "active": np.arange(batch) < real,
            "stop_ids": stops,
            "pad_id": np.int32(self.pad_id),
            "key": jax.random.key(seed),
        }
        if settings.early_stop:
            inputs["early_stop"] = tables
        if expert_risk is not None:
            inputs["refusal_opening"] = np.asarray(expert_risk.opening_mask, np.float32)[: self.vocab_size]
            inputs["alpha_levels"] = np.asarray(expert_risk.mapping.levels, np.float32)
            inputs["risk_thresholds"] = np.asarray(expert_risk.mapping.thresholds, np.float32)
        params = {"base": self.base_params if settings.uses_base else None,
                  "expert": self.expert_params if settings.uses_expert else None}
        outputs = self._jitted(self.base_graph if settings.uses_base else None,
                               self.expert_graph if settings.uses_expert else None,
                               settings, self.vocab_size, params, inputs)
        tokens, d, v, spike, alpha_in_force, row_alpha, risk, *cap = (
            np.asarray(x)[:real] for x in jax.device_get(outputs))
        lengths = _generated_lengths(tokens, stops)
        if cap:  # an early-stopped row's cap is its length
            lengths = np.minimum(lengths, cap[0]).astype(np.int32)
        return DecodeResult(tokens, lengths, d, v, spike, alpha_in_force, row_alpha,
                            risk if expert_risk is not None else None)

    def next_token_distribution(self, prompts: list[list[int]], model: str = "base") -> np.ndarray:
        """p(next token) after each prompt, from one prefill: [len(prompts), vocab_size] fp32."""
        graph, params = (self.base_graph, self.base_params) if model == "base" else (
            self.expert_graph, self.expert_params)
        array, lengths = pack_prompts(prompts, bucket_batch(len(prompts)), self.pad_id)
        probabilities = self._prefill_jitted(graph, self.vocab_size, params, array, lengths)
        return np.asarray(jax.device_get(probabilities))[: len(prompts)]


def _next_token_probabilities(graph, vocab_size, params, prompt, lengths):
    model = nnx.merge(graph, params)
    cache = init_cache(model.config, prompt.shape[0], prompt.shape[1], model.dtype)
    logits, _ = _prefill(model, prompt, lengths, cache)
    return _probabilities(logits, vocab_size)


def _stop_array(stop_ids) -> np.ndarray:
    # -1 never matches a token, and keeps the array non-empty when there are no stops.
    return np.asarray(sorted(set(int(t) for t in stop_ids)) or [-1], np.int32)


def _generated_lengths(tokens: np.ndarray, stop_ids: np.ndarray) -> np.ndarray:
    is_stop = np.isin(tokens, stop_ids)
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int32)
