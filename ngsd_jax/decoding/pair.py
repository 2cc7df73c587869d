"""A base/expert pair ready to decode: the typed options every decoding entry point takes
(`DecodeOptions`), their checks, loading the models a set of modes needs onto the mesh its
memory plan chooses, and one batch through reflection, encoding and the engine."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from ngsd_jax.checkpoints.adapter import (
    adapter_fingerprint,
    adapter_mismatch,
    is_adapter,
    load_adapter,
    weights_fingerprint,
)
from ngsd_jax.checkpoints.default_model import default_base_path, default_expert
from ngsd_jax.checkpoints.resolve import resolve_checkpoint
from ngsd_jax.checkpoints.tokenizer import compare_vocabularies, encode_chat, load_tokenizer, stop_token_ids
from ngsd_jax.checkpoints.weights import CheckpointError, load_model, load_model_config
from ngsd_jax.decoding.batching import bucket_batch, bucket_length
from ngsd_jax.decoding.early_stop import early_stop_tables
from ngsd_jax.decoding.engine import Engine
from ngsd_jax.decoding.gate import GateConfig, gate_problem
from ngsd_jax.decoding.prompts import check_utf8
from ngsd_jax.decoding.reflect import reflect
from ngsd_jax.decoding.risk import AlphaMapping, ExpertRisk, expert_reflection, opening_token_sequences, opening_trie
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.errors import UsageError
from ngsd_jax.models.lora import LoRAAdapter
from ngsd_jax.parallel.distributed import say
from ngsd_jax.parallel.memory import DeviceOptions, decode_plan, plan_mesh
from ngsd_jax.parallel.sharding import make_mesh

ALPHA_MODES = ("ngsd", "always")  # the modes whose expert pull is alpha, set by reflection


@dataclasses.dataclass
class DecodeOptions:
    """Everything a decode, eval or serve run is asked for; the CLIs fill it from built-in
    defaults, then a preset, then the command line (`ngsd_jax.cli.decode_options`)."""

    base: str | None = None
    expert: str | None = None
    dtype: str = "float32"
    mode: str = "ngsd"
    reflect: str = "json"
    alpha: float = 0.5
    alpha_levels: tuple[float, float, float] = (0.1, 0.5, 0.9)
    risk_thresholds: tuple[float, float] = (5.0, 6.0)
    max_new_tokens: int = 128
    system_prompt: str | None = None
    expert_system_prompt: str | None = None
    chat_template: str | None = None
    expert_chat_template: str | None = None
    tau: float = 8.0
    threshold: float = 1.0
    soft_reset: float = 0.6
    v_reset: float = 0.0
    merge_top_k: int = 64
    divergence: str = "tv"
    safedecoding_m: int = 2
    safedecoding_alpha: float = 3.0
    safedecoding_common: int = 5
    early_stop: bool = False
    thinking: bool = False
    reflect_parse: str = "lenient"
    reflect_prefix: bool = True
    reflect_max_new_tokens: int = 64
    reflect_all_zero_risk: int | None = None
    softmax_over: str = "tokenizer"
    # Sampling and batching (not part of a preset).
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    # Placement.
    scan_layers: bool = False
    expert_placement: str = "sharded"
    devices: DeviceOptions = DeviceOptions()


GATE_FLAGS = {"tau": "--tau", "threshold": "--threshold", "soft_reset": "--soft-reset", "v_reset": "--v-reset",
              "top_k": "--merge-top-k", "divergence": "--divergence"}


def check_options(options: DecodeOptions) -> None:
    """Refuses settings that would fail or run meaninglessly, before any model is read; each
    refusal is one line naming the flag."""
    for field in dataclasses.fields(DecodeOptions):
        value = getattr(options, field.name)
        flag = "--" + field.name.replace("_", "-")
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UsageError(f"{flag} must be a finite number (got {value if len(values) > 1 else values[0]})")
        if isinstance(value, str) and field.name not in ("base", "expert"):  # paths may be any bytes
            check_utf8(value, flag)
    gate = {field: getattr(options, "merge_top_k" if field == "top_k" else field) for field in GATE_FLAGS}
    problem = gate_problem(gate, GATE_FLAGS)
    checks = [
        (problem is None, problem),
        (options.batch_size >= 1, "--batch-size must be >= 1"),
        (0 < options.top_p <= 1, "--top-p must lie in (0, 1]"),
        (options.temperature >= 0, "--temperature must be >= 0"),
        (options.top_k >= 0, "--top-k must be >= 0 (0 = off)"),
        (options.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (0 <= options.alpha <= 1, f"--alpha must lie in [0, 1] (got {options.alpha})"),
        (options.reflect_max_new_tokens >= 1, "--reflect-max-new-tokens must be >= 1"),
        (options.reflect_all_zero_risk is None or 0 <= options.reflect_all_zero_risk <= 10,
         "--reflect-all-zero-risk must lie in 0..10"),
        (options.safedecoding_m >= 0, "--safedecoding-m must be >= 0"),
        (options.safedecoding_common >= 1, "--safedecoding-common must be >= 1"),
        (options.safedecoding_alpha >= 0, "--safedecoding-alpha must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    alpha_mapping(options)  # its own one-line ValueError names the flag's rule


def _resolve_models(options: DecodeOptions, modes) -> tuple[str, str | None]:
    """Base and expert paths; with no model named, the default expert (which one is said)."""
    base = _checkpoint_path(options.base, "base") if options.base else str(default_base_path())
    expert = _checkpoint_path(options.expert, "expert") if options.expert else None
    if expert is None and any(mode != "base" for mode in modes):
        found = default_expert() if options.base is None else None
        if found is None:
            raise UsageError("no expert model: run `python -m ngsd_jax.train` to build the default one "
                             "(about an hour on 2 CPU cores; --recipe smollm2-135m-quick: 20 minutes), pass "
                             "--expert PATH, or use --mode base")
        say(f"ngsd-jax: expert: {found.describe()}")
        expert = str(found.path)
    return base, expert


def _checkpoint_path(name: str, role: str) -> str:
    """A local path, a name under the checkpoints directory (how presets name models), or a Hub id."""
    try:
        return str(resolve_checkpoint(name))
    except CheckpointError as err:
        raise UsageError(f"{role} model {err}") from None


def _distribution_size(softmax_over: str, tokenizer_size: int, configs: dict) -> int:
    """How many logits the next-token distributions cover: the tokenizer's tokens, or every
    embedding row (the reference's softmax), which the models in use (`configs` by role) must
    then agree on. Read from the configs, so a pair that disagrees is refused before loading."""
    if softmax_over == "tokenizer":
        return tokenizer_size
    rows = {name: config.vocab_size for name, config in configs.items()}
    if len(set(rows.values())) > 1:
        raise UsageError(f"--softmax-over embedding: the base has {rows['base']} embedding rows and the expert "
                         f"{rows['expert']}; use --softmax-over tokenizer")
    return next(iter(rows.values()))


def _check_context(configs: dict, lengths: list[int], max_new_tokens: int) -> None:
    """Refuses a prompt (`lengths`: each prompt's tokens in its chat format) that with the new tokens
    would run past the positions of a model in use (`configs` by role), before any weights are read."""
    widest = max(lengths)
    for name, config in configs.items():
        limit = config.max_position_embeddings
        if widest + max_new_tokens > limit:
            fix = (f"lower --max-new-tokens to {limit - widest} or shorten that prompt" if widest < limit
                   else f"shorten that prompt to under {limit} tokens")
            raise UsageError(f"prompt {lengths.index(widest) + 1} is {widest} tokens in its chat format; with "
                             f"--max-new-tokens {max_new_tokens} that runs past the {name} model's "
                             f"max_position_embeddings of {limit}: {fix}")


@dataclasses.dataclass
class LoadedPair:
    """The engine over the models some modes need, with the tokenizers that encode its prompts.
    `models`: by role, what the engine runs (a Decoder; for an adapter expert, its LoRAAdapter)."""

    engine: Engine
    base_tokenizer: object
    expert_tokenizer: object | None
    models: dict = dataclasses.field(default_factory=dict, repr=False)
    _fingerprints: dict = dataclasses.field(default_factory=dict, repr=False)

    def fingerprints(self) -> dict[str, str]:
        """By role, a fingerprint of the weights the pair runs (an adapter expert's: of the base it
        adapts and of its own arrays), computed once, on first asking: what tells a model retrained
        at the same path from the one a run started with."""
        for role, model in self.models.items():
            if role not in self._fingerprints:
                self._fingerprints[role] = (adapter_fingerprint(model) if isinstance(model, LoRAAdapter)
                                            else weights_fingerprint(model))
        return dict(self._fingerprints)


def load_pair(options: DecodeOptions, modes, prompts: list[str], prefill: str = "") -> LoadedPair:
    """Loads the base and expert that `modes` need, refusing a pair whose tokenizers differ before any
    weights, and placing the weights on the mesh that `options.devices` asks for (after its memory plan)."""
    base_path, expert_path = _resolve_models(options, modes)
    uses_base, uses_expert = any(m != "expert" for m in modes), any(m != "base" for m in modes)
    # Tokenizers first: a mismatched pair is refused before any weights are read.
    base_tok = load_tokenizer(base_path)
    adapter = load_adapter(expert_path) if uses_expert and expert_path and is_adapter(expert_path) else None
    # An adapter expert is the base plus a delta: it has the base's tokenizer. Modes that do not run
    # the expert read nothing of it.
    expert_tok = None
    if uses_expert and expert_path:
        expert_tok = base_tok if adapter is not None else load_tokenizer(expert_path)
    if expert_tok is not None:
        mismatch = compare_vocabularies(base_tok, expert_tok)
        if mismatch:
            raise UsageError(mismatch)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[options.dtype]
    chats = [(base_tok, options.system_prompt, options.chat_template),
             (expert_tok, options.expert_system_prompt, options.expert_chat_template)]
    lengths = [max(len(encode_chat(tok, p, system, template, prefill, thinking=options.thinking))
                   for tok, system, template in chats if tok is not None) for p in prompts]
    widest = max(lengths)
    # An adapter's expert is the base's own weights plus a small delta: planned and loaded as the base.
    uses_base = uses_base or adapter is not None
    uses_expert_model = uses_expert and adapter is None
    models = [(name, path, placement) for name, path, placement, used in (
        ("base", base_path, "sharded", uses_base),
        ("expert", expert_path, options.expert_placement, uses_expert_model)) if used]
    configs = {name: load_model_config(path) for name, path, _ in models}
    _check_context(configs, lengths, options.max_new_tokens)
    vocab_size = _distribution_size(options.softmax_over, len(base_tok), configs)
    mesh = plan_devices(options, models, dtype, min(options.batch_size, len(prompts)), widest)
    base = load_model(base_path, dtype, mesh) if uses_base else None
    expert = load_model(expert_path, dtype, mesh, options.expert_placement) if uses_expert_model else None
    fingerprints = {}
    if adapter is not None:
        fingerprints["base"] = weights_fingerprint(base)
        mismatch = adapter_mismatch(adapter, base, base_path, fingerprints["base"])
        if mismatch:
            raise UsageError(f"{expert_path}: {mismatch}")
    engine = Engine(base, expert, mesh=mesh, vocab_size=vocab_size, adapter=adapter, scan_layers=options.scan_layers,
                    stop_ids=stop_token_ids(base_tok, (base or expert).config, options.chat_template),
                    pad_id=base_tok.pad_token_id or 0,
                    early_stop_tables=early_stop_tables(base_tok, vocab_size) if options.early_stop else None)
    running = {role: model for role, model in (("base", base), ("expert", adapter or expert)) if model is not None}
    return LoadedPair(engine, base_tok, expert_tok, running, fingerprints)


def plan_devices(options: DecodeOptions, models, dtype, batch: int, widest_prompt: int):
    """The mesh (None: one device, the unsharded program) after printing the memory plan and
    refusing a configuration that does not fit. `models`: (name, path, placement) per model used."""
    configs = [(name, load_model_config(path), dtype, placement) for name, path, placement in models]
    width = bucket_length(widest_prompt)

    def plan_for(mesh, rows=batch):
        return decode_plan(configs, mesh, bucket_batch(rows), width, options.max_new_tokens)

    shape = plan_mesh("decode", options.devices, plan_for, prefer="tensor", quiet_on_one_device=True)
    return None if shape.size == 1 else make_mesh(shape)


def decode_settings(options: DecodeOptions, mode: str) -> DecodeSettings:
    return DecodeSettings(
        mode=mode, max_new_tokens=options.max_new_tokens, sampling_top_k=options.top_k,
        gate=GateConfig(tau=options.tau, threshold=options.threshold, v_reset=options.v_reset,
                        soft_reset=options.soft_reset, top_k=options.merge_top_k, divergence=options.divergence),
        safedecoding_first_m=options.safedecoding_m, safedecoding_alpha=options.safedecoding_alpha,
        safedecoding_min_common=options.safedecoding_common, early_stop=options.early_stop,
    )


def alpha_mapping(options: DecodeOptions) -> AlphaMapping:
    return AlphaMapping(tuple(options.alpha_levels), tuple(options.risk_thresholds))


def reflect_prompts(pair: LoadedPair, options: DecodeOptions, mode: str, prompts: list[str]):
    """Self-reflection for the modes that take alpha (ngsd, always); every other mode gets reflection 'off'."""
    reflect_mode = options.reflect if mode in ALPHA_MODES else "off"
    return reflect(pair.engine, pair.base_tokenizer, prompts, reflect_mode, options.alpha, options.chat_template,
                   thinking=options.thinking, parser=options.reflect_parse, prefix=options.reflect_prefix,
                   max_new_tokens=options.reflect_max_new_tokens, all_zero_risk=options.reflect_all_zero_risk,
                   mapping=alpha_mapping(options))


def in_program_expert_risk(pair: LoadedPair, options: DecodeOptions, mode: str) -> ExpertRisk | None:
    """For `--reflect expert` in a mode that takes alpha: what the decode program needs to set each
    row's alpha from the expert's own prefill (no extra pass); else None."""
    if options.reflect != "expert" or mode not in ALPHA_MODES:
        return None
    trie = opening_trie(opening_token_sequences(pair.expert_tokenizer), pair.engine.vocab_size)
    return ExpertRisk(trie, alpha_mapping(options))


def encode_prompts(pair: LoadedPair, options: DecodeOptions, prompts: list[str], prefill=""):
    """(base prompt ids, expert prompt ids or None), each ending with `prefill` (text or ids) forced."""
    base_prompts = [encode_chat(pair.base_tokenizer, p, options.system_prompt, options.chat_template, prefill,
                                thinking=options.thinking) for p in prompts]
    expert_prompts = None
    if pair.expert_tokenizer is not None:
        expert_prompts = [encode_chat(pair.expert_tokenizer, p, options.expert_system_prompt,
                                      options.expert_chat_template, prefill, thinking=options.thinking)
                          for p in prompts]
    return base_prompts, expert_prompts


def decode_prompts(pair: LoadedPair, settings: DecodeSettings, options: DecodeOptions, base_prompts, expert_prompts,
                   alpha, expert_risk: ExpertRisk | None = None, forced_tokens=None):
    """One engine call with the options' sampling settings; the expert mode decodes the expert's prompts.
    `forced_tokens`: per prompt, how many of its last tokens are forced answer text (a prefilling
    attack), which the expert's risk must not read."""
    first = base_prompts if settings.uses_base else expert_prompts
    risk_lengths = None
    if expert_risk is not None and forced_tokens is not None:
        risk_lengths = [len(p) - f for p, f in zip(expert_prompts or first, forced_tokens)]
    return pair.engine.decode(first, expert_prompts, settings, alpha=alpha, temperature=options.temperature,
                              top_p=options.top_p, seed=options.seed, expert_risk=expert_risk,
                              risk_lengths=risk_lengths)


def decode_batch(pair: LoadedPair, options: DecodeOptions, settings: DecodeSettings, prompts: list[str],
                 prefill: str = ""):
    """(DecodeResult, Reflection per prompt) for one batch in `settings.mode`: alpha from the
    expert's prefill inside the program (`--reflect expert`), else from a reflection call first."""
    base_prompts, expert_prompts = encode_prompts(pair, options, prompts, prefill)
    expert_risk = in_program_expert_risk(pair, options, settings.mode)
    forced = len(pair.base_tokenizer.encode(prefill, add_special_tokens=False)) if prefill else 0
    if expert_risk is None:
        reflections = reflect_prompts(pair, options, settings.mode, prompts)
        result = decode_prompts(pair, settings, options, base_prompts, expert_prompts, [r.alpha for r in reflections])
        return result, reflections
    result = decode_prompts(pair, settings, options, base_prompts, expert_prompts, 0.0, expert_risk,
                            [forced] * len(prompts))
    return result, [expert_reflection(r, a) for r, a in zip(result.risk, result.alpha)]
