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

from ngsd_jax import cli
from ngsd_jax.errors import print_error

SERVE_FIELDS = ("host", "port", "slots", "context", "chunk", "queue_size", "max_tokens_limit", "served_model_name",
                "request_modes", "alpha_range", "tau_range", "threshold_range", "request_gate", "drain_timeout",
                "exit_after")


def _range(text: str) -> tuple[float, float]:
    """argparse type: LOW,HIGH (their order is checked with the other options)."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, e.g. 0.1,0.9; got {text!r}") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ngsd_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_decode_options(p)
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
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests at shutdown")
    s.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)  # tests and benchmarks
    return p


def serve_options(args: argparse.Namespace):
    """ServeOptions from the flags: decode's options (command line over preset over defaults) and the server's."""
    from ngsd_jax.serving.server import SERVE_REFLECT, ServeOptions

    decode = cli.decode_options(args)
    if args.reflect is None and decode.reflect not in SERVE_REFLECT:
        decode.reflect = "expert"  # json and logit need a generation per request; the expert reads the prefill
    return ServeOptions(decode=decode, **{k: getattr(args, k) for k in SERVE_FIELDS})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ngsd_jax.serving.server import run_server

        return run_server(serve_options(args))
    except (ValueError, OSError) as err:  # UsageError, ServingError, CheckpointError...
        return print_error(err)


if __name__ == "__main__":
    sys.exit(main())
