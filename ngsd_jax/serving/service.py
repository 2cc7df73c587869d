"""The decode loop behind the web app: a bounded queue of jobs, one thread driving the slot engine.

The thread admits queued jobs into free slots (prefill + insert) while the others keep
decoding, runs one generate chunk over all slots, and hands each job its new tokens (text
deltas with stop strings held back, and the gate telemetry) through the job's own asyncio
queue. A job cancelled by its client (a disconnect) or ended by a stop string frees its slot
before the next chunk. `stop()` drains: queued and running jobs finish, then the thread ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any

import numpy as np

from ngsd_jax.checkpoints.tokenizer import as_ids, encode_chat, resolve_chat_template
from ngsd_jax.refusals import EXPERT_OPENINGS
from ngsd_jax.serving.metrics import Metrics
from ngsd_jax.serving.slots import ServingError, SlotEngine, SlotRequest


class QueueFull(Exception):
    """The bounded queue holds as many jobs as it may."""


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a request's `ngsd` object may set (inclusive ranges)."""

    modes: tuple[str, ...] = ("ngsd", "base")
    alpha: tuple[float, float] = (0.0, 1.0)
    tau: tuple[float, float] = (1.0, 64.0)
    threshold: tuple[float, float] = (0.05, 10.0)
    soft_reset: tuple[float, float] = (0.0, 1.0)
    v_reset: tuple[float, float] = (-10.0, 10.0)
    gate: bool = True  # whether requests may set tau, threshold, soft_reset, v_reset at all

    def problem(self, choices: dict) -> str | None:
        """One line on what in a request's ngsd choices lies outside the limits, or None."""
        mode = choices.get("mode")
        if mode is not None and mode not in self.modes:
            return f"ngsd.mode must be one of {', '.join(self.modes)} on this server (got {mode!r})"
        for name in ("alpha", "tau", "threshold", "soft_reset", "v_reset"):
            value = choices.get(name)
            if value is None:
                continue
            if name != "alpha" and not self.gate:
                return f"ngsd.{name}: this server does not let requests change the gate"
            low, high = getattr(self, name)
            if not low <= value <= high:
                return f"ngsd.{name} must lie in [{low:g}, {high:g}] on this server (got {value:g})"
        return None


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How messages become prompt ids, as `decode` formats them (its chat options)."""

    system_prompt: str | None = None
    expert_system_prompt: str | None = None
    chat_template: str | None = None
    expert_chat_template: str | None = None
    thinking: bool = False


def encode_messages(tokenizer, messages: list[dict], system_prompt: str | None, chat_template,
                    thinking: bool) -> list[int]:
    """Prompt ids for a conversation, ending with the assistant's generation prompt. One user
    message (after an optional system message) is encoded exactly as `decode` encodes a prompt;
    the server's system prompt applies when the conversation brings none."""
    roles = [m["role"] for m in messages]
    if roles == ["user"]:
        return encode_chat(tokenizer, messages[0]["content"], system_prompt, chat_template, thinking=thinking)
    if roles == ["system", "user"]:
        return encode_chat(tokenizer, messages[1]["content"], messages[0]["content"], chat_template,
                           thinking=thinking)
    if roles[0] != "system" and system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + messages
    template = resolve_chat_template(tokenizer, chat_template)
    return as_ids(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, enable_thinking=thinking))


