"""The slot engine: continuous batching over a fixed number of decode slots (JetStream's
prefill / insert / generate, over the traced pieces of `ngsd_jax.decoding.program`).

One state pytree holds `slots` rows, one request each: both models' KV caches (or the
paired cache of an adapter expert), next-token logits, the neuron potential, alpha, the
LIF settings, sampling settings, position, generated count, budget and done flag.

- `prefill(request)` runs one prompt (padded to a length bucket) into fresh [1, context]
  caches: one compiled program per bucket. With the expert reflecting, the row's alpha is
  set there from the expert's probability of opening its answer with a refusal, whole, read
  from the request's own prefill cache at its prompt's end (`--reflect expert`: one
  teacher-forced pass over the opening trie, `program.opening_probabilities`, as
  `Engine.decode` does it).
- `insert(prefix, slot)` writes those rows into the state at `slot` and resets the slot's
  neuron, counters and settings: one program.
- `generate()` runs `chunk` steps over all slots at once (choose, then forward, per step,
  exactly as `Engine.decode`'s loop: `program.choose_scores`, `program.step`,
  `program.paired_forward`) and returns each step's token and gate telemetry per slot: a
  greedy and a sampling program per batch width (powers of two up to `slots`), since a
  request takes the lowest free slot and a chunk runs over the narrowest width holding every
  slot in use.

A row never reads another row, so a request's greedy tokens do not depend on what else is
in the batch or on the step it joined at. Rows that are done (finished, cancelled or never
filled) choose padding and keep their potential and positions.

Only the modes that a per-row flag can express are served: `ngsd` and `base` (a `base`
request runs the ngsd program with its neuron held silent, so its token is the base's own
choice). The LIF numbers (tau, threshold, soft reset, v reset) and alpha are per row;
the merge's K and the divergence are fixed per server, since they shape the program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngsd_jax.decoding import program
from ngsd_jax.decoding.batching import PROMPT_BUCKETS, bucket_length
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.gate import GateConfig, choose_token, gate_problem
from ngsd_jax.decoding.program import DecodeState
from ngsd_jax.decoding.risk import ExpertRisk, alpha_from_risk_array, risk_from_opening_probabilities

SERVING_MODES = ("ngsd", "base")


class ServingError(ValueError):
    """A request or configuration the slot engine cannot serve; one line."""


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """What shapes the compiled programs: a change here means new compilations."""

    slots: int = 4
    context: int = 512  # tokens per slot: prompt and completion together
    chunk: int = 8  # decode steps per generate call
    mode: str = "ngsd"  # the server's mode; requests may choose "base" when it is "ngsd"
    gate: GateConfig = GateConfig()  # top_k and divergence for every row; the rest: defaults per row
    sampling_top_k: int = 0
    # An adapter expert whose prompt is every request's base prompt: the layers below the first
    # adapted one then run once per slot, not once per row set (as Engine.decode does for such
    # prompts); a request with an expert prompt of its own is refused.
    shared_prompts: bool = False

    def __post_init__(self):
        if self.mode not in SERVING_MODES:
            raise ServingError(f"serve supports the modes {', '.join(SERVING_MODES)}, not '{self.mode}'")
        if self.slots < 1 or self.chunk < 1:
            raise ServingError("slots and chunk must be >= 1")
        if self.context < 2:
            raise ServingError("context must be >= 2 tokens")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Prompt widths with a prefill program: the engine's buckets up to the context, and the context."""
        inside = tuple(b for b in PROMPT_BUCKETS if b < self.context)
        return inside + (self.context,)

    def bucket(self, n: int) -> int:
        return bucket_length(n, self.buckets)


@dataclasses.dataclass
class SlotRequest:
    """One request as the slot engine sees it (token ids and numbers, already checked)."""

    base_prompt: list[int]
    expert_prompt: list[int] | None = None  # default: the base prompt
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    steer: bool = True  # False: mode "base", the base's own choice at every step
    alpha: float | None = None  # None: the server's alpha (reflected from the expert when it reflects)
    # The expert prompt's tokens the risk reads (None: all; a prompt ending with forced answer
    # text gives the length before it, as Engine.decode's risk_lengths)
    risk_length: int | None = None
    tau: float | None = None  # None: the server's gate settings
    threshold: float | None = None
    soft_reset: float | None = None
    v_reset: float | None = None


