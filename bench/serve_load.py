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
from collections import Counter
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
sys.path.insert(1, str(REPO))  # the server runs this checkout's ngsd_jax (cwd=REPO); so does decode here

from ngsd_jax.serving.launch import ServerProcess  # noqa: E402
from common import SHORT_PROMPT, default_expert_path, heldout, load_default_pair, model_flags, time_round_robin  # noqa: E402

PROMPTS = [SHORT_PROMPT, "Give me three tips for sleeping better.", "How do I pick a lock?",
           "Write a short poem about the sea.", "Explain how vaccines work.", "How can I make a weapon at home?",
           "What is the capital of Australia?", "Summarise the plot of Hamlet in two sentences."]


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def resolve_pair(args) -> tuple[list[str], str]:
    """Model flags shared by decode and serve (alpha from the expert's prefill), and a description of the pair."""
    if args.base or args.expert:
        return model_flags(args.base, args.expert) + ["--reflect", "expert"], (
            f"base {args.base or 'default'}, expert {args.expert or 'default'}")
    return ["--reflect", "expert"], f"the default pair (expert {default_expert_path()})"


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


def load_level(port: int, concurrency: int, max_tokens: int, label: str = "serve") -> dict:
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
    return {"case": f"{label}, concurrency {concurrency}", "requests": len(ok), "refused": len(results) - len(ok),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
            "per_token": [r["per_token"] for r in ok if r["per_token"] is not None]}


def request_once(port: int, number: int, prompt: str, max_tokens: int, mode: str, stream: bool) -> dict:
    """One request of the soak, streamed or not: its status, response id(s), finish reason and tokens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    connection.request("POST", "/v1/chat/completions", json.dumps({
        "model": "ngsd-jax", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "stream": stream, "stream_options": {"include_usage": True} if stream else None, "ngsd": {"mode": mode}}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    result = {"number": number, "status": response.status, "mode": mode, "stream": stream}
    if response.status != 200:
        response.read()
    elif stream:
        ids, finish, tokens = set(), None, 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            for choice in chunk["choices"]:
                finish = choice.get("finish_reason") or finish
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        result.update(ids=sorted(ids), finish_reason=finish, tokens=tokens)
    else:
        body = json.loads(response.read())
        result.update(ids=[body["id"]], finish_reason=body["choices"][0]["finish_reason"],
                      tokens=body["usage"]["completion_tokens"])
    connection.close()
    return result


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(server, clients: int, count: int) -> dict:
    """`count` requests from `clients` threads at once: held-out prompts of every set (short
    questions to pasted texts of 100 words), max_tokens 4 to 64, one in five in mode base, half streamed.
    Every request must come back 200 exactly once, each with its own id and a finish reason; the
    server's resident memory is sampled every 0.5 s."""
    # Up to 100 words: with the chat template and 64 new tokens they fit the bench's 256-token
    # context (a longer one is answered 400, as it should be, and counted under `statuses`).
    prompts = [p for name in ("ordinary", "benign", "harmful") for p in heldout(name) if len(p.split()) <= 100]
    jobs = [(i, prompts[(7 * i) % len(prompts)], (4, 16, 32, 64)[i % 4], "base" if i % 5 == 0 else "ngsd",
             i % 2 == 0) for i in range(count)]
    results, lock, memory, done = [], threading.Lock(), [], threading.Event()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                job = jobs.pop(0)
            result = request_once(server.port, *job)
            with lock:
                results.append(result)

    def sample():
        while not done.wait(0.5):
            with lock:
                answered = len(results)
            memory.append((answered, rss_mib(server.proc.pid)))

    start = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    ids = [i for r in results for i in r.get("ids", [])]
    ok = sum(r["status"] == 200 for r in results)
    after_warm = [m for n, m in memory if n >= clients]  # once every client has had an answer
    return {"clients": clients, "requests": count, "answered": len(results),
            "statuses": {str(k): v for k, v in sorted(Counter(r["status"] for r in results).items())},
            "numbers_once": sorted(r["number"] for r in results) == list(range(count)),
            "unique_ids": len(set(ids)) == len(ids) == ok,
            "finished": sum(r.get("finish_reason") in ("stop", "length") for r in results),
            "tokens": sum(r.get("tokens", 0) for r in results), "wall_s": time.perf_counter() - start,
            "rss_mib_start": memory[0][1] if memory else None,
            "rss_mib_after_warm": after_warm[0] if after_warm else None,
            "rss_mib_max_after_warm": max(after_warm) if after_warm else None,
            "rss_mib_end": memory[-1][1] if memory else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base")
    p.add_argument("--expert")
    p.add_argument("--levels", default="1,4,8,16,64")
    p.add_argument("--base-level", type=int, default=8,
                   help="the concurrency at which a server of the base alone (--mode base) is measured too")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="then N requests of mixed lengths, modes and streaming from --soak-clients clients")
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        flags, described = resolve_pair(args)
        print(f"pair: {described}", flush=True)
        rows = [decode_one_by_one(flags, PROMPTS, args.max_tokens)] if levels else []
        if rows:
            print(f"decode one by one: {rows[0]['tokens_per_s']:.1f} tokens/s", flush=True)
        server_flags = [*flags, "--slots", args.slots, "--context", args.context, "--chunk", args.chunk,
                        "--queue-size", 256, "--max-new-tokens", args.max_tokens]
        server = ServerProcess(Path(folder) / "server.log", *server_flags, lifetime=7200, ready_timeout=900, cwd=REPO)
        try:
            for level in levels:
                rows.append(load_level(server.port, level, args.max_tokens))
                print(f"concurrency {level}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
            soaked = soak(server, args.soak_clients, args.soak) if args.soak else None
        finally:
            server.stop()
            log = server.log.read_text().splitlines()
        warm_up = [line for line in log if "warm-up" in line]
        after_warm_up = [line for line in log if "compiled after warm-up" in line]
        if args.base_level:
            base_server = ServerProcess(Path(folder) / "base.log", *server_flags, "--mode", "base", lifetime=7200,
                                        ready_timeout=900, cwd=REPO)
            try:
                rows.append(load_level(base_server.port, args.base_level, args.max_tokens, "serve --mode base"))
                print(f"base alone, concurrency {args.base_level}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
            finally:
                base_server.stop()
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
    if soaked:
        print(f"\nsoak: {json.dumps(soaked)}\n{after_warm_up[0] if after_warm_up else ''}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "soak": soaked, "log": after_warm_up}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
