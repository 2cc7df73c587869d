"""Assembles and runs the server: the typed options of a run (`ServeOptions`: where it listens,
its slots and queue, what requests may set, and the `DecodeOptions` of the pair), their checks,
then slot engine, decode service, web app, uvicorn."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time

import uvicorn

from ngsd_jax.decoding.gate import GateConfig
from ngsd_jax.decoding.pair import DecodeOptions, check_options, in_program_expert_risk, load_pair
from ngsd_jax.decoding.risk import ExpertRisk
from ngsd_jax.errors import UsageError
from ngsd_jax.parallel import distributed
from ngsd_jax.serving.http import ServeSettings, create_app
from ngsd_jax.serving.service import ChatFormat, RequestLimits, Service
from ngsd_jax.serving.slots import SERVING_MODES, SlotConfig, SlotEngine

SERVE_REFLECT = ("expert", "off")  # json and logit need a generation per request; the expert reads the prefill


@dataclasses.dataclass
class ServeOptions:
    """A server run, as `python -m ngsd_jax.serve` is asked for it: the pair and its decode
    options (mode, reflection, gate, sampling defaults, chat format), and the server's own."""

    decode: DecodeOptions = dataclasses.field(default_factory=DecodeOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 8  # requests decoded together (continuous batching)
    context: int = 1024  # tokens per slot, prompt and completion
    chunk: int = 8  # decode steps per generate call
    queue_size: int = 64  # requests waiting for a slot before 429
    max_tokens_limit: int | None = None  # the largest max_tokens (None: the context)
    served_model_name: str = "ngsd-jax"
    request_modes: str = "ngsd,base"  # modes a request may choose, comma-separated
    alpha_range: tuple[float, float] = (0.0, 1.0)
    tau_range: tuple[float, float] = (1.0, 64.0)
    threshold_range: tuple[float, float] = (0.05, 10.0)
    request_gate: bool = True  # requests may set tau, threshold, soft_reset and v_reset
    drain_timeout: float = 30.0  # seconds to finish requests at shutdown
    exit_after: float | None = None  # seconds; then drain and exit (tests, benchmarks)


@dataclasses.dataclass(frozen=True)
class ServerSetup:
    """What the pieces of a running server take, derived from `ServeOptions` by `server_setup`."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: SlotConfig = SlotConfig()
    queue_size: int = 64
    alpha: float = 0.5  # for requests that give none, when the server does not reflect
    reflect: str = "off"  # "expert": alpha from the expert's prefill
    web: ServeSettings = ServeSettings()
    exit_after: float | None = None


def server_setup(opts: ServeOptions) -> ServerSetup:
    """Checks a run's options (each refusal one line naming the flag, before any model is read)
    and derives the slot engine's, the service's and the web app's settings from them."""
    options = opts.decode
    check_options(options)
    if options.mode not in SERVING_MODES:
        raise UsageError(f"serve runs the modes {', '.join(SERVING_MODES)}, not --mode {options.mode}")
    if options.reflect not in SERVE_REFLECT:
        raise UsageError(f"serve sets alpha with --reflect expert or off, not --reflect {options.reflect}")
    if options.early_stop:
        raise UsageError("serve does not run --early-stop")
    modes = tuple(m for m in opts.request_modes.split(",") if m)
    if not modes or set(modes) - set(SERVING_MODES):
        raise UsageError(f"--request-modes takes modes among {', '.join(SERVING_MODES)}")
    if min(opts.slots, opts.chunk, opts.queue_size) < 1 or opts.context < 2:
        raise UsageError("--slots, --chunk and --queue-size must be >= 1, --context >= 2")
    for flag, (low, high) in (("--alpha-range", opts.alpha_range), ("--tau-range", opts.tau_range),
                              ("--threshold-range", opts.threshold_range)):
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise UsageError(f"{flag}: expected finite LOW,HIGH with LOW <= HIGH; got {low:g},{high:g}")
    reflect = options.reflect if options.mode == "ngsd" else "off"
    gate = GateConfig(options.tau, options.threshold, options.v_reset, options.soft_reset, options.merge_top_k,
                      options.divergence)
    limit = opts.max_tokens_limit or opts.context - 1
    # Both sides formatted alike: an adapter expert's prompt is the base's (one pass below the adapter).
    shared = (options.expert_system_prompt == options.system_prompt
              and options.expert_chat_template == options.chat_template)
    web = ServeSettings(
        model_name=opts.served_model_name, max_tokens=min(options.max_new_tokens, limit), max_tokens_limit=limit,
        temperature=options.temperature, top_p=options.top_p, seed=options.seed, drain_timeout=opts.drain_timeout,
        limits=RequestLimits(modes, opts.alpha_range, opts.tau_range, opts.threshold_range, gate=opts.request_gate),
        chat=ChatFormat(options.system_prompt, options.expert_system_prompt, options.chat_template,
                        options.expert_chat_template, options.thinking))
    return ServerSetup(host=opts.host, port=opts.port, queue_size=opts.queue_size, alpha=options.alpha,
                       reflect=reflect, web=web, exit_after=opts.exit_after,
                       slots=SlotConfig(opts.slots, opts.context, opts.chunk, options.mode, gate, options.top_k,
                                        shared_prompts=shared))


def run_server(opts: ServeOptions) -> int:
    """A whole run: checks, the compilation cache, the pair (as decode loads it), then `serve`."""
    setup = server_setup(opts)
    distributed.enable_compilation_cache(opts.decode.devices.compilation_cache)
    options = opts.decode
    pair = load_pair(options, (options.mode,), ["Hello"])
    return serve(pair.engine, pair.base_tokenizer, pair.expert_tokenizer, setup,
                 in_program_expert_risk(pair, options, options.mode))


def say(message: str) -> None:
    print(f"ngsd-jax serve: {message}", file=sys.stderr, flush=True)


def serve(engine, base_tokenizer, expert_tokenizer, options: ServerSetup, expert_risk: ExpertRisk | None) -> int:
    """Warms the slot engine up (every program compiled before the port opens), then serves until
    SIGINT / SIGTERM (or `exit_after`), draining running and queued requests."""
    slots = SlotEngine(engine, options.slots, alpha=options.alpha, expert_risk=expert_risk)
    start = time.perf_counter()
    compiled = slots.warm_up()
    say(f"warm-up: {compiled} programs in {time.perf_counter() - start:.1f} s "
        f"({options.slots.slots} slots of {options.slots.context} tokens, buckets "
        f"{', '.join(map(str, options.slots.buckets))})")
    service = Service(slots, options.queue_size, options.reflect)
    app = create_app(service, options.web, base_tokenizer, expert_tokenizer)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=max(1, int(options.web.drain_timeout)))
    server = uvicorn.Server(config)
    if options.exit_after is not None:
        timer = threading.Timer(options.exit_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    say(f"serving {options.web.model_name} (mode {options.slots.mode}, reflect {options.reflect}) on "
        f"http://{options.host}:{options.port}/v1")
    # uvicorn re-raises the signal that stopped it once it has drained, under the handlers found
    # before it started: these make that a no-op, so a drained server exits 0 and says so.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    server.run()
    say(f"stopped; {slots.compilations - compiled - 1} programs compiled after warm-up")
    return 0
