"""`python -m ngsd_jax.serve`: an OpenAI-compatible server with NGSD on every request.

    python -m ngsd_jax.serve                      # the embedded default pair on 127.0.0.1:8000
    python -m ngsd_jax.serve --base B --expert E --slots 8 --port 9000

Takes decode's model, preset, gate and reflection options. Serves the modes ngsd and base and
sets alpha with --reflect expert (the default pair's preset) or off (--alpha); json and logit
reflection, --early-stop and the expert, always and safedecoding modes are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ngsd_jax import decode

SERVE_REFLECT = ("expert", "off")


def _range(text: str) -> tuple[float, float]:
    low, high = decode._floats(2)(text)
    if low > high:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH; got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    decode.add_decode_options(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (continuous batching)")
    s.add_argument("--context", type=int, default=1024, help="tokens per slot, prompt and completion (1024)")
    s.add_argument("--chunk", type=int, default=8, help="decode steps per generate call (8)")
    s.add_argument("--queue-size", type=int, default=64, help="requests waiting for a slot before 429 (64)")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: the context)")
    s.add_argument("--served-model-name", default="ngsd-jax", help="the model id clients name (ngsd-jax)")
    s.add_argument("--request-modes", default="ngsd,base", help="modes a request may choose (ngsd,base)")
    s.add_argument("--alpha-range", type=_range, default=(0.0, 1.0), metavar="LOW,HIGH")
    s.add_argument("--tau-range", type=_range, default=(1.0, 64.0), metavar="LOW,HIGH")
    s.add_argument("--threshold-range", type=_range, default=(0.05, 10.0), metavar="LOW,HIGH")
    s.add_argument("--request-gate", action=argparse.BooleanOptionalAction, default=True,
                   help="let requests set tau, threshold, soft_reset and v_reset (default on)")
    s.add_argument("--compilation-cache", type=Path, default=None,
                   help="JAX's persistent compilation cache (default ~/.cache/ngsd-jax/xla)")
    s.add_argument("--no-compilation-cache", action="store_true", help="compile everything at every start")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests at shutdown")
    s.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)  # tests and benchmarks
    return p


def server_options(args, options: decode.Options):
    """The typed options of the server from the command line and decode's resolved options."""
    from ngsd_jax.ngsd import GateConfig
    from ngsd_jax.serving.http import ServeSettings
    from ngsd_jax.serving.server import ServerOptions
    from ngsd_jax.serving.service import ChatFormat, RequestLimits
    from ngsd_jax.serving.slots import SERVING_MODES, SlotConfig

    if options.mode not in SERVING_MODES:
        raise decode.UsageError(f"serve runs the modes {', '.join(SERVING_MODES)}, not --mode {options.mode}")
    if args.reflect is None and options.reflect not in SERVE_REFLECT:
        options.reflect = "expert"  # json and logit need a generation per request; the expert reads the prefill
    if options.reflect not in SERVE_REFLECT:
        raise decode.UsageError(f"serve sets alpha with --reflect expert or off, not --reflect {options.reflect}")
    if options.early_stop:
        raise decode.UsageError("serve does not run --early-stop")
    modes = tuple(m for m in args.request_modes.split(",") if m)
    if not modes or set(modes) - set(SERVING_MODES):
        raise decode.UsageError(f"--request-modes takes modes among {', '.join(SERVING_MODES)}")
    if min(args.slots, args.chunk, args.queue_size) < 1 or args.context < 2:
        raise decode.UsageError("--slots, --chunk and --queue-size must be >= 1, --context >= 2")
    reflect = options.reflect if options.mode == "ngsd" else "off"
    gate = GateConfig(options.tau, options.threshold, options.v_reset, options.soft_reset, options.merge_top_k,
                      options.divergence)
    limit = args.max_tokens_limit or args.context - 1
    # Both sides formatted alike: an adapter expert's prompt is the base's (one pass below the adapter).
    shared = (options.expert_system_prompt == options.system_prompt
              and options.expert_chat_template == options.chat_template)
    web = ServeSettings(
        model_name=args.served_model_name, max_tokens=min(options.max_new_tokens, limit), max_tokens_limit=limit,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, drain_timeout=args.drain_timeout,
        limits=RequestLimits(modes, args.alpha_range, args.tau_range, args.threshold_range, gate=args.request_gate),
        chat=ChatFormat(options.system_prompt, options.expert_system_prompt, options.chat_template,
                        options.expert_chat_template, options.thinking))
    return ServerOptions(host=args.host, port=args.port, queue_size=args.queue_size, alpha=options.alpha,
                         reflect=reflect, web=web, exit_after=args.exit_after,
                         slots=SlotConfig(args.slots, args.context, args.chunk, options.mode, gate, args.top_k,
                                          shared_prompts=shared))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = decode.resolve_options(args)
        decode.check_options(options, args)
        serve_options = server_options(args, options)
        from ngsd_jax.serving.server import default_compilation_cache, enable_compilation_cache, serve

        enable_compilation_cache(None if args.no_compilation_cache else
                                 args.compilation_cache or default_compilation_cache())
        pair = decode.load_pair(options, (options.mode,), args, ["Hello"])
        return serve(pair.engine, pair.base_tokenizer, pair.expert_tokenizer, serve_options,
                     decode.in_program_expert_risk(pair, options, options.mode))
    except (decode.UsageError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
