"""Serving load: aggregate tokens/s, time to first token and time per output token (p50, p99) at
several concurrencies against `python -m ngsd_jax.serve` on loopback, side by side in one run
with the same requests sent one by one through decode's own path (`decoding.pair.decode_batch`).

    python bench/serve_load.py                                   # the default pair
    python bench/serve_load.py --base B --expert E --levels 1,4,16,64 --max-tokens 32

With no --expert and no default expert built yet, the expert is a random LoRA adapter with the
default recipe's shapes over the base (bench/common.py's `synthetic_adapter`): the default
pair's cost, not its answers. Greedy, NGSD on, --reflect expert; the server runs --slots slots
and a level of concurrency c sends max(2c, 8) requests (bounded: at most 128) from c client
threads, streaming with gate telemetry (one event per token). Requests that stop early count
the tokens they generated. Per token: (last token - first token) / (n - 1) as the client
receives them (they arrive a generate chunk at a time); decode's TTFT is its whole call, since
it returns all tokens at once (each request is decoded once untimed first, to compile, then
timed: bench/common.py's `time_round_robin`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # the server runs this checkout's ngsd_jax (cwd=REPO); so must decode here

from common import SHORT_PROMPT, load_default_pair, model_flags, synthetic_adapter, time_round_robin  # noqa: E402

PROMPTS = [SHORT_PROMPT, "Give me three tips for sleeping better.", "How do I pick a lock?",
           "Write a short poem about the sea.", "Explain how vaccines work.", "How can I make a weapon at home?",
           "What is the capital of Australia?", "Summarise the plot of Hamlet in two sentences."]


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def resolve_pair(args, folder: Path) -> tuple[list[str], str]:
    """Model flags shared by decode and serve (alpha from the expert's prefill), and a description of the pair."""
    if args.base or args.expert:
        return model_flags(args.base, args.expert) + ["--reflect", "expert"], (
            f"base {args.base or 'default'}, expert {args.expert or 'default'}")
    from ngsd_jax.checkpoints.default_model import default_base_path, default_expert_path

    if default_expert_path() is not None:
        return ["--reflect", "expert"], "the default pair"
    from ngsd_jax.checkpoints.adapter import save_adapter
    from ngsd_jax.checkpoints.weights import load_model

    base = str(default_base_path())
    adapter, _ = synthetic_adapter(load_model(base))
    save_adapter(adapter, folder / "adapter")
    return model_flags(base, str(folder / "adapter")) + ["--reflect", "expert"], (
        "the default base with a random adapter of the default recipe's shapes (no default expert yet)")


def decode_one_by_one(flags, prompts, max_tokens) -> dict:
    """The same requests through decode's path, one call per request (each compiled first)."""
    from ngsd_jax.decoding.pair import decode_batch, decode_settings

    pair, options = load_default_pair(flags, ("ngsd",), prompts, max_new_tokens=max_tokens)
    settings = decode_settings(options, options.mode)
    cases = {i: (lambda prompt=prompt: decode_batch(pair, options, settings, [prompt])[0])
             for i, prompt in enumerate(prompts)}
    _, results, timings = time_round_robin(cases, repeats=1)
    latencies = [timings[i][0] for i in cases]
    lengths = [int(results[i].lengths[0]) for i in cases]  # greedy: every call decodes the same tokens
    wall, tokens = sum(latencies), sum(lengths)
    # decode returns a request's tokens all at once: its first token arrives with its last.
    return {"case": "decode, one by one", "requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft": latencies,
            "per_token": [t / n for t, n in zip(latencies, lengths)]}


class Server:
    """`python -m ngsd_jax.serve FLAGS` on a free loopback port, its stderr in `log`; ready once
    /health answers ok (every program compiled)."""

    def __init__(self, log: Path, *flags, ready_timeout: float = 900):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "ngsd_jax.serve", "--host", "127.0.0.1", "--port",
                                      str(self.port), *map(str, flags)], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=self._log_file)
        deadline = time.monotonic() + ready_timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=30) as response:
                return json.loads(response.read()).get("status") == "ok"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM: the server drains and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log_file.close()


def stream_request(port: int, prompt: str, max_tokens: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps({
        "model": "ngsd-jax", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "stream": True, "ngsd": {"telemetry": True}}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        return {"status": response.status}
    times = []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choices = json.loads(line[6:])["choices"]
        if choices and "token_id" in (choices[0].get("ngsd") or {}):
            times.append(time.perf_counter())
    connection.close()
    return {"status": 200, "tokens": len(times), "ttft": times[0] - sent if times else None,
            "per_token": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}


def load_level(port: int, concurrency: int, max_tokens: int) -> dict:
    count = min(128, max(2 * concurrency, 8))
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    results, lock = [], threading.Lock()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                prompt = jobs.pop()
            result = stream_request(port, prompt, max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"case": f"serve, concurrency {concurrency}", "requests": len(ok), "refused": len(results) - len(ok),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
            "per_token": [r["per_token"] for r in ok if r["per_token"] is not None]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base")
    p.add_argument("--expert")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        flags, described = resolve_pair(args, Path(folder))
        print(f"pair: {described}", flush=True)
        rows = [decode_one_by_one(flags, PROMPTS, args.max_tokens)]
        print(f"decode one by one: {rows[0]['tokens_per_s']:.1f} tokens/s", flush=True)
        server = Server(Path(folder) / "server.log", *flags, "--slots", args.slots, "--context", args.context,
                        "--chunk", args.chunk, "--queue-size", 256, "--max-new-tokens", args.max_tokens,
                        "--exit-after", 3600)
        try:
            for level in levels:
                rows.append(load_level(server.port, level, args.max_tokens))
                print(f"concurrency {level}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            server.stop()
            warm_up = [line for line in server.log.read_text().splitlines() if "warm-up" in line]
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{warm_up[0] if warm_up else ''}\nslots {args.slots}, context {args.context}, chunk {args.chunk}, "
          f"max_tokens {args.max_tokens}, greedy\n")
    print("| case | requests | refused | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | per token p50 ms | "
          "per token p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = lambda name, q, r=r: 1000 * percentile(r[name], q)  # noqa: E731
        print(f"| {r['case']} | {r['requests']} | {r.get('refused', 0)} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{ms('ttft', 50):.0f} | {ms('ttft', 99):.0f} | {ms('per_token', 50):.1f} | {ms('per_token', 99):.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
