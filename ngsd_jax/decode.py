"""`python -m ngsd_jax.decode`: decode prompts with a base model and its safety expert.

    python -m ngsd_jax.decode --prompt "How do I pick a lock?" --trace
    python -m ngsd_jax.decode --prompts-file prompts.jsonl --json > out.jsonl
    python -m ngsd_jax.decode --preset llama3.1-8b+llama3.2-1b --prompt "..."

With no model named it decodes with the embedded default base (SmolLM2-135M-Instruct)
and the default expert that `python -m ngsd_jax.train` builds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

from ngsd_jax import distributed

PRESETS_DIR = Path(__file__).resolve().parent.parent / "decode"
DEFAULT_PRESET = "smollm2-135m"
PROMPT_FIELDS = ("prompt", "goal", "instruction", "question", "query", "request", "behavior", "input",
                 "text")


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


def read_records(path: Path) -> list:
    """The items of a prompts file: strings (.txt lines, bare JSON strings) or dicts (.csv rows, JSON objects).

    .txt holds one prompt per line, .jsonl one JSON value per line, .json a list of values."""
    if not path.is_file():
        raise UsageError(f"{path}: no such prompts file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{number}: not JSON ({err.msg})") from None
        return items
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(items, list):
            raise UsageError(f"{path}: expected a JSON list of prompts")
        return items
    raise UsageError(f"{path}: unknown prompts format '{suffix}'; use .txt, .jsonl, .json or .csv")


def find_prompt_field(keys) -> str | None:
    """The key naming the prompt: the first of PROMPT_FIELDS present, in any case ("Goal" for "goal")."""
    keys = [k for k in keys if isinstance(k, str)]
    for name in PROMPT_FIELDS:
        if name in keys:
            return name
        folded = [k for k in keys if k.lower() == name]
        if folded:
            return folded[0]
    return None


def read_prompts(path: Path) -> list[str]:
    """Prompts from .txt (one per line), .jsonl, .json (a list of strings or objects) or .csv."""
    items = read_records(path)
    if path.suffix.lower() == ".csv":
        field = find_prompt_field(items[0]) if items else None
        if field is None:
            raise UsageError(f"{path}: no prompt column; name one of {', '.join(PROMPT_FIELDS)}")
        return [row[field] for row in items]
    prompts = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            prompts.append(item)
            continue
        field = find_prompt_field(item) if isinstance(item, dict) else None
        if field is None:
            raise UsageError(f"{path}: item {number} has no prompt field ({', '.join(PROMPT_FIELDS)})")
        prompts.append(item[field])
    return prompts


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise UsageError(f"unknown preset '{name}'; known: {', '.join(known)} (or a path to a .json file)")
    return json.loads(path.read_text())


def _floats(count: int):
    """argparse type: COUNT comma-separated numbers."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, e.g. "
                                             f"{','.join(['0.5'] * count)}; got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    src.add_argument("--prompts-file", type=Path, help=".txt (one per line), .jsonl, .json or .csv")
    src.add_argument("--prefill", default="", metavar="TEXT",
                     help="force the response to start with TEXT for both models (prefilling attack)")
    add_decode_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per prompt (with trace and reflection)")
    out.add_argument("--trace", action="store_true", help="print D, v, spike and alpha per generated token")
    return p


