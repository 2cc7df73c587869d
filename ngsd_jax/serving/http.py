"""The OpenAI-compatible web app (FastAPI on uvicorn, SSE by sse-starlette) over a `Service`.

POST /v1/chat/completions and /v1/completions follow the OpenAI schema (ids, `created`,
`usage`, `finish_reason`; streamed `chat.completion.chunk` / `text_completion` events ending
with `data: [DONE]`), so the official client works unchanged. NGSD rides along:

- the request may carry an `ngsd` object (the client's `extra_body`): `mode` ("ngsd" or
  "base"), `alpha` (fixes alpha instead of the server's reflection), `tau`, `threshold`,
  `soft_reset`, `v_reset` (within the operator's limits), `telemetry` (per-token gate values
  on streamed chunks), `trace` (per-token arrays in the final choice);
- each choice carries `ngsd`: mode, alpha and where it came from, risk (when the expert
  rated the prompt), spikes, steered_tokens; streamed chunks with `telemetry` carry
  `ngsd: {token_id, divergence, potential, spike, alpha, steered}` for their token.

Bad input answers 4xx with an OpenAI error object ({"error": {message, type, param, code}});
a full queue answers 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from ngsd_jax.serving.service import ChatFormat, Job, QueueFull, RequestLimits, Service, encode_messages
from ngsd_jax.serving.slots import ServingError, SlotRequest

# --- request bodies --------------------------------------------------------------------------

Strict = ConfigDict(strict=True, extra="ignore")
Finite = Annotated[float, Field(allow_inf_nan=False)]


class NGSDChoices(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    mode: Literal["ngsd", "base"] | None = None
    alpha: Finite | None = None
    tau: Finite | None = None
    threshold: Finite | None = None
    soft_reset: Finite | None = None
    v_reset: Finite | None = None
    telemetry: bool = False
    trace: bool = False


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool = False


class Common(BaseModel):
    model_config = Strict
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    ngsd: NGSDChoices | None = None


class ChatBody(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionBody(Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the web app needs besides the service: names, defaults and limits."""

    model_name: str = "ngsd-jax"
    max_tokens: int = 128  # when a request gives none
    max_tokens_limit: int = 1024
    temperature: float = 0.0  # when a request gives none (greedy: the paper's decoding)
    top_p: float = 1.0
    seed: int = 0
    limits: RequestLimits = RequestLimits()
    chat: ChatFormat = ChatFormat()
    drain_timeout: float = 30.0


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, rejection: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.rejection = (
            status, message, kind, param, code, rejection)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


# --- the app --------------------------------------------------------------------------------


