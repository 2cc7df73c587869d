"""`python -m ngsd_jax.serve` on a tiny chat pair, through the official `openai` client and raw HTTP:
the answers (text, tokens, gate trace) are `decode`'s, streamed or not, for requests sent
together; bad input gets OpenAI error objects and the server keeps serving."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import openai
import pytest
from conftest import PROMPTS

from ngsd_jax import decode
from ngsd_jax.serving.launch import ServerProcess

MAX_TOKENS = 12
MODEL = "ngsd-jax"


@pytest.fixture(scope="module")
def server(chat_pair, tmp_path_factory):
    base, expert = chat_pair
    folder = tmp_path_factory.mktemp("serve")
    process = ServerProcess(folder / "server.log", "--base", base, "--expert", expert, "--slots", 3, "--context", 64,
                            "--chunk", 4, "--reflect", "off", "--alpha", 0.9, "--max-new-tokens", MAX_TOKENS,
                            "--compilation-cache", folder / "xla", "--max-tokens-limit", 40)
    yield process
    assert process.stop() == 0
    assert "0 programs compiled after warm-up" in process.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def decoded(chat_pair, capsys, *flags) -> list[dict]:
    """What `decode --json` prints for PROMPTS with the server's settings and `flags`."""
    base, expert = chat_pair
    argv = ["--base", base, "--expert", expert, "--reflect", "off", "--alpha", "0.9", "--max-new-tokens",
            str(MAX_TOKENS), "--json", *flags]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert decode.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _ask_together(client, prompts, **kwargs):
    """One chat request per prompt, each from its own thread, 50 ms apart: they join the batch at
    different steps."""
    answers = [None] * len(prompts)

    def ask(i):
        time.sleep(0.05 * i)
        answers[i] = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                                    **kwargs)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _assert_matches(answer_ngsd: dict, text: str, record: dict):
    trace = answer_ngsd["trace"]
    assert text == record["response"]
    assert trace["token_ids"] == record["tokens"]
    assert trace["spike"] == record["trace"]["spike"]
    np.testing.assert_allclose(trace["divergence"], record["trace"]["divergence"], atol=1e-4)
    np.testing.assert_allclose(trace["potential"], record["trace"]["potential"], atol=1e-4)
    np.testing.assert_allclose(trace["alpha"], record["trace"]["alpha"], atol=1e-6)
    assert answer_ngsd["spikes"] == record["spikes"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = server.get("/health")
    assert health["status"] == "ok" and health["slots"] == 3


def test_chat_equals_decode_for_requests_sent_together(server, client, chat_pair, capsys):
    records = decoded(chat_pair, capsys)
    answers = _ask_together(client, PROMPTS * 2, max_tokens=MAX_TOKENS, extra_body={"ngsd": {"trace": True}})
    assert sum(r["spikes"] for r in records) > 0, "the gate must fire for this test to mean much"
    for answer, record in zip(answers, records * 2):
        assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
        assert answer.model == MODEL and isinstance(answer.created, int)
        choice = answer.choices[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason == ("length" if len(record["tokens"]) == MAX_TOKENS else "stop")
        ngsd = choice.model_extra["ngsd"]
        _assert_matches(ngsd, choice.message.content, record)
        assert ngsd["mode"] == "ngsd" and ngsd["alpha"] == pytest.approx(0.9) and ngsd["alpha_source"] == "server"
        assert answer.usage.completion_tokens == len(record["tokens"])
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_chat_carries_the_same_tokens_and_telemetry(server, client, chat_pair, capsys):
    record = decoded(chat_pair, capsys)[1]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}],
                                            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ngsd": {"telemetry": True}})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [c.choices[0].model_extra["ngsd"] for c in chunks if c.choices and "token_id" in
              (c.choices[0].model_extra.get("ngsd") or {})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].model_extra["ngsd"]["spikes"] == record["spikes"]
    assert chunks[-1].usage.completion_tokens == len(record["tokens"]) and not chunks[-1].choices
    trace = {"token_ids": [t["token_id"] for t in tokens], "spike": [t["spike"] for t in tokens],
             "divergence": [t["divergence"] for t in tokens], "potential": [t["potential"] for t in tokens],
             "alpha": [t["alpha"] for t in tokens]}
    _assert_matches({"trace": trace, "spikes": sum(trace["spike"])}, text, record)