def add_decode_options(p: argparse.ArgumentParser, single_mode: bool = True) -> None:
    """The model, decoding and gate options, shared by every CLI that decodes (decode, eval).

    `single_mode=False` leaves out --mode, for a caller that runs several modes itself."""
    from ngsd_jax.engine import MODES
    from ngsd_jax.reflection import REFLECT_MODES, REFLECT_PARSERS

    models = p.add_argument_group("models")
    models.add_argument("--preset", help=f"a decode preset from decode/ ({', '.join(sorted(x.stem for x in PRESETS_DIR.glob('*.json')))})")
    models.add_argument("--base", help="base checkpoint: HF directory, .gguf, converted checkpoint, a name under checkpoints/, or a Hugging Face Hub id ORG/NAME (default: embedded SmolLM2-135M-Instruct)")
    models.add_argument("--expert", help="expert checkpoint named like --base, or a LoRA adapter directory over the "
                        "base (default: the expert `python -m ngsd_jax.train` builds, as its adapter when it kept one)")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype (default float32)")
    models.add_argument("--system-prompt", default=None, help="system prompt for the base model")
    models.add_argument("--expert-system-prompt", default=None, help="system prompt for the expert (its own format)")
    models.add_argument("--chat-template", default=None, help="Jinja template (string or .jinja file) for the base")
    models.add_argument("--expert-chat-template", default=None, help="Jinja template for the expert")
    models.add_argument("--thinking", action="store_true", default=None,
                        help="render chat prompts with enable_thinking=True (Qwen3 then may think in <think> blocks, "
                             "which the gate would run over); off by default, as the reference runs Qwen3")
    dec = p.add_argument_group("decoding")
    if single_mode:
        dec.add_argument("--mode", choices=MODES, default=None, help="ngsd (default), base, expert, always, safedecoding")
    dec.add_argument("--reflect", choices=REFLECT_MODES, default=None,
                     help="how alpha is set: json (the paper's self-reflection, default), logit, expert (the "
                          "expert's probability of opening with a refusal, read inside the decode program), off "
                          "(use --alpha)")
    dec.add_argument("--alpha", type=float, default=None, help="expert pull when --reflect off (default 0.5)")
    dec.add_argument("--reflect-parse", choices=REFLECT_PARSERS, default=None,
                     help="how the json rating is read: lenient (ours, default: the first object holding a key, "
                          "keys in any case, values clipped to 0..10, generation ends at the first '}') or "
                          "reference (the paper's: the first decodable object or list, int() values, no clipping, "
                          "the whole answer generated)")
    dec.add_argument("--reflect-prefix", action=argparse.BooleanOptionalAction, default=None,
                     help='start the json rating for the model with {"severityScore": (default on, so that small '
                          "bases rate instead of answering; the paper: --no-reflect-prefix)")
    dec.add_argument("--reflect-max-new-tokens", type=int, default=None,
                     help="budget of the json rating (default 64; the paper's: 256)")
    dec.add_argument("--reflect-all-zero-risk", type=int, default=None, metavar="R",
                     help="risk when all four scores are 0 (default: none, S is raised to 1 as the reference does "
                          "for every base but Vicuna; the reference's for Vicuna: 10)")
    dec.add_argument("--alpha-levels", type=_floats(3), default=None, metavar="LOW,MID,HIGH",
                     help="alpha below, between and above the risk thresholds (the paper's: 0.1,0.5,0.9)")
    dec.add_argument("--risk-thresholds", type=_floats(2), default=None, metavar="LOW,HIGH",
                     help="risk r (0-10) below LOW gets the low alpha, above HIGH the high one (the paper's: 5,6)")
    dec.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    dec.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    dec.add_argument("--top-p", type=float, default=1.0)
    dec.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off); not the merge's K")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    dec.add_argument("--early-stop", action="store_true", default=None,
                     help="the reference's early-stop heuristic (spec §5; off by default): at 133, 140, ..., 252 "
                          "tokens, when alpha >= 0.5, a refusal phrase, 3 trailing spaces, an emoji or a control "
                          "character (newline included) in the last 64 tokens caps the answer at +128 tokens, "
                          "ending at a sentence end")
    gate = p.add_argument_group("gate (spec defaults)")
    gate.add_argument("--tau", type=float, default=None, help="neuron time constant (8)")
    gate.add_argument("--threshold", type=float, default=None, help="firing threshold (1.0)")
    gate.add_argument("--soft-reset", type=float, default=None, help="fraction of potential kept after a spike (0.6)")
    gate.add_argument("--v-reset", type=float, default=None, help="reset potential (0.0)")
    gate.add_argument("--merge-top-k", type=int, default=None, help="K of the union-top-K merge (64)")
    gate.add_argument("--divergence", choices=("tv", "kl", "js"), default=None, help="tv (default), kl, js")
    gate.add_argument("--softmax-over", choices=("tokenizer", "embedding"), default=None,
                      help="next-token distributions over the tokenizer's tokens (default: embedding rows past "
                           "them are padding) or over every embedding row (the paper's)")
    gate.add_argument("--safedecoding-m", type=int, default=None, help="SafeDecoding: steered tokens (2)")
    gate.add_argument("--safedecoding-alpha", type=float, default=None, help="SafeDecoding: alpha (3)")
    gate.add_argument("--safedecoding-common", type=int, default=None, help="SafeDecoding: common tokens c (5)")
    models.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                        help="stack each model's layers and run them with lax.scan: compiles in a time flat in "
                             "depth (5x faster for the paper's 8B pairs on a CPU), decodes slower on a CPU "
                             "(default: unrolled layers; see BENCHMARKS.md)")
    models.add_argument("--expert-placement", choices=("sharded", "replicated"), default="sharded",
                        help="the expert's weights split over the mesh like the base's (default) or a copy on "
                             "every device (a small expert beside a big base: no all-reduces for it)")
    distributed.add_arguments(p)


@dataclasses.dataclass
class Options:
    """Command line over preset over built-in defaults."""

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


