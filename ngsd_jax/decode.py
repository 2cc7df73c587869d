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
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESETS_DIR = Path(__file__).resolve().parent.parent / "decode"
DEFAULT_PRESET = "smollm2-135m"
PROMPT_FIELDS = ("prompt", "goal", "Goal", "instruction", "text", "question")


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


def read_prompts(path: Path) -> list[str]:
    """Prompts from .txt (one per line), .jsonl, .json (a list of strings or objects) or .csv."""
    if not path.is_file():
        raise UsageError(f"{path}: no such prompts file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        field = next((f for f in PROMPT_FIELDS if rows and f in rows[0]), None)
        if field is None:
            raise UsageError(f"{path}: no prompt column; name one of {', '.join(PROMPT_FIELDS)}")
        return [row[field] for row in rows]
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{number}: not JSON ({err.msg})") from None
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(items, list):
            raise UsageError(f"{path}: expected a JSON list of prompts")
    else:
        raise UsageError(f"{path}: unknown prompts format '{suffix}'; use .txt, .jsonl, .json or .csv")
    prompts = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            prompts.append(item)
            continue
        field = next((f for f in PROMPT_FIELDS if isinstance(item, dict) and f in item), None)
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
    from ngsd_jax.engine import MODES
    from ngsd_jax.reflection import REFLECT_MODES

    p = argparse.ArgumentParser(prog="python -m ngsd_jax.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    src.add_argument("--prompts-file", type=Path, help=".txt (one per line), .jsonl, .json or .csv")
    src.add_argument("--prefill", default="", metavar="TEXT",
                     help="force the response to start with TEXT for both models (prefilling attack)")
    models = p.add_argument_group("models")
    models.add_argument("--preset", help=f"a decode preset from decode/ ({', '.join(sorted(x.stem for x in PRESETS_DIR.glob('*.json')))})")
    models.add_argument("--base", help="base checkpoint: HF directory, .gguf, or converted checkpoint (default: embedded SmolLM2-135M-Instruct)")
    models.add_argument("--expert", help="expert checkpoint (default: the expert `python -m ngsd_jax.train` builds)")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype (default float32)")
    models.add_argument("--system-prompt", default=None, help="system prompt for the base model")
    models.add_argument("--expert-system-prompt", default=None, help="system prompt for the expert (its own format)")
    models.add_argument("--chat-template", default=None, help="Jinja template (string or .jinja file) for the base")
    models.add_argument("--expert-chat-template", default=None, help="Jinja template for the expert")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--mode", choices=MODES, default=None, help="ngsd (default), base, expert, always, safedecoding")
    dec.add_argument("--reflect", choices=REFLECT_MODES, default=None,
                     help="how alpha is set: json (the paper's self-reflection, default), logit, expert (the "
                          "expert's probability of opening with a refusal, read inside the decode program), off "
                          "(use --alpha)")
    dec.add_argument("--alpha", type=float, default=None, help="expert pull when --reflect off (default 0.5)")
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
                     help="the reference's early-stop heuristic (spec §5; off by default): from 128 tokens, "
                          "when alpha >= 0.5, a refusal phrase, trailing spaces, emoji or control characters "
                          "in the last 64 tokens cap the answer at +128 tokens, ending at a sentence end")
    gate = p.add_argument_group("gate (spec defaults)")
    gate.add_argument("--tau", type=float, default=None, help="neuron time constant (8)")
    gate.add_argument("--threshold", type=float, default=None, help="firing threshold (1.0)")
    gate.add_argument("--soft-reset", type=float, default=None, help="fraction of potential kept after a spike (0.6)")
    gate.add_argument("--v-reset", type=float, default=None, help="reset potential (0.0)")
    gate.add_argument("--merge-top-k", type=int, default=None, help="K of the union-top-K merge (64)")
    gate.add_argument("--divergence", choices=("tv", "kl", "js"), default=None, help="tv (default), kl, js")
    gate.add_argument("--safedecoding-m", type=int, default=None, help="SafeDecoding: steered tokens (2)")
    gate.add_argument("--safedecoding-alpha", type=float, default=None, help="SafeDecoding: alpha (3)")
    gate.add_argument("--safedecoding-common", type=int, default=None, help="SafeDecoding: common tokens c (5)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per prompt (with trace and reflection)")
    out.add_argument("--trace", action="store_true", help="print D, v, spike and alpha per generated token")
    return p


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


def _resolve_models(options: Options) -> tuple[str, str | None]:
    from ngsd_jax.default_model import default_base_path, default_expert_path

    base = _checkpoint_path(options.base) if options.base else str(default_base_path())
    expert = _checkpoint_path(options.expert) if options.expert else None
    if expert is None and options.mode != "base":
        found = default_expert_path() if options.base is None else None
        if found is None:
            raise UsageError("no expert model: run `python -m ngsd_jax.train` to build the default one "
                             "(about 10 minutes on a laptop CPU), pass --expert PATH, or use --mode base")
        expert = str(found)
    return base, expert


def _checkpoint_path(name: str) -> str:
    """A path as given, or else relative to the checkpoints directory (how presets name models)."""
    from ngsd_jax.default_model import checkpoints_dir

    path = Path(name).expanduser()
    if path.exists() or path.is_absolute():
        return str(path)
    under = checkpoints_dir() / name
    if under.exists():
        return str(under)
    raise UsageError(f"{name}: no such checkpoint here or under {checkpoints_dir()}; convert or download it there")


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
    except (UsageError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


def run(args) -> int:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT or --prompts-file FILE")
    if args.batch_size < 1 or args.top_p <= 0 or args.top_p > 1 or args.temperature < 0:
        raise UsageError("need --batch-size >= 1, 0 < --top-p <= 1 and --temperature >= 0")
    options = resolve_options(args)

    import jax.numpy as jnp
    from tqdm import tqdm

    from ngsd_jax.early_stop import early_stop_tables
    from ngsd_jax.engine import DecodeSettings, Engine
    from ngsd_jax.loading import load_model
    from ngsd_jax.ngsd import GateConfig
    from ngsd_jax.reflection import AlphaMapping, ExpertRisk, expert_reflection, reflect, refusal_opening_mask
    from ngsd_jax.tokenizer import compare_vocabularies, encode_chat, load_tokenizer, stop_token_ids

    base_path, expert_path = _resolve_models(options)
    uses_base, uses_expert = options.mode != "expert", options.mode != "base"
    # Tokenizers first: a mismatched pair is refused before any weights are read.
    base_tok = load_tokenizer(base_path)
    expert_tok = load_tokenizer(expert_path) if expert_path else None
    if uses_expert and expert_tok is not None:
        mismatch = compare_vocabularies(base_tok, expert_tok)
        if mismatch:
            raise UsageError(mismatch)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[options.dtype]
    base = load_model(base_path, dtype) if uses_base else None
    expert = load_model(expert_path, dtype) if uses_expert else None
    engine = Engine(base, expert, vocab_size=len(base_tok),
                    stop_ids=stop_token_ids(base_tok, (base or expert).config, options.chat_template),
                    pad_id=base_tok.pad_token_id or 0,
                    early_stop_tables=early_stop_tables(base_tok, len(base_tok)) if options.early_stop else None)
    settings = DecodeSettings(
        mode=options.mode, max_new_tokens=options.max_new_tokens, sampling_top_k=args.top_k,
        gate=GateConfig(tau=options.tau, threshold=options.threshold, v_reset=options.v_reset,
                        soft_reset=options.soft_reset, top_k=options.merge_top_k, divergence=options.divergence),
        safedecoding_first_m=options.safedecoding_m, safedecoding_alpha=options.safedecoding_alpha,
        safedecoding_min_common=options.safedecoding_common, early_stop=options.early_stop,
    )
    reflect_mode = options.reflect if options.mode in ("ngsd", "always") else "off"
    mapping = AlphaMapping(tuple(options.alpha_levels), tuple(options.risk_thresholds))
    expert_risk = None
    if reflect_mode == "expert":
        expert_risk = ExpertRisk(refusal_opening_mask(expert_tok, len(base_tok)), mapping)
        reflect_mode = "off"  # alpha is set inside the decode program
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    progress = tqdm(total=len(prompts), unit="prompt", disable=len(batches) == 1 or not sys.stderr.isatty(),
                    desc=f"decoding ({options.mode})")
    for batch in batches:
        reflections = reflect(engine, base_tok, batch, reflect_mode, options.alpha, options.chat_template, mapping)
        base_prompts = [encode_chat(base_tok, p, options.system_prompt, options.chat_template, args.prefill)
                        for p in batch]
        expert_prompts = None
        if expert_tok is not None:
            expert_prompts = [encode_chat(expert_tok, p, options.expert_system_prompt, options.expert_chat_template,
                                          args.prefill) for p in batch]
        result = engine.decode(base_prompts if uses_base else expert_prompts, expert_prompts, settings,
                               alpha=[r.alpha for r in reflections], temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, expert_risk=expert_risk)
        if expert_risk is not None:
            reflections = [expert_reflection(r, a) for r, a in zip(result.risk, result.alpha)]
        for i, prompt in enumerate(batch):
            text = base_tok.decode(result.sequence(i), skip_special_tokens=True)
            _emit(args, options, prompt, text, result, i, reflections[i], base_tok)
        progress.update(len(batch))
    progress.close()
    return 0


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
