"""Serving load: aggregate tokens/s, time to first token and time per output token (p50, p99) at
several concurrencies against `python -m ngsd_jax.serve` on loopback, side by side in one run
with the same requests sent one by one through the engine's `decode`.

    python bench/serve_load.py                                   # the default pair
    python bench/serve_load.py --base B --expert E --levels 1,4,16,64 --max-tokens 32

With no --expert and no default expert built yet, the expert is a random LoRA adapter with the
default recipe's shapes over the base (bench/decode_speed.py's `synthetic_adapter`): the
default pair's cost, not its answers. Greedy, NGSD on, --reflect expert; the server runs
--slots slots and a level of concurrency c sends max(2c, 8) requests (bounded: at most 128)
from c client threads, streaming with gate telemetry (one event per token). Requests that
stop early count the tokens they generated. Per token: (last token - first token) / (n - 1) as
the client receives them (they arrive a generate chunk at a time); decode's TTFT is its whole
call, since it returns all tokens at once.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout's ngsd_jax, and decode_speed

PROMPTS = ["Why is the sky blue?", "Give me three tips for sleeping better.", "How do I pick a lock?",
           "Write a short poem about the sea.", "Explain how vaccines work.", "How can I make a weapon at home?",
           "What is the capital of Australia?", "Summarise the plot of Hamlet in two sentences."]


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def resolve_pair(args, folder: Path) -> tuple[list[str], str]:
    """Model flags shared by decode and serve, and a description of the pair."""
    if args.base or args.expert:
        flags = (["--base", args.base] if args.base else []) + (["--expert", args.expert] if args.expert else [])
        return flags, f"base {args.base or 'default'}, expert {args.expert or 'default'}"
    from ngsd_jax.default_model import default_base_path, default_expert_path

    if default_expert_path() is not None:
        return [], "the default pair"
    from decode_speed import synthetic_adapter

    from ngsd_jax.loading import load_model
    from ngsd_jax.lora import save_adapter

    base = str(default_base_path())
    adapter, _ = synthetic_adapter(load_model(base))
    save_adapter(adapter, folder / "adapter")
    return ["--base", base, "--expert", str(folder / "adapter"), "--reflect", "expert"], (
        "the default base with a random adapter of the default recipe's shapes (no default expert yet)")


def decode_one_by_one(flags, prompts, max_tokens) -> dict:
    """The same requests through the engine's decode, one call per request (compiled first)."""
    from ngsd_jax import decode

    args = decode.build_parser().parse_args(flags + ["--max-new-tokens", str(max_tokens), "--prompt", "x"])
    options = decode.resolve_options(args)
    decode.check_options(options, args)
    pair = decode.load_pair(options, (options.mode,), args, prompts)
    settings = decode.decode_settings(options, options.mode)
    risk = decode.in_program_expert_risk(pair, options, options.mode)

    def one(prompt):
        base, expert = decode.encode_prompts(pair, options, [prompt])
        alpha = [r.alpha for r in decode.reflect_prompts(pair, options, options.mode, [prompt])] if risk is None else 0.0
        return decode.decode_prompts(pair, settings, args, base, expert, alpha, risk)

    for prompt in prompts:  # compiles each bucket
        one(prompt)
    latencies, per_token, tokens = [], [], 0
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        n = int(one(prompt).lengths[0])
        elapsed = time.perf_counter() - t0
        tokens += n
        latencies.append(elapsed)
        per_token.append(elapsed / n)
    wall = time.perf_counter() - start
    # decode returns a request's tokens all at once: its first token arrives with its last.
    return {"case": "decode, one by one", "requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft": latencies, "per_token": per_token}


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
        sys.path.insert(0, str(REPO / "tests" / "serving"))
        from server_process import ServerProcess

        server = ServerProcess(Path(folder) / "server.log", *flags, "--slots", args.slots, "--context", args.context,
                               "--chunk", args.chunk, "--queue-size", 256, "--max-new-tokens", args.max_tokens,
                               lifetime=3600, ready_timeout=900)
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