def resolve_options(args) -> Options:
    options = Options()
    preset = args.preset
    if preset is None and args.base is None and args.expert is None:
        preset = DEFAULT_PRESET  # the embedded default pair decodes with its own preset
    layers = [load_preset(preset)] if preset else []
    layers.append({k: v for k, v in vars(args).items() if v is not None})
    fields = {f.name for f in dataclasses.fields(Options)}
    for layer in layers:
        for key, value in layer.items():
            if key in fields:
                setattr(options, key, value)
    if args.alpha is not None and args.reflect is None:
        options.reflect = "off"  # an explicit alpha means the user is setting it, not reflection
    return options


GATE_FLAGS = {"tau": "--tau", "threshold": "--threshold", "soft_reset": "--soft-reset", "v_reset": "--v-reset",
              "top_k": "--merge-top-k", "divergence": "--divergence"}


def check_options(options: Options, args) -> None:
    """Refuses settings that would fail or run meaninglessly, before any model is read."""
    from ngsd_jax.ngsd import gate_problem

    gate = {field: getattr(options, "merge_top_k" if field == "top_k" else field) for field in GATE_FLAGS}
    problem = gate_problem(gate, GATE_FLAGS)
    checks = [
        (problem is None, problem),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (0 < args.top_p <= 1, "--top-p must lie in (0, 1]"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (args.top_k >= 0, "--top-k must be >= 0 (0 = off)"),
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


def _resolve_models(options: Options, modes) -> tuple[str, str | None]:
    """Base and expert paths; a default expert trained as LoRA is used as its adapter (one weight stream)."""
    from ngsd_jax.default_model import default_base_path, default_expert_path
    from ngsd_jax.lora import ADAPTER_SUBDIR, is_adapter

    base = _checkpoint_path(options.base, "base") if options.base else str(default_base_path())
    expert = _checkpoint_path(options.expert, "expert") if options.expert else None
    if expert is None and any(mode != "base" for mode in modes):
        found = default_expert_path() if options.base is None else None
        if found is None:
            raise UsageError("no expert model: run `python -m ngsd_jax.train` to build the default one "
                             "(about 10 minutes on a laptop CPU), pass --expert PATH, or use --mode base")
        expert = str(found / ADAPTER_SUBDIR) if is_adapter(found / ADAPTER_SUBDIR) else str(found)
    return base, expert


def _checkpoint_path(name: str, role: str) -> str:
    """A local path, a name under the checkpoints directory (how presets name models), or a Hub id."""
    from ngsd_jax.hub import resolve_checkpoint
    from ngsd_jax.loading import CheckpointError

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


def trace_table(tokenizer, result, row: int) -> str:
    lines = [f"{'#':>4} {'token':<16} {'D':>6} {'v':>6} {'spike':>5} {'alpha':>5}"]
    for t in range(int(result.lengths[row])):
        token = tokenizer.decode([int(result.tokens[row, t])])
        lines.append(f"{t:>4} {json.dumps(token)[:16]:<16} {result.divergence[row, t]:6.3f} "
                     f"{result.potential[row, t]:6.3f} {'*' if result.spike[row, t] else '':>5} "
                     f"{result.alpha_in_force[row, t]:5.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UsageError, ValueError, OSError) as err:  # MeshError and MemoryPlanError are ValueErrors
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


@dataclasses.dataclass
class LoadedPair:
    """The engine over the models some modes need, with the tokenizers that encode its prompts."""

    engine: object
    base_tokenizer: object
    expert_tokenizer: object | None


def load_pair(options: Options, modes, args, prompts: list[str], prefill: str = "") -> LoadedPair:
    """Loads the base and expert that `modes` need, refusing a pair whose tokenizers differ before any
    weights, and placing the weights on the mesh that `args` asks for (after its memory plan)."""
    import jax.numpy as jnp

    from ngsd_jax.early_stop import early_stop_tables
    from ngsd_jax.engine import Engine
    from ngsd_jax.loading import load_model, load_model_config
    from ngsd_jax.lora import adapter_mismatch, is_adapter, load_adapter
    from ngsd_jax.tokenizer import compare_vocabularies, encode_chat, load_tokenizer, stop_token_ids

    base_path, expert_path = _resolve_models(options, modes)
    uses_base, uses_expert = any(m != "expert" for m in modes), any(m != "base" for m in modes)
    # Tokenizers first: a mismatched pair is refused before any weights are read.
    base_tok = load_tokenizer(base_path)
    adapter = load_adapter(expert_path) if uses_expert and expert_path and is_adapter(expert_path) else None
    # An adapter expert is the base plus a delta: it has the base's tokenizer.
    expert_tok = base_tok if adapter is not None else load_tokenizer(expert_path) if expert_path else None
    if uses_expert and expert_tok is not None:
        mismatch = compare_vocabularies(base_tok, expert_tok)
        if mismatch:
            raise UsageError(mismatch)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[options.dtype]
    chats = [(base_tok, options.system_prompt, options.chat_template),
             (expert_tok, options.expert_system_prompt, options.expert_chat_template)]
    widest = max(len(encode_chat(tok, p, system, template, prefill, thinking=options.thinking)) for p in prompts
                 for tok, system, template in chats if tok is not None)
    # An adapter's expert is the base's own weights plus a small delta: planned and loaded as the base.
    uses_base = uses_base or adapter is not None
    uses_expert_model = uses_expert and adapter is None
    models = [(name, path, placement) for name, path, placement, used in (
        ("base", base_path, "sharded", uses_base),
        ("expert", expert_path, args.expert_placement, uses_expert_model)) if used]
    vocab_size = _distribution_size(options.softmax_over, len(base_tok),
                                    {name: load_model_config(path) for name, path, _ in models})
    mesh = plan_devices(args, models, dtype, min(args.batch_size, len(prompts)), widest, options.max_new_tokens)
    base = load_model(base_path, dtype, mesh) if uses_base else None
    expert = load_model(expert_path, dtype, mesh, args.expert_placement) if uses_expert_model else None
    if adapter is not None:
        mismatch = adapter_mismatch(adapter, base, base_path)
        if mismatch:
            raise UsageError(f"{expert_path}: {mismatch}")
    engine = Engine(base, expert, mesh=mesh, vocab_size=vocab_size, adapter=adapter, scan_layers=args.scan_layers,
                    stop_ids=stop_token_ids(base_tok, (base or expert).config, options.chat_template),
                    pad_id=base_tok.pad_token_id or 0,
                    early_stop_tables=early_stop_tables(base_tok, vocab_size) if options.early_stop else None)
    return LoadedPair(engine, base_tok, expert_tok)


def decode_settings(options: Options, mode: str, sampling_top_k: int = 0):
    from ngsd_jax.engine import DecodeSettings
    from ngsd_jax.ngsd import GateConfig

    return DecodeSettings(
        mode=mode, max_new_tokens=options.max_new_tokens, sampling_top_k=sampling_top_k,
        gate=GateConfig(tau=options.tau, threshold=options.threshold, v_reset=options.v_reset,
                        soft_reset=options.soft_reset, top_k=options.merge_top_k, divergence=options.divergence),
        safedecoding_first_m=options.safedecoding_m, safedecoding_alpha=options.safedecoding_alpha,
        safedecoding_min_common=options.safedecoding_common, early_stop=options.early_stop,
    )


def alpha_mapping(options: Options):
    from ngsd_jax.reflection import AlphaMapping

    return AlphaMapping(tuple(options.alpha_levels), tuple(options.risk_thresholds))


def reflect_prompts(pair: LoadedPair, options: Options, mode: str, prompts: list[str]):
    """Self-reflection for the modes that take alpha (ngsd, always); every other mode gets reflection 'off'."""
    from ngsd_jax.reflection import reflect

    reflect_mode = options.reflect if mode in ("ngsd", "always") else "off"
    return reflect(pair.engine, pair.base_tokenizer, prompts, reflect_mode, options.alpha, options.chat_template,
                   thinking=options.thinking, parser=options.reflect_parse, prefix=options.reflect_prefix,
                   max_new_tokens=options.reflect_max_new_tokens, all_zero_risk=options.reflect_all_zero_risk,
                   mapping=alpha_mapping(options))


def in_program_expert_risk(pair: LoadedPair, options: Options, mode: str):
    """For `--reflect expert` in a mode that takes alpha: what the decode program needs to set each
    row's alpha from the expert's own prefill (no extra pass); else None."""
    from ngsd_jax.reflection import ExpertRisk, refusal_opening_mask

    if options.reflect != "expert" or mode not in ("ngsd", "always"):
        return None
    return ExpertRisk(refusal_opening_mask(pair.expert_tokenizer, pair.engine.vocab_size), alpha_mapping(options))


def encode_prompts(pair: LoadedPair, options: Options, prompts: list[str], prefill=""):
    """(base prompt ids, expert prompt ids or None), each ending with `prefill` (text or ids) forced."""
    from ngsd_jax.tokenizer import encode_chat

    base_prompts = [encode_chat(pair.base_tokenizer, p, options.system_prompt, options.chat_template, prefill,
                                thinking=options.thinking) for p in prompts]
    expert_prompts = None
    if pair.expert_tokenizer is not None:
        expert_prompts = [encode_chat(pair.expert_tokenizer, p, options.expert_system_prompt,
                                      options.expert_chat_template, prefill, thinking=options.thinking)
                          for p in prompts]
    return base_prompts, expert_prompts


def decode_prompts(pair: LoadedPair, settings, args, base_prompts, expert_prompts, alpha, expert_risk=None):
    """One engine call with the command line's sampling options; the expert mode decodes the expert's prompts."""
    first = base_prompts if settings.uses_base else expert_prompts
    return pair.engine.decode(first, expert_prompts, settings, alpha=alpha, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, expert_risk=expert_risk)


def run(args) -> int:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT or --prompts-file FILE")
    options = resolve_options(args)
    check_options(options, args)
    distributed.initialize(args.multi_host)  # before any other jax call

    from tqdm import tqdm

    from ngsd_jax.reflection import expert_reflection

    pair = load_pair(options, (options.mode,), args, prompts, args.prefill)
    settings = decode_settings(options, options.mode, args.top_k)
    expert_risk = in_program_expert_risk(pair, options, options.mode)
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    primary = distributed.is_primary()
    progress = tqdm(total=len(prompts), unit="prompt",
                    disable=len(batches) == 1 or not sys.stderr.isatty() or not primary,
                    desc=f"decoding ({options.mode})")
    for batch in batches:
        base_prompts, expert_prompts = encode_prompts(pair, options, batch, args.prefill)
        if expert_risk is None:
            reflections = reflect_prompts(pair, options, options.mode, batch)
            result = decode_prompts(pair, settings, args, base_prompts, expert_prompts, [r.alpha for r in reflections])
        else:
            result = decode_prompts(pair, settings, args, base_prompts, expert_prompts, 0.0, expert_risk)
            reflections = [expert_reflection(r, a) for r, a in zip(result.risk, result.alpha)]
        for i, prompt in enumerate(batch if primary else ()):
            text = pair.base_tokenizer.decode(result.sequence(i), skip_special_tokens=True)
            _emit(args, options, prompt, text, result, i, reflections[i], pair.base_tokenizer)
        progress.update(len(batch))
    progress.close()
    return 0


def plan_devices(args, models, dtype, batch: int, widest_prompt: int, new_tokens: int):
    """Chooses the mesh (None: one device, the unsharded program), prints the memory plan and
    refuses a configuration that does not fit. `models`: (name, path, placement) per model used."""
    from ngsd_jax.engine import bucket_length
    from ngsd_jax.loading import load_model_config
    from ngsd_jax.memory import check_fits, decode_plan, device_memory
    from ngsd_jax.sharding import make_mesh

    configs = [(name, load_model_config(path), dtype, placement) for name, path, placement in models]
    width = bucket_length(widest_prompt)
    plan_for = lambda mesh, rows=batch: decode_plan(configs, mesh, rows, width, new_tokens)  # noqa: E731
    capacity = device_memory(args.device_memory)
    shape = distributed.choose_mesh(args.mesh, plan_for, capacity)
    plan = plan_for(shape)
    # On one device of unknown size (a plain CPU run) the plan can neither choose nor refuse anything.
    if args.mesh or shape.size > 1 or capacity is not None:
        distributed.say(f"ngsd-jax decode: {plan.describe(capacity)}")
    check_fits(plan, capacity, plan_for)
    return None if shape.size == 1 else make_mesh(shape)


def _emit(args, options, prompt, text, result, i, reflection, tokenizer) -> None:
    n = int(result.lengths[i])
    if args.json:
        record = {
            "prompt": prompt, "prefill": args.prefill, "response": text, "mode": options.mode,
            "tokens": result.sequence(i), "spikes": int(result.spike[i, :n].sum()),
            "reflection": dataclasses.asdict(reflection),
            "trace": {"divergence": result.divergence[i, :n].round(5).tolist(),
                      "potential": result.potential[i, :n].round(5).tolist(),
                      "spike": result.spike[i, :n].tolist(),
                      "alpha": result.alpha_in_force[i, :n].tolist()},
        }
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    print(f"### {prompt}")
    if reflection.mode != "off":
        print(f"[reflection {reflection.mode}: risk {reflection.risk:.1f} -> alpha {reflection.alpha}"
              f"{'' if reflection.parsed in (None, True) else ', rating did not parse'}]")
    print(args.prefill + text)
    if args.trace:
        print(trace_table(tokenizer, result, i))
        print(f"[{int(result.spike[i, :n].sum())} spikes over {n} tokens]")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