class TextStream:
    """Incremental detokenization: each new token's text, held back while it may end in a split
    character or be the start of a stop string; stops at the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._release(max(safe, self.sent))

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self.sent: upto]
        self.sent = max(self.sent, upto)
        return delta


@dataclasses.dataclass
class Job:
    """One request in flight: what to run, and where its events go (an asyncio queue of the web app's loop)."""

    request: SlotRequest
    tokenizer: Any
    stop: list[str]
    mode: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    # Filled by the decode thread.
    slot: int | None = None
    alpha: float | None = None
    risk: float | None = None
    alpha_source: str = ""
    first_token_at: float | None = None
    generated: int = 0
    spikes: int = 0
    steered: int = 0
    finish_reason: str | None = None
    stream: TextStream | None = None

    def __post_init__(self):
        self.stream = TextStream(self.tokenizer, self.stop)

    def post(self, kind: str, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the web app's loop is closed (shutdown past the drain timeout): nobody listens
            pass

    def summary(self) -> dict:
        """The `ngsd` object of the job's choice."""
        return {"mode": self.mode, "alpha": self.alpha, "alpha_source": self.alpha_source, "risk": self.risk,
                "spikes": self.spikes, "steered_tokens": self.steered}


class Service:
    """The decode thread and its queue. `submit` is called from the web app's event loop."""

    def __init__(self, slots: SlotEngine, queue_size: int = 64, reflect: str = "off"):
        self.slots = slots
        self.reflect = reflect
        self.metrics = Metrics(slots.config.slots)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.running: dict[int, Job] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.ids = itertools.count()

    # --- called from the web app --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ngsd-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set() or self.error is not None:
            raise ServingError("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue holds {self.queue.maxsize} requests waiting for a decode slot; "
                            "retry later") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The job's client is gone: its slot (or queue place) is freed before the next chunk."""
        job.cancelled = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Drains: queued and running jobs finish, then the decode thread ends."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the decode thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._drop_cancelled()
                self._admit()
                self.metrics.queue_depth.set(self.queue.qsize())
                self.metrics.running.set(len(self.running))
                if not self.running:
                    if self._stopping.is_set() and self.queue.empty():
                        return
                    self.metrics.idle()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                chunk = self.slots.generate()
                self._deliver(chunk)
        except BaseException as err:  # the loop must not die silently: every waiting job hears of it
            self.error = err
            for job in list(self.running.values()) + self._drain_queue():
                job.post("error", f"the decode loop failed: {type(err).__name__}: {err}")
            raise

    def _drain_queue(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                return jobs

    def _drop_cancelled(self) -> None:
        for slot, job in list(self.running.items()):
            if job.cancelled:
                self.slots.cancel(slot)
                del self.running[slot]
                self.metrics.finished.labels("cancelled").inc()

    def _admit(self) -> None:
        while self.slots.free_slots:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:
                self.metrics.finished.labels("cancelled").inc()
                continue
            try:
                inserted = self.slots.insert(self.slots.prefill(job.request), self.slots.free_slots[0], job.request)
            except ServingError as err:  # checked before queueing; kept so one bad job cannot stop the loop
                job.post("error", str(err))
                continue
            job.slot, job.alpha, job.risk = inserted.slot, inserted.alpha, inserted.risk
            job.alpha_source = ("request" if job.request.alpha is not None else
                                "expert" if inserted.risk is not None else "server")
            if job.mode == "base":
                job.alpha, job.alpha_source = 0.0, "base"
            self.running[inserted.slot] = job
            self.metrics.prompt_tokens.inc(len(job.request.base_prompt))
            self.metrics.alpha.labels(f"{job.alpha:g}").inc()
            job.post("start", None)

    def _deliver(self, chunk) -> None:
        now = time.monotonic()
        self.metrics.generated(int(chunk.valid.sum()), now)
        for slot, job in list(self.running.items()):
            valid = np.flatnonzero(chunk.valid[slot])
            entries = []
            for t in valid:
                token = int(chunk.tokens[slot, t])
                text = job.stream.push(token)
                job.generated += 1
                job.spikes += int(chunk.spike[slot, t])
                job.steered += int(chunk.steered[slot, t])
                entries.append({"id": token, "text": text, "divergence": float(chunk.divergence[slot, t]),
                                "potential": float(chunk.potential[slot, t]), "spike": bool(chunk.spike[slot, t]),
                                "alpha": float(chunk.alpha[slot, t]), "steered": bool(chunk.steered[slot, t])})
                if job.stream.stopped:
                    break
            if entries and job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.created)
            stopped = job.stream.stopped
            if stopped:
                self.slots.cancel(slot)  # a stop string: the slot is free for the next chunk
            if stopped or chunk.done[slot]:
                last = entries[-1]["id"] if entries else None
                ended_by_token = last is not None and last in self.slots.stop_ids
                job.finish_reason = "stop" if stopped or ended_by_token else "length"
                tail = job.stream.finish()
                if tail and entries:
                    entries[-1]["text"] += tail
                del self.running[slot]
                self._finished(job, now)
                job.post("tokens", entries)
                job.post("done", job.summary())
            elif entries:
                job.post("tokens", entries)
        self.metrics.running.set(len(self.running))

    def _finished(self, job: Job, now: float) -> None:
        self.metrics.finished.labels(job.finish_reason).inc()
        self.metrics.spikes.inc(job.spikes)
        self.metrics.steered.inc(job.steered)
        if job.generated > 1 and job.first_token_at is not None:
            self.metrics.per_token.observe((now - job.first_token_at) / (job.generated - 1))
        if job.stream.text.lstrip().startswith(EXPERT_OPENINGS):
            self.metrics.model_refusals.labels(job.mode).inc()
