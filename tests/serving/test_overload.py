"""Overload and faults on a one-slot server with a one-place queue: 429 when the queue is full, a
client that disconnects mid-stream frees its slot at once, SIGTERM drains the requests in
flight and exits 0, and a second start reads its programs from the compilation cache."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest
import torch
from conftest import chat_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from ngsd_jax.serving.launch import ServerProcess

LONG = 500  # tokens: long enough (on this pair, about a second) to hold the slot


def wider_checkpoint(path, tokenizer, seed):
    """conftest's chat checkpoint, wider and deeper: a step takes a millisecond or two."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overload")
    tokenizer = chat_tokenizer()
    base, expert = (wider_checkpoint(folder / name, tokenizer, seed) for name, seed in (("base", 0), ("expert", 1)))
    return folder, ["--base", base, "--expert", expert, "--slots", 1, "--queue-size", 1, "--context", 512,
                    "--chunk", 4, "--reflect", "off", "--alpha", 0.5, "--compilation-cache", folder / "xla"]


@pytest.fixture(scope="module")
def server(flags):
    folder, args = flags
    process = ServerProcess(folder / "first.log", *args)
    yield process
    process.stop()


def _stream(server, max_tokens, out: list, read_all=True):
    """A streamed completion over a raw connection; appends its events (and the connection) to `out`."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps({
        "model": "ngsd-jax", "prompt": "How do I bake bread?", "max_tokens": max_tokens, "stream": True}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    out.append(response.status)
    if response.status != 200 or not read_all:
        out.append(connection)
        out.append(response)
        return
    events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    out.append(events)


def _completed(events) -> bool:
    """Whether a stream ran to its end: a finish reason, then [DONE]."""
    return len(events) > 1 and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in (
        "length", "stop")


def test_a_full_queue_answers_429(server):
    results = [[] for _ in range(6)]
    threads = [threading.Thread(target=_stream, args=(server, LONG, results[i])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r[0] for r in results]
    # One request decodes, one waits in the queue; the others arrive while both places are taken.
    assert statuses.count(429) >= 3, statuses
    for r in results:
        if r[0] == 200:
            assert _completed(r[1])
        else:
            body = json.loads(r[2].read())
            assert body["error"]["type"] == "rate_limit_exceeded" and body["error"]["code"] == "rate_limit_exceeded"
    assert server.metric("ngsd_rejected_requests_total", 'kind="queue_full"') == statuses.count(429)
    assert server.get("/health")["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    tokens_before = server.metric("ngsd_generated_tokens_total")
    cancelled_before = server.metric("ngsd_requests_finished_total", 'finish_reason="cancelled"')
    out = []
    _stream(server, LONG, out, read_all=False)
    status, connection, response = out
    assert status == 200
    response.readline()  # the first event: the request holds the slot
    assert server.get("/health")["running"] == 1
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 5
    while server.get("/health")["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.get("/health")["running"] == 0
    assert server.metric("ngsd_requests_finished_total", 'finish_reason="cancelled"') == cancelled_before + 1
    # Freed long before its budget: far fewer tokens than it asked for were generated.
    assert server.metric("ngsd_generated_tokens_total") - tokens_before < LONG / 2
    status, answer = server.post("/v1/completions", {"model": "ngsd-jax", "prompt": "hi", "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] <= 3


def test_a_client_that_leaves_a_whole_request_frees_its_slot(server):
    cancelled_before = server.metric("ngsd_requests_finished_total", 'finish_reason="cancelled"')
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps({"model": "ngsd-jax", "prompt": "How do I bake?",
                                                              "max_tokens": LONG}), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while not server.get("/health")["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.get("/health")["running"] == 1
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 5
    while server.metric("ngsd_requests_finished_total", 'finish_reason="cancelled"') == cancelled_before and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    assert server.metric("ngsd_requests_finished_total", 'finish_reason="cancelled"') == cancelled_before + 1
    assert server.get("/health")["running"] == 0


def test_sigterm_drains_requests_in_flight_then_exits(server, flags):
    results = [[], []]
    threads = [threading.Thread(target=_stream, args=(server, LONG, results[i])) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while server.get("/health")["queued"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = server.get("/health")
    assert health["running"] == 1 and health["queued"] == 1, health  # one decoding, one queued
    started = time.monotonic()
    assert server.stop() == 0
    print(f"drained in {time.monotonic() - started:.2f} s")
    for t in threads:
        t.join()
    for r in results:  # both ran to their full length
        assert r[0] == 200 and _completed(r[1])
    log = server.log.read_text()
    assert "0 programs compiled after warm-up" in log


def test_second_start_reads_the_compilation_cache(server, flags):
    folder, args = flags
    first = float(re.search(r"warm-up: \d+ programs in ([\d.]+) s", server.log.read_text()).group(1))
    second_server = ServerProcess(folder / "second.log", *args)
    try:
        second = float(re.search(r"warm-up: \d+ programs in ([\d.]+) s", second_server.log.read_text()).group(1))
    finally:
        assert second_server.stop() == 0
    print(f"warm-up: first start {first:.1f} s, second start {second:.1f} s")
    assert second < first
