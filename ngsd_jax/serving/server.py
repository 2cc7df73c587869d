"""Assembles and runs the server: slot engine, decode service, web app, uvicorn."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import uvicorn

from ngsd_jax.reflection import ExpertRisk
from ngsd_jax.serving.http import ServeSettings, create_app
from ngsd_jax.serving.service import Service
from ngsd_jax.serving.slots import SlotConfig, SlotEngine


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    slots: SlotConfig = SlotConfig()
    queue_size: int = 64
    alpha: float = 0.5  # for requests that give none, when the server does not reflect
    reflect: str = "off"  # "expert": alpha from the expert's prefill
    web: ServeSettings = ServeSettings()
    exit_after: float | None = None  # seconds; then drain and exit (tests, benchmarks)


def default_compilation_cache() -> Path:
    """$XDG_CACHE_HOME/ngsd-jax/xla (default ~/.cache/ngsd-jax/xla)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ngsd-jax" / "xla"


def enable_compilation_cache(directory: str | Path | None) -> None:
    """JAX's persistent compilation cache in `directory` (None: off). Every program is kept, however
    quick to compile, so that a second start compiles nothing."""
    if directory is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def say(message: str) -> None:
    print(f"ngsd-jax serve: {message}", file=sys.stderr, flush=True)


def serve(engine, base_tokenizer, expert_tokenizer, options: ServerOptions, expert_risk: ExpertRisk | None) -> int:
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
