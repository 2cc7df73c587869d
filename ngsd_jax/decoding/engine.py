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

import chex
import jax
import numpy as np
from flax import nnx

from ngsd_jax.decoding import early_stop as es
from ngsd_jax.decoding.batching import bucket_batch, pack_prompts
from ngsd_jax.decoding.program import (
    compiler_options,
    decode_program,
    expert_rows_next_token_probabilities,
    next_token_probabilities,
)
from ngsd_jax.decoding.risk import ExpertRisk
from ngsd_jax.decoding.settings import DecodeResult, DecodeSettings
from ngsd_jax.models.decoder import Decoder, stack_layers
from ngsd_jax.models.lora import LoRAAdapter, attach_expert_rows
from ngsd_jax.parallel import sharding as sh


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
        """`mesh` (a ngsd_jax.parallel.sharding mesh; models already placed on it with `shard_model`)
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
        options = compiler_options(self.base_params, self.expert_params, self.paired_params)
        self._jitted = jax.jit(self._traced, static_argnums=(0, 1, 2, 3, 4, 5), compiler_options=options)
        self._prefill_jitted = jax.jit(next_token_probabilities, static_argnums=(0, 1), compiler_options=options)
        self._expert_rows_prefill_jitted = jax.jit(expert_rows_next_token_probabilities, static_argnums=(0, 1, 2),
                                                   compiler_options=options)

    @property
    def has_adapter(self) -> bool:
        return self.paired_graph is not None

    def _traced(self, base_graph, expert_graph, paired_graph, first_adapted, settings, vocab_size, params, inputs):
        self.compilations += 1  # runs only while tracing, so it counts compilations
        return decode_program(base_graph, expert_graph, paired_graph, first_adapted, settings, vocab_size, params, inputs,
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
        expert_risk: ExpertRisk | None = None,
        risk_lengths=None,
    ) -> DecodeResult:
        """Decodes a batch. `expert_prompts` (same user messages in the expert's own chat format)
        default to the base prompts; `alpha` is a scalar or one value per prompt; `stop_ids`
        replaces the engine's stop tokens for this call; `early_stop_tables` (else the engine's)
        serve settings with early_stop=True. With `expert_risk`, `alpha` is ignored: each
        sequence's alpha is set inside the program from the expert's probability of opening
        with a refusal (`--reflect expert`), read after the first `risk_lengths` tokens of each
        expert prompt (default: all of them; a prompt that ends with forced answer text gives
        the length before it, so that the forced text cannot set the risk)."""
        arguments, real, stops = self._program_arguments(base_prompts, expert_prompts, settings, alpha, temperature,
                                                         top_p, seed, stop_ids, early_stop_tables, expert_risk,
                                                         risk_lengths)
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
        arguments, _, _ = self._program_arguments(base_prompts, None, settings, 0.5, 0.0, 1.0, 0, None, None, None,
                                                  None)
        return self._jitted.lower(*arguments)

    def _program_arguments(self, base_prompts, expert_prompts, settings, alpha, temperature, top_p, seed, stop_ids,
                           early_stop_tables, expert_risk, risk_lengths):
        """The jitted program's arguments for a batch, its real size and the stop tokens in force."""
        expert_prompts = base_prompts if expert_prompts is None else expert_prompts
        if len(expert_prompts) != len(base_prompts):
            raise ValueError("base and expert prompts must be the same batch")
        has_expert = self.expert_graph is not None or self.has_adapter
        if settings.uses_base and self.base_graph is None or settings.uses_expert and not has_expert:
            raise ValueError(f"mode '{settings.mode}' needs a model this engine was not given")
        # An adapter engine runs every mode in the paired layout, the base alone too: the base rows
        # beside the expert's are then the very computation `--mode base` makes, so where the neuron
        # never fires NGSD's answer is the base's token for token in every dtype (a base run on
        # its own rows, another matmul shape, differs in bf16 by rounding).
        paired = self.has_adapter
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
        if expert_risk is not None:
            inputs["risk_len"] = expert_len.copy()
            if risk_lengths is not None:
                inputs["risk_len"][:real] = risk_lengths
                if not ((1 <= inputs["risk_len"]) & (inputs["risk_len"] <= expert_len)).all():
                    raise ValueError("risk_lengths: each must lie in 1..the length of its expert prompt")
        if self.mesh is not None:
            inputs = self._place_batch(inputs)
        if settings.early_stop:
            inputs["early_stop"] = tables
        if expert_risk is not None:
            inputs["opening_trie"] = expert_risk.trie
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
                 "array", "lengths", "risk_len")


def _per_row(name: str, value, real: int, batch: int) -> np.ndarray:
    """A scalar or one value per prompt as [batch] float32 (padding rows repeat real ones).

    Checked here because inside the program a NaN alpha or temperature silently turns every
    score of its row into NaN, and a list of the wrong length would be cut or repeated."""
    array = np.asarray(value, np.float32)
    if array.ndim:
        chex.assert_shape(array, (real,), custom_message=f"{name}: give a scalar or one value per prompt")
    chex.assert_tree_all_finite(array, custom_message=f"{name} must be finite")
    return np.resize(np.broadcast_to(array, (real,)), (batch,))


def _stop_array(stop_ids) -> np.ndarray:
    # -1 never matches a token, and keeps the array non-empty when there are no stops.
    return np.asarray(sorted(set(int(t) for t in stop_ids)) or [-1], np.int32)


def _generated_lengths(tokens: np.ndarray, stop_ids: np.ndarray) -> np.ndarray:
    is_stop = np.isin(tokens, stop_ids)
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int32)