def create_app(service: Service, settings: ServeSettings, base_tokenizer, expert_tokenizer) -> FastAPI:
    """The web app; its lifespan starts the decode thread and drains it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop, settings.drain_timeout)

    app = FastAPI(title="ngsd-jax", lifespan=lifespan)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        service.metrics.rejected.labels(err.rejection).inc()
        return err.response()

    @app.get("/health")
    async def health():
        ok = service.alive and service.error is None
        body = {"status": "ok" if ok else "error", "slots": service.slots.config.slots,
                "running": len(service.running), "queued": service.queue.qsize()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "ngsd-jax"}]}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatBody)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        chat_format = settings.chat
        try:
            base_prompt = encode_messages(base_tokenizer, messages, chat_format.system_prompt,
                                          chat_format.chat_template, chat_format.thinking)
            expert_prompt = None if expert_tokenizer is None else encode_messages(
                expert_tokenizer, messages, chat_format.expert_system_prompt, chat_format.expert_chat_template,
                chat_format.thinking)
        except ValueError as err:
            raise APIError(400, f"messages: {err}", param="messages") from None
        return await _complete(request, body, base_prompt, expert_prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        ids = list(base_tokenizer(text)["input_ids"])
        return await _complete(request, body, ids, ids if expert_tokenizer is not None else None, chat=False)

    async def _parse(request: Request, model):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as err:
            raise _validation_error(err) from None
        if body.model != settings.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                           f"'{settings.model_name}'", param="model", code="model_not_found", rejection="not_found")
        if body.n != 1:
            raise APIError(400, "n: this server returns one choice per request (n=1)", param="n")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        return body

    def _slot_request(body: Common, base_prompt, expert_prompt, chat: bool) -> SlotRequest:
        max_tokens = (body.max_completion_tokens if chat and body.max_completion_tokens is not None
                      else body.max_tokens)
        max_tokens = settings.max_tokens if max_tokens is None else max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most "
                           f"{settings.max_tokens_limit}", param="max_tokens", rejection="max_tokens")
        choices = body.ngsd.model_dump() if body.ngsd is not None else {}
        problem = settings.limits.problem(choices)
        if problem:
            raise APIError(400, problem, param="ngsd")
        mode = choices.get("mode") or service.slots.config.mode
        if service.slots.config.mode == "base" and mode != "base":
            raise APIError(400, "ngsd.mode: this server runs without an expert (mode base)", param="ngsd")
        request = SlotRequest(
            base_prompt=base_prompt, expert_prompt=expert_prompt, max_tokens=max_tokens,
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_p=settings.top_p if body.top_p is None else body.top_p,
            seed=settings.seed if body.seed is None else body.seed, steer=mode == "ngsd",
            alpha=choices.get("alpha"), **{k: choices.get(k) for k in ("tau", "threshold", "soft_reset", "v_reset")})
        try:
            service.slots.check(request)
        except ServingError as err:
            context = "context" in str(err)
            raise APIError(400, str(err), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if context else None,
                           rejection="context_length" if context else "invalid_request") from None
        return request

    async def _complete(request: Request, body: Common, base_prompt, expert_prompt, chat: bool):
        slot_request = _slot_request(body, base_prompt, expert_prompt, chat)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        job = Job(slot_request, base_tokenizer, stop, "ngsd" if slot_request.steer else "base", loop,
                  asyncio.Queue())
        try:
            service.submit(job)
        except QueueFull as err:
            raise APIError(429, str(err), kind="rate_limit_exceeded", code="rate_limit_exceeded",
                           rejection="queue_full") from None
        except ServingError as err:
            raise APIError(503, str(err), kind="server_error", rejection="unavailable") from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": settings.model_name}
        ngsd_choices = body.ngsd or NGSDChoices()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(_stream(job, meta, chat, ngsd_choices.telemetry, include_usage),
                                       shutdown_grace_period=settings.drain_timeout, ping=15)
        return await _whole(request, job, meta, chat, ngsd_choices.trace)

    async def _events(job: Job):
        """The job's events until it is done; raises APIError on a failure of the decode loop."""
        while True:
            kind, payload = await job.events.get()
            if kind == "error":
                raise APIError(500, payload, kind="server_error", rejection="unavailable")
            yield kind, payload
            if kind == "done":
                return

    def _usage(job: Job) -> dict:
        prompt = len(job.request.base_prompt)
        return {"prompt_tokens": prompt, "completion_tokens": job.generated, "total_tokens": prompt + job.generated}

    async def _whole(request: Request, job: Job, meta: dict, chat: bool, trace: bool):
        async def consume():
            entries, summary = [], None
            async for kind, payload in _events(job):
                if kind == "tokens":
                    entries += payload
                elif kind == "done":
                    summary = payload
            return entries, summary

        async def client_gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(client_gone())
        try:
            await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            consumer.cancel()
            service.cancel(job)
            raise
        finally:
            watcher.cancel()
        if not consumer.done():  # the client left: its slot is freed before the next chunk
            consumer.cancel()
            service.cancel(job)
            return Response(status_code=499)
        entries, summary = consumer.result()
        text = job.stream.text
        ngsd = dict(summary)
        if trace:
            ngsd["trace"] = {name: [e[key] for e in entries] for name, key in (
                ("token_ids", "id"), ("divergence", "divergence"), ("potential", "potential"), ("spike", "spike"),
                ("alpha", "alpha"), ("steered", "steered"))}
        choice = {"index": 0, "logprobs": None, "finish_reason": job.finish_reason, "ngsd": ngsd}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(job), "system_fingerprint": None}

    async def _stream(job: Job, meta: dict, chat: bool, telemetry: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict | None, usage=None) -> str:
            chunk = {**meta, "object": kind, "choices": [] if choice is None else [choice],
                     "system_fingerprint": None}
            if include_usage:
                chunk["usage"] = usage
            return json.dumps(chunk, allow_nan=False)

        def choice(text: str | None, finish=None, ngsd=None, first=False) -> dict:
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                c["delta"] = ({"role": "assistant", "content": ""} if first else
                              {} if text is None else {"content": text})
            else:
                c["text"] = text or ""
            if ngsd is not None:
                c["ngsd"] = ngsd
            return c

        try:
            async for name, payload in _events(job):
                if name == "start":
                    if chat:
                        yield event(choice(None, first=True))
                elif name == "tokens":
                    for e in payload:
                        gate = ({"token_id": e["id"], "divergence": _finite(e["divergence"]),
                                 "potential": _finite(e["potential"]), "spike": e["spike"], "alpha": e["alpha"],
                                 "steered": e["steered"]} if telemetry else None)
                        yield event(choice(e["text"], ngsd=gate))
                elif name == "done":
                    yield event(choice(None, finish=job.finish_reason, ngsd=payload))
                    if include_usage:
                        yield event(None, _usage(job))
            yield "[DONE]"
        except APIError as err:
            yield json.dumps({"error": {"message": err.message, "type": err.kind, "param": None, "code": None}})
        finally:
            if job.finish_reason is None:  # the client left (or the stream broke): free the slot now
                service.cancel(job)

    return app


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