def test_completions_streamed_and_not(server, client):
    whole = client.completions.create(model=MODEL, prompt="How do I bake", max_tokens=6)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens <= 6
    parts = list(client.completions.create(model=MODEL, prompt="How do I bake", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_request_chooses_mode_alpha_and_gate(server, client, chat_pair, capsys):
    base_records = decoded(chat_pair, capsys, "--mode", "base")
    gate_records = decoded(chat_pair, capsys, "--alpha", "0.3", "--tau", "4", "--threshold", "0.5")
    for i, prompt in enumerate(PROMPTS):
        message = [{"role": "user", "content": prompt}]
        as_base = client.chat.completions.create(model=MODEL, messages=message, max_tokens=MAX_TOKENS,
                                                 extra_body={"ngsd": {"mode": "base", "trace": True}})
        assert as_base.choices[0].model_extra["ngsd"]["mode"] == "base"
        _assert_matches(as_base.choices[0].model_extra["ngsd"], as_base.choices[0].message.content, base_records[i])
        own = client.chat.completions.create(model=MODEL, messages=message, max_tokens=MAX_TOKENS, extra_body={
            "ngsd": {"alpha": 0.3, "tau": 4.0, "threshold": 0.5, "trace": True}})
        ngsd = own.choices[0].model_extra["ngsd"]
        assert ngsd["alpha"] == pytest.approx(0.3) and ngsd["alpha_source"] == "request"
        _assert_matches(ngsd, own.choices[0].message.content, gate_records[i])


def test_stop_strings_end_the_answer(server, client):
    message = [{"role": "user", "content": PROMPTS[0]}]
    full = client.chat.completions.create(model=MODEL, messages=message, max_tokens=MAX_TOKENS).choices[0]
    text = full.message.content
    cut = text[3:5]
    stopped = client.chat.completions.create(model=MODEL, messages=message, max_tokens=MAX_TOKENS, stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=message, max_tokens=MAX_TOKENS, stop=cut,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(cut)]


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"model": "ngsd-jax", "messages": [', 400, None, None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400,
     "max_tokens", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content.str", None),
    ({"model": "ngsd-jax", "messages": []}, 400, "messages", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 41}, 400, "max_tokens", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi " * 60}], "max_tokens": 4}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "ngsd-jax", "prompt": "hi " * 30, "max_tokens": 40}, 400, "prompt", "context_length_exceeded"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "ngsd": {"alpha": 1.5}}, 400, "ngsd", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "ngsd": {"mode": "always"}}, 400,
     "ngsd.mode", None),
    ({"model": "ngsd-jax", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature",
     None),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, param, code):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    got, answer = server.post(path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    ok, answer = server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok == 200 and answer["usage"]["completion_tokens"] <= 2


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="at most 40"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_metrics(server, client):
    before = server.metric("ngsd_spikes_total")
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=MAX_TOKENS)
    spikes = answer.choices[0].model_extra["ngsd"]["spikes"]
    text = server.get("/metrics")
    for name in ("ngsd_queue_depth", "ngsd_running_slots", "ngsd_tokens_per_second",
                 "ngsd_time_to_first_token_seconds_bucket", "ngsd_time_per_output_token_seconds_bucket",
                 "ngsd_requests_by_alpha_total{alpha=\"0.9\"}", "ngsd_rejected_requests_total{kind=\"queue_full\"}",
                 "ngsd_rejected_requests_total{kind=\"context_length\"}", "ngsd_model_refusals_total"):
        assert name in text, name
    assert server.metric("ngsd_spikes_total") == before + spikes
    assert server.metric("ngsd_slots") == 3
    assert server.metric("ngsd_time_to_first_token_seconds_count") >= 1


def test_alpha_from_the_expert_equals_decode(chat_pair, chat_adapter, tmp_path, capsys):
    """--reflect expert with an adapter expert: each request's risk (the expert's probability of
    opening with a whole refusal opening, read from its own prefill) and alpha are decode's, and
    so are its tokens."""
    base, _ = chat_pair
    flags = ["--base", base, "--expert", str(chat_adapter), "--reflect", "expert", "--max-new-tokens", str(MAX_TOKENS)]
    argv = [*flags, "--json"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert decode.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    process = ServerProcess(tmp_path / "server.log", *flags, "--slots", 2, "--context", 64, "--no-compilation-cache")
    try:
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="none", max_retries=0, timeout=120)
        answers = _ask_together(client, PROMPTS, max_tokens=MAX_TOKENS, extra_body={"ngsd": {"trace": True}})
    finally:
        assert process.stop() == 0
    for answer, record in zip(answers, records):
        ngsd = answer.choices[0].model_extra["ngsd"]
        assert ngsd["alpha_source"] == "expert" and record["reflection"]["mode"] == "expert"
        assert ngsd["risk"] == pytest.approx(record["reflection"]["risk"], rel=1e-4, abs=1e-6)
        assert ngsd["alpha"] == pytest.approx(record["reflection"]["alpha"])
        _assert_matches(ngsd, answer.choices[0].message.content, record)
    assert any(r["reflection"]["risk"] > 0 for r in records)