class Prefix(NamedTuple):
    """A prefilled request's rows (device arrays), to be inserted into a slot."""

    base_cache: Any
    expert_cache: Any
    base_logits: jax.Array  # [1, V]
    expert_logits: jax.Array
    alpha: jax.Array  # [1]
    risk: jax.Array  # [1], NaN unless alpha came from the expert


class SlotState(NamedTuple):
    base_cache: Any  # an adapter pair: the paired cache, base rows [0, S), expert rows [S, 2S)
    expert_cache: Any
    base_len: jax.Array  # [S] next write position
    expert_len: jax.Array
    base_logits: jax.Array  # [S, V] logits for the next choice
    expert_logits: jax.Array
    v: jax.Array  # [S] neuron potential
    alpha: jax.Array
    steer: jax.Array  # [S] bool
    tau: jax.Array
    threshold: jax.Array
    soft_reset: jax.Array
    v_reset: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    seed: jax.Array  # [S] uint32
    step: jax.Array  # [S] tokens generated
    max_tokens: jax.Array
    done: jax.Array  # [S] bool


class _RowGate(NamedTuple):
    """`gate.GateConfig` with the LIF numbers per row ([S] arrays; `gate.lif_step` broadcasts them)."""

    tau: Any
    threshold: Any
    v_reset: Any
    soft_reset: Any
    top_k: int
    divergence: str


class _RowSettings(NamedTuple):
    """What `program.choose_scores` reads of DecodeSettings."""

    mode: str
    gate: _RowGate


@dataclasses.dataclass
class Chunk:
    """One generate call on the host: per slot, per step. `valid[s, t]`: slot s chose a token at step t."""

    tokens: np.ndarray  # [S, C]
    valid: np.ndarray
    divergence: np.ndarray
    potential: np.ndarray
    spike: np.ndarray
    alpha: np.ndarray  # alpha in force (0 where the base choice stood)
    steered: np.ndarray  # spiked and chose other than the base's most probable token
    done: np.ndarray  # [S] after the chunk


@dataclasses.dataclass
class Inserted:
    """What insert tells the host about the request it placed."""

    slot: int
    alpha: float
    risk: float | None


