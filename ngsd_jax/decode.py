"""`python -m ngsd_jax.decode`: decode prompts with a base model and its safety expert.

    python -m ngsd_jax.decode --prompt "How do I pick a lock?" --trace
    python -m ngsd_jax.decode --prompts-file prompts.jsonl --json > out.jsonl
    python -m ngsd_jax.decode --preset llama3.1-8b+llama3.2-1b --prompt "..."

With no model named it decodes with the embedded default base (SmolLM2-135M-Instruct)
and the default expert that `python -m ngsd_jax.train` builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ngsd_jax import cli
from ngsd_jax.errors import UsageError, print_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    src.add_argument("--prompts-file", type=Path, help=".txt (one per line), .jsonl, .json or .csv")
    src.add_argument("--prefill", default="", metavar="TEXT",
                     help="force the response to start with TEXT for both models (prefilling attack)")
    cli.add_decode_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per prompt (with trace and reflection)")
    out.add_argument("--trace", action="store_true", help="print D, v, spike and alpha per generated token")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # UsageError, CheckpointError, MeshError, MemoryPlanError...
        return print_error(err)


def run(args: argparse.Namespace) -> int:
    from ngsd_jax.decoding.prompts import check_utf8, read_prompts

    for prompt in args.prompt:
        check_utf8(prompt, "--prompt")
    check_utf8(args.prefill, "--prefill")
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT or --prompts-file FILE")
    options = cli.decode_options(args)
    from ngsd_jax.decoding.pair import check_options

    check_options(options)
    from ngsd_jax.parallel import distributed

    distributed.initialize(options.devices.multi_host)  # before any other jax call
    distributed.enable_compilation_cache(options.devices.compilation_cache)
    from tqdm import tqdm

    from ngsd_jax.decoding.pair import decode_batch, decode_settings, load_pair

    pair = load_pair(options, (options.mode,), prompts, args.prefill)
    settings = decode_settings(options, options.mode)
    batches = [prompts[i: i + options.batch_size] for i in range(0, len(prompts), options.batch_size)]
    primary = distributed.is_primary()
    progress = tqdm(total=len(prompts), unit="prompt", disable=len(batches) == 1 or not sys.stderr.isatty()
                    or not primary, desc=f"decoding ({options.mode})")
    for batch in batches:
        result, reflections = decode_batch(pair, options, settings, batch, args.prefill)
        for i, prompt in enumerate(batch if primary else ()):
            text = pair.base_tokenizer.decode(result.sequence(i), skip_special_tokens=True)
            _emit(args, options.mode, prompt, text, result, i, reflections[i], pair.base_tokenizer)
        progress.update(len(batch))
    progress.close()
    return 0


def trace_table(tokenizer, result, row: int) -> str:
    lines = [f"{'#':>4} {'token':<16} {'D':>6} {'v':>6} {'spike':>5} {'alpha':>5}"]
    for t in range(int(result.lengths[row])):
        token = tokenizer.decode([int(result.tokens[row, t])])
        lines.append(f"{t:>4} {json.dumps(token)[:16]:<16} {result.divergence[row, t]:6.3f} "
                     f"{result.potential[row, t]:6.3f} {'*' if result.spike[row, t] else '':>5} "
                     f"{result.alpha_in_force[row, t]:5.2f}")
    return "\n".join(lines)


def _emit(args, mode, prompt, text, result, i, reflection, tokenizer) -> None:
    n = int(result.lengths[i])
    if args.json:
        record = {
            "prompt": prompt, "prefill": args.prefill, "response": text, "mode": mode,
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