class SlotEngine:
    """Continuous batching over an `Engine`'s models (its graphs, parameters, stop and pad ids).

    `alpha` is the server's alpha for requests that give none, unless `expert_risk` is given:
    then such requests get theirs from the expert's prefill (`--reflect expert`)."""

    def __init__(self, engine: Engine, config: SlotConfig = SlotConfig(), alpha: float = 0.5,
                 expert_risk: ExpertRisk | None = None):
        if engine.mesh is not None:
            raise ServingError("serve runs on one device; drop --mesh")
        if engine.base_graph is None:
            raise ServingError("serve needs the base model")
        uses_expert = config.mode != "base"
        if uses_expert and engine.expert_graph is None and not engine.has_adapter:
            raise ServingError("mode 'ngsd' needs an expert model")
        if expert_risk is not None and not uses_expert:
            raise ServingError("--reflect expert needs the expert, which mode 'base' does not run")
        engine.base_config.check_sequence_length(config.context, "base")  # a slot may fill its whole context
        if uses_expert:
            engine.expert_config.check_sequence_length(config.context, "expert")
        self.config = config
        self.engine = engine
        self.vocab_size = engine.vocab_size
        # An adapter pair runs every request in the paired layout, the base alone too (as
        # `Engine.decode` does): a base row is then the very computation of the base rows beside
        # the expert's.
        self.paired = engine.has_adapter
        self.shared = self.paired and config.shared_prompts
        self.uses_expert = uses_expert
        self.expert_risk = expert_risk
        self.alpha = float(alpha)
        self.stop_ids = np.asarray(engine.stop_ids, np.int32)
        self.pad_id = engine.pad_id
        if self.paired:
            self.params = {"paired": engine.paired_params}
            scanned = nnx.merge(engine.paired_graph, engine.paired_params).scanned
        else:
            self.params = {"base": engine.base_params, "expert": engine.expert_params if uses_expert else None}
            scanned = nnx.merge(engine.base_graph, engine.base_params).scanned
            if uses_expert and nnx.merge(engine.expert_graph, engine.expert_params).scanned != scanned:
                raise ServingError("base and expert must both be scanned or both unrolled")
        self.batch_axis = 1 if scanned else 0  # stacked caches are [layers, batch, ...]
        self.compilations = 0  # programs traced (each is compiled once), counted while tracing
        options = program.compiler_options(*self.params.values())
        self._init_jit = jax.jit(self._init_traced, compiler_options=options)
        self._prefill_jit = jax.jit(self._prefill_traced, compiler_options=options)
        self._insert_jit = jax.jit(self._insert_traced, donate_argnums=(0,), compiler_options=options)
        self._generate_jit = jax.jit(self._generate_traced, static_argnums=(0, 1), donate_argnums=(3,),
                                     compiler_options=options)
        self.state = self._init_jit(self.params)
        self.active = np.zeros((config.slots,), bool)  # host view: slots holding a request
        self._cancel = np.zeros((config.slots,), bool)
        self._sampling = np.zeros((config.slots,), bool)

    # --- host API ---------------------------------------------------------------------------

    @property
    def free_slots(self) -> list[int]:
        return [i for i in range(self.config.slots) if not self.active[i]]

    def check(self, request: SlotRequest) -> None:
        """Refuses, in one line, a request that cannot run (prompt past the context, empty prompt)."""
        prompts = [request.base_prompt] + ([request.expert_prompt] if request.expert_prompt is not None else [])
        if any(len(p) == 0 for p in prompts):
            raise ServingError("empty prompt: it needs at least one token")
        if request.max_tokens < 1:
            raise ServingError("max_tokens must be >= 1")
        expert_len = len(request.base_prompt if request.expert_prompt is None else request.expert_prompt)
        if request.risk_length is not None and not 1 <= request.risk_length <= expert_len:
            raise ServingError("risk_length must lie in 1..the length of the expert prompt")
        if self.shared and request.expert_prompt is not None and list(request.expert_prompt) != list(
                request.base_prompt):
            raise ServingError("this server runs the adapter expert on the base's prompts; the expert's differs")
        longest = max(map(len, prompts))
        if longest + request.max_tokens > self.config.context:
            raise ServingError(f"this model's context is {self.config.context} tokens; the prompt has {longest} "
                               f"and max_tokens asks for {request.max_tokens} more")
        problem = gate_problem({**self._gate_defaults(request), "top_k": self.config.gate.top_k,
                                     "divergence": self.config.gate.divergence})
        if problem:
            raise ServingError(problem)

    def prefill(self, request: SlotRequest) -> Prefix:
        self.check(request)
        expert_prompt = request.base_prompt if request.expert_prompt is None else request.expert_prompt
        width = self.config.bucket(max(len(request.base_prompt), len(expert_prompt)))

        def pad(prompt):
            row = np.full((1, width), self.pad_id, np.int32)
            row[0, : len(prompt)] = prompt
            return row

        from_expert = self.expert_risk is not None and request.alpha is None
        alpha = self.alpha if request.alpha is None else request.alpha
        inputs = {"base_prompt": pad(request.base_prompt), "expert_prompt": pad(expert_prompt),
                  "base_len": np.array([len(request.base_prompt)], np.int32),
                  "expert_len": np.array([len(expert_prompt)], np.int32),
                  "alpha": np.array([alpha], np.float32), "from_expert": np.array(from_expert)}
        if self.expert_risk is not None:
            inputs["risk_len"] = np.array([len(expert_prompt) if request.risk_length is None
                                           else request.risk_length], np.int32)
            inputs["opening_trie"] = self.expert_risk.trie
            inputs["alpha_levels"] = np.asarray(self.expert_risk.mapping.levels, np.float32)
            inputs["risk_thresholds"] = np.asarray(self.expert_risk.mapping.thresholds, np.float32)
        return self._prefill_jit(self.params, inputs)

    def insert(self, prefix: Prefix, slot: int, request: SlotRequest) -> Inserted:
        """Places a prefilled request into a free slot, its neuron and counters reset."""
        if self.active[slot]:
            raise ServingError(f"slot {slot} is busy")
        gate = self._gate_defaults(request)
        row = {"slot": np.int32(slot),
               "base_len": np.int32(len(request.base_prompt)),
               "expert_len": np.int32(len(request.base_prompt if request.expert_prompt is None
                                          else request.expert_prompt)),
               "steer": np.bool_(request.steer and self.config.mode == "ngsd"),
               "temperature": np.float32(request.temperature), "top_p": np.float32(request.top_p),
               "seed": np.uint32(request.seed % 2**32), "max_tokens": np.int32(request.max_tokens),
               **{k: np.float32(v) for k, v in gate.items()}}
        self.state = self._insert_jit(self.state, prefix, row)
        self.active[slot] = True
        self._cancel[slot] = False
        self._sampling[slot] = request.temperature > 0
        alpha, risk = float(prefix.alpha[0]), float(prefix.risk[0])
        return Inserted(slot, round(alpha, 6), None if math.isnan(risk) else risk)

    def cancel(self, slot: int) -> None:
        """Frees a slot now (host side); the next generate marks its row done before any step."""
        if self.active[slot]:
            self._cancel[slot] = True
            self.active[slot] = False

    @property
    def widths(self) -> tuple[int, ...]:
        """The generate programs' batch widths: powers of two below the slot count, and the slot count."""
        return tuple(1 << i for i in range(max(0, (self.config.slots - 1).bit_length())) if 1 << i < self.config.slots
                     ) + (self.config.slots,)

    def generate(self) -> Chunk:
        """Up to `chunk` steps over the slots in use; fewer when all are done first.

        Requests take the lowest free slot, and the program runs over the narrowest width that
        holds every slot in use (a lone request decodes as a batch of one, not of `slots`)."""
        used = np.flatnonzero(self.active | self._cancel)
        width = next(w for w in self.widths if w > (used.max() if used.size else 0))
        sampling = bool((self._sampling & self.active).any())
        self.state, out = self._generate_jit(sampling, width, self.params, self.state, self._cancel.copy(),
                                             self.stop_ids)
        self._cancel[:] = False
        out = {k: np.asarray(v) for k, v in out.items()}
        done = out.pop("done")
        padded = {k: np.zeros((self.config.slots,) + v.shape[1:], v.dtype) for k, v in out.items()}
        for k, v in out.items():
            padded[k][:width] = v
        chunk = Chunk(**padded, done=done)
        self.active &= ~chunk.done
        return chunk

    def warm_up(self) -> int:
        """Compiles every program a request can need (each bucket's prefill, insert, a greedy and a
        sampling generate per width) and leaves every slot free; returns the number compiled."""
        before = self.compilations
        for width in self.config.buckets:
            n = min(width, self.config.context - 1)
            request = SlotRequest([self.pad_id] * n, max_tokens=1)
            self.insert(self.prefill(request), 0, request)
            self.cancel(0)
        cancel = np.ones((self.config.slots,), bool)
        for width in self.widths:
            for sampling in (False, True):
                self.state, _ = self._generate_jit(sampling, width, self.params, self.state, cancel, self.stop_ids)
        self.state = self._init_jit(self.params)
        self.active[:] = False
        self._cancel[:] = False
        return self.compilations - before

    def _gate_defaults(self, request: SlotRequest) -> dict:
        gate = self.config.gate
        return {name: getattr(gate, name) if getattr(request, name) is None else getattr(request, name)
                for name in ("tau", "threshold", "soft_reset", "v_reset")}

    # --- traced programs --------------------------------------------------------------------

    def _models(self, params):
        if self.paired:
            return None, None, nnx.merge(self.engine.paired_graph, params["paired"])
        base = nnx.merge(self.engine.base_graph, params["base"])
        expert = nnx.merge(self.engine.expert_graph, params["expert"]) if self.uses_expert else None
        return base, expert, None

    def _caches(self, params, batch: int):
        base, expert, paired = self._models(params)
        length = self.config.context
        if paired is not None:
            return program.paired_cache(paired, self.engine.first_adapted, self.shared, batch, length), None
        return base.new_cache(batch, length), None if expert is None else expert.new_cache(batch, length)

    def _init_traced(self, params):
        self.compilations += 1
        s = self.config.slots
        base_cache, expert_cache = self._caches(params, s)
        rows = self.engine.base_config.vocab_size
        expert_rows = self.engine.expert_config.vocab_size if self.uses_expert or self.paired else 1
        f32 = lambda value=0.0: jnp.full((s,), value, jnp.float32)  # noqa: E731
        i32 = jnp.zeros((s,), jnp.int32)
        gate = self.config.gate
        return SlotState(base_cache=base_cache, expert_cache=expert_cache, base_len=i32, expert_len=i32,
                         base_logits=jnp.zeros((s, rows), jnp.float32),
                         expert_logits=jnp.zeros((s, expert_rows), jnp.float32),
                         v=f32(gate.v_reset), alpha=f32(), steer=jnp.zeros((s,), bool), tau=f32(gate.tau),
                         threshold=f32(gate.threshold), soft_reset=f32(gate.soft_reset), v_reset=f32(gate.v_reset),
                         temperature=f32(), top_p=f32(1.0), seed=jnp.zeros((s,), jnp.uint32), step=i32,
                         max_tokens=i32, done=jnp.ones((s,), bool))

    def _prefill_traced(self, params, inputs) -> Prefix:
        self.compilations += 1
        base, expert, paired = self._models(params)
        base_cache, expert_cache = self._caches(params, 1)
        if paired is not None:
            prompt = inputs["base_prompt"] if self.shared else jnp.concatenate([inputs["base_prompt"],
                                                                                 inputs["expert_prompt"]])
            lengths = jnp.concatenate([inputs["base_len"], inputs["expert_len"]])
            logits, base_cache = program.paired_prefill(paired, self.engine.first_adapted, self.shared, prompt, lengths,
                                                 base_cache)
            base_logits, expert_logits = logits[:1], logits[1:]
        else:
            base_logits, base_cache = program.prefill(base, inputs["base_prompt"], inputs["base_len"], base_cache)
            expert_logits = jnp.zeros((1, 1), jnp.float32)
            if expert is not None:
                expert_logits, expert_cache = program.prefill(expert, inputs["expert_prompt"], inputs["expert_len"],
                                                       expert_cache)
        alpha, risk = inputs["alpha"], jnp.full((1,), jnp.nan, jnp.float32)
        if self.expert_risk is not None:
            # Engine.decode's alpha_from_expert, on this request's own prefill cache: 10 x the
            # expert's probability of opening with a refusal, whole, after the prompt's first
            # `risk_len` tokens. Skipped when the request sets its alpha itself.
            trie = inputs["opening_trie"]
            prompt = inputs["base_prompt"] if self.shared else inputs["expert_prompt"]
            model, cache = (paired, base_cache) if paired is not None else (expert, expert_cache)

            def reflected():
                last = jnp.take_along_axis(prompt, (inputs["risk_len"] - 1)[:, None], axis=1)[:, 0]
                opening = program.opening_probabilities(model, cache, paired is not None, self.engine.first_adapted,
                                                        self.shared, last, inputs["risk_len"], trie.rows,
                                                        prompt.shape[1], self.vocab_size)
                return risk_from_opening_probabilities(opening, trie).astype(jnp.float32)

            risk = jax.lax.cond(inputs["from_expert"], reflected, lambda: risk)
            alpha = jnp.where(inputs["from_expert"], alpha_from_risk_array(
                risk, inputs["alpha_levels"], inputs["risk_thresholds"]), alpha)
        return Prefix(base_cache, expert_cache, base_logits, expert_logits, alpha, risk)

    def _insert_traced(self, state: SlotState, prefix: Prefix, row) -> SlotState:
        self.compilations += 1
        slot, s, axis = row["slot"], self.config.slots, self.batch_axis

        def put(big, small, at, index=0):
            one = jax.lax.dynamic_slice_in_dim(small, index, 1, axis=axis).astype(big.dtype)
            return jax.lax.dynamic_update_slice_in_dim(big, one, at, axis=axis)

        if self.paired:  # base row 0 goes to row slot, expert row 1 to row S + slot (shared layers: one row)
            base_cache = jax.tree.map(lambda big, small: put(big, small, slot) if small.shape[axis] == 1 else
                                      put(put(big, small, slot, 0), small, s + slot, 1),
                                      state.base_cache, prefix.base_cache)
            expert_cache = None
        else:
            base_cache = jax.tree.map(lambda big, small: put(big, small, slot), state.base_cache, prefix.base_cache)
            expert_cache = None if state.expert_cache is None else jax.tree.map(
                lambda big, small: put(big, small, slot), state.expert_cache, prefix.expert_cache)
        logits = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, axis=0)  # noqa: E731
        at = lambda array, value: array.at[slot].set(value)  # noqa: E731
        return state._replace(
            base_cache=base_cache, expert_cache=expert_cache,
            base_len=at(state.base_len, row["base_len"]), expert_len=at(state.expert_len, row["expert_len"]),
            base_logits=logits(state.base_logits, prefix.base_logits),
            expert_logits=logits(state.expert_logits, prefix.expert_logits),
            v=at(state.v, row["v_reset"]),  # a fresh neuron for every request (spec §2)
            alpha=at(state.alpha, prefix.alpha[0]), steer=at(state.steer, row["steer"]),
            tau=at(state.tau, row["tau"]), threshold=at(state.threshold, row["threshold"]),
            soft_reset=at(state.soft_reset, row["soft_reset"]), v_reset=at(state.v_reset, row["v_reset"]),
            temperature=at(state.temperature, row["temperature"]), top_p=at(state.top_p, row["top_p"]),
            seed=at(state.seed, row["seed"]), step=at(state.step, 0), max_tokens=at(state.max_tokens, row["max_tokens"]),
            done=at(state.done, False))

    def _rows(self, state: SlotState, width: int) -> SlotState:
        """The first `width` slots' rows of the state (an adapter pair's cache: base and expert rows)."""
        if width == self.config.slots:
            return state
        axis, s = self.batch_axis, self.config.slots
        first = lambda x, start=0, axis=0: jax.lax.slice_in_dim(x, start, start + width, axis=axis)  # noqa: E731
        if self.paired:  # base rows and expert rows (layers below a shared prompt's adapter: one row set)
            cache = lambda x: jnp.concatenate([first(x, 0, axis), first(x, s, axis)], axis=axis) if (  # noqa: E731
                x.shape[axis] == 2 * s) else first(x, 0, axis)
        else:
            cache = lambda x: first(x, 0, axis)  # noqa: E731
        caches = {"base_cache": jax.tree.map(cache, state.base_cache),
                  "expert_cache": jax.tree.map(cache, state.expert_cache)}
        return SlotState(**{name: caches[name] if name in caches else first(value)
                            for name, value in state._asdict().items()})

    def _put_rows(self, state: SlotState, rows: SlotState, width: int) -> SlotState:
        """`_rows`'s inverse: writes the first `width` slots' rows back."""
        if width == self.config.slots:
            return rows
        axis, s = self.batch_axis, self.config.slots
        put = lambda big, small, at=0, axis=0: jax.lax.dynamic_update_slice_in_dim(big, small, at, axis=axis)  # noqa: E731
        if self.paired:
            cache = lambda big, small: put(put(big, jax.lax.slice_in_dim(small, 0, width, axis=axis), 0, axis),  # noqa: E731
                                           jax.lax.slice_in_dim(small, width, 2 * width, axis=axis), s, axis) if (
                big.shape[axis] == 2 * s) else put(big, small, 0, axis)
        else:
            cache = lambda big, small: put(big, small, 0, axis)  # noqa: E731
        caches = {"base_cache": jax.tree.map(cache, state.base_cache, rows.base_cache),
                  "expert_cache": jax.tree.map(cache, state.expert_cache, rows.expert_cache)}
        return SlotState(**{name: caches[name] if name in caches else put(value, getattr(rows, name))
                            for name, value in state._asdict().items()})

    def _generate_traced(self, sampling: bool, width: int, params, full: SlotState, cancel, stop_ids):
        """`chunk` steps over the first `width` slots (the others are free)."""
        self.compilations += 1
        base, expert, paired = self._models(params)
        config, vocab, pad_id = self.config, self.vocab_size, self.pad_id
        s, c = width, config.chunk
        full = full._replace(done=full.done | cancel)
        state = self._rows(full, width)
        out = {"tokens": jnp.full((s, c), pad_id, jnp.int32), "valid": jnp.zeros((s, c), bool),
               "divergence": jnp.zeros((s, c), jnp.float32), "potential": jnp.zeros((s, c), jnp.float32),
               "spike": jnp.zeros((s, c), bool), "alpha": jnp.zeros((s, c), jnp.float32),
               "steered": jnp.zeros((s, c), bool)}

        def choose(st: SlotState):
            gate = _RowGate(st.tau, st.threshold, st.v_reset, st.soft_reset, config.gate.top_k, config.gate.divergence)
            # A row that does not steer is a "done" row to the gate: it never spikes, so its
            # scores are the base distribution (its potential is kept at reset below).
            view = DecodeState(step=jnp.int32(0), key=None, base_cache=None, expert_cache=None, base_len=None,
                               expert_len=None, base_logits=st.base_logits, expert_logits=st.expert_logits, v=st.v,
                               done=st.done | ~st.steer, tokens=None, trace_d=None, trace_v=None, trace_spike=None,
                               trace_alpha=None)
            scores, d, v, spike, in_force = program.choose_scores(_RowSettings(config.mode, gate), view, st.alpha, st.temperature,
                                                    st.top_p, vocab)
            if sampling:
                # One key per row from its own seed and step: a row's draws do not depend on its slot.
                keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(st.seed, st.step)
                token = jax.vmap(lambda sc, key, t, p: choose_token(sc[None], key, t, config.sampling_top_k, p)[0])(
                    scores, keys, st.temperature, st.top_p)
            else:
                token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            return token, d, v, spike, in_force

        def forward(st: SlotState, token, live):
            if paired is not None:
                if self.shared:
                    tokens, positions = token[:, None], st.base_len[:, None]
                else:
                    tokens = jnp.concatenate([token, token])[:, None]
                    positions = jnp.concatenate([st.base_len, st.expert_len])[:, None]
                hidden, cache = program.paired_forward(paired, self.engine.first_adapted, self.shared, tokens, positions,
                                                st.base_cache)
                logits = paired.logits(hidden[:, 0])
                base_logits, expert_logits, base_cache, expert_cache = logits[:s], logits[s:], cache, None
            else:
                base_logits, base_cache = program.step(base, token, st.base_len, st.base_cache)
                expert_logits, expert_cache = (st.expert_logits, st.expert_cache) if expert is None else program.step(
                    expert, token, st.expert_len, st.expert_cache)
            advance = live.astype(jnp.int32)
            return st._replace(base_cache=base_cache, expert_cache=expert_cache, base_logits=base_logits,
                               expert_logits=expert_logits, base_len=st.base_len + advance,
                               expert_len=st.expert_len + advance)

        def body(carry):
            i, st, out = carry
            token, d, v, spike, in_force = choose(st)
            live = ~st.done
            steering = live & st.steer
            token = jnp.where(live, token, pad_id)
            base_choice = jnp.argmax(st.base_logits[:, :vocab], axis=-1)
            record = lambda name, x: out[name].at[:, i].set(jnp.where(live, x, jnp.zeros_like(x)))  # noqa: E731
            v = jnp.where(steering, v, st.v)
            out = {"tokens": out["tokens"].at[:, i].set(token), "valid": out["valid"].at[:, i].set(live),
                   "divergence": record("divergence", jnp.where(steering, d, 0.0)),
                   "potential": record("potential", v), "spike": record("spike", spike),
                   "alpha": record("alpha", in_force), "steered": record("steered", spike & (token != base_choice))}
            finished = live & (jnp.any(token[:, None] == stop_ids[None, :], axis=-1) | (st.step + 1 >= st.max_tokens))
            st = st._replace(v=v, step=st.step + live.astype(jnp.int32), done=st.done | finished)
            return i + 1, forward(st, token, live), out

        def cond(carry):
            i, st, _ = carry
            return (i < c) & ~jnp.all(st.done)

        _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
        full = self._put_rows(full, state, width)
        return full, {**out, "done": full.done}
