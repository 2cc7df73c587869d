"""Training data for the safety expert: reading, tokenising, masking, bucketing, and the
default dataset built from the base model's own answers, and a recipe's examples (that
dataset, built and cached in the run directory, plus the recipe's own record files).

A training record is one JSON object per line, either chat `messages` (an optional system
message, one user message, one final assistant message) or `prompt` + `response`. Besides
the text fields a record may carry `system`, `prefix` (text forced at the start of the
response, context only), `weight`, `match_teacher` (learn the starting model's own
next-token distribution at the response positions instead of the response tokens), and the
exact-token forms `prefix_ids` / `response_ids` with `end_of_turn` (false for an answer cut
off by a length limit), which the default dataset uses so the base model's own tokens are
trained on verbatim.

The loss covers the response tokens and the end-of-turn token only: the prompt (rendered
with the chat template by `encode_chat`) and any forced prefix are context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ngsd_jax.checkpoints.tokenizer import encode_chat, end_of_turn_id
from ngsd_jax.decoding.batching import bucket_length
from ngsd_jax.decoding.settings import DecodeSettings
from ngsd_jax.errors import UsageError
from ngsd_jax.files import jsonl_values
from ngsd_jax.parallel.distributed import barrier, is_primary, say
from ngsd_jax.refusals import ALREADY_REFUSES
from ngsd_jax.training.recipe import Recipe, resolve_data_path
from ngsd_jax.training.state import write_atomic


class DataError(ValueError):
    """Unusable training data; the message starts with file:line where there is one."""


@dataclasses.dataclass(frozen=True)
class ChatRecord:
    """One parsed training record, before tokenisation."""

    prompt: str
    response: str | None = None
    response_ids: tuple[int, ...] | None = None
    system: str | None = None
    prefix: str = ""
    prefix_ids: tuple[int, ...] | None = None
    end_of_turn: bool = True
    weight: float = 1.0
    match_teacher: bool = False
    kind: str = "data"


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids of prompt + prefix + response (+ end of turn) and the 0/1 loss mask over them."""

    tokens: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # uint8 [L]; 1 where the token is a training target
    weight: float
    match_teacher: bool  # loss: KL to the starting model's distribution rather than cross-entropy on tokens
    kind: str
    origin: str  # file:line, for messages

    @property
    def inputs_length(self) -> int:
        """Positions fed to the model: every token but the last is an input predicting the next one."""
        return len(self.tokens) - 1


# ----------------------------------------------------------------------------- reading

def warn(message: str) -> None:
    say(f"ngsd-jax train: {message}")


def read_jsonl(path: Path, parse: Callable[[dict], object], strict: bool) -> list[tuple[str, object]]:
    """(origin "file:line", parse(obj)) per good line. A bad line (not JSON, or `parse` raising
    DataError) is reported with its file:line and skipped, or raised under `strict`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    good, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for number, _, obj in jsonl_values(f):
            origin = f"{path}:{number}"
            try:
                if isinstance(obj, json.JSONDecodeError):
                    raise DataError(f"not JSON ({obj.msg} at column {obj.colno})")
                if not isinstance(obj, dict):
                    raise DataError("not a JSON object")
                good.append((origin, parse(obj)))
            except DataError as err:
                if strict:
                    raise DataError(f"{origin}: {err}; fix the line or drop --strict to skip it") from None
                warn(f"{origin}: {err}; line skipped")
                skipped += 1
    if skipped:
        warn(f"{path}: {skipped} malformed line(s) skipped (--strict makes them fatal)")
    return good


def _text(obj: dict, key: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"field '{key}' must be a non-empty string" if key in obj else f"missing field '{key}'")
    return value


def _ids(obj: dict, key: str) -> tuple[int, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
        raise DataError(f"field '{key}' must be a list of token ids")
    return tuple(value)


def parse_record(obj: dict) -> ChatRecord:
    """A ChatRecord from a `messages` or `prompt`/`response` object; DataError names what is wrong."""
    weight = obj.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight < 0:
        raise DataError("field 'weight' must be a number >= 0")
    common = dict(prefix=_text(obj, "prefix", required=False) or "", prefix_ids=_ids(obj, "prefix_ids"),
                  end_of_turn=bool(obj.get("end_of_turn", True)), weight=float(weight),
                  match_teacher=bool(obj.get("match_teacher", False)), kind=str(obj.get("kind", "data")))
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError("field 'messages' must be a list of {role, content} objects")
        roles = [m["role"] for m in messages]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise DataError(f"messages must be [system,] user, assistant (single turn); got {', '.join(roles)}")
        system = messages[0]["content"] if roles[0] == "system" else None
        if not messages[-2]["content"].strip() or not messages[-1]["content"].strip():
            raise DataError("empty user or assistant message")
        return ChatRecord(prompt=messages[-2]["content"], response=messages[-1]["content"], system=system, **common)
    prompt = _text(obj, "prompt")
    response_ids = _ids(obj, "response_ids")
    response = _text(obj, "response", required=response_ids is None)
    if response is None and response_ids is None:
        raise DataError("missing field 'response' (or 'messages')")
    return ChatRecord(prompt=prompt, response=response, response_ids=response_ids,
                      system=_text(obj, "system", required=False), **common)


# ----------------------------------------------------------------------------- tokenising

def encode_record(record: ChatRecord, tokenizer, eot_id: int, origin: str, chat_template=None,
                  system_prompt: str | None = None) -> Example:
    """prompt (chat template) + prefix + response + end of turn, masked to the response and end of turn."""
    system = record.system if record.system is not None else system_prompt
    prompt = encode_chat(tokenizer, record.prompt, system, chat_template)
    if record.prefix_ids is not None:
        prefix = list(record.prefix_ids)
    else:
        prefix = tokenizer.encode(record.prefix, add_special_tokens=False) if record.prefix else []
    if record.response_ids is not None:
        response = list(record.response_ids)
    else:
        response = tokenizer.encode(record.response, add_special_tokens=False)
    if record.end_of_turn and (not response or response[-1] != eot_id):
        response.append(eot_id)
    if not response:
        raise DataError(f"{origin}: the response has no tokens")
    context = prompt + prefix
    tokens = np.asarray(context + response, np.int32)
    mask = np.concatenate([np.zeros(len(context), np.uint8), np.ones(len(response), np.uint8)])
    return Example(tokens, mask, record.weight, record.match_teacher, record.kind, origin)


def fit_to_width(examples: Iterable[Example], max_width: int) -> list[Example]:
    """Cuts examples longer than the widest bucket at its width (the cut part is lost); drops
    those whose prompt alone fills it, with a count."""
    kept, dropped, cut = [], 0, 0
    for ex in examples:
        if ex.inputs_length > max_width:
            tokens, mask = ex.tokens[: max_width + 1], ex.loss_mask[: max_width + 1]
            if not mask[1:].any():
                dropped += 1
                continue
            ex = dataclasses.replace(ex, tokens=tokens, loss_mask=mask)
            cut += 1
        kept.append(ex)
    if cut or dropped:
        warn(f"{cut} example(s) cut to {max_width + 1} tokens and {dropped} dropped (prompt longer than that); "
             f"raise the largest bucket width to keep them whole")
    return kept


# ----------------------------------------------------------------------------- batching

@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    width: int
    indices: tuple[int, ...]  # into the example list; fewer than batch_size only at an epoch's end


def plan_batches(lengths: Sequence[int], batch_size: int, widths: Sequence[int], epochs: int,
                 seed: int) -> list[PlannedBatch]:
    """The whole run's batch order, a pure function of (lengths, settings, seed).

    Per epoch: shuffle, sort windows of 32 batches by length, cut them into batches padded to
    the smallest bucket width that holds their longest example, shuffle the batches. Sorting
    within windows keeps padding low; the windows and the final shuffle keep order random.
    """
    lengths = np.asarray(lengths)
    widths = sorted(widths)
    window = batch_size * 32
    plan = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(lengths))
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start: start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in rng.permutation(len(batches)):
            indices = batches[b]
            plan.append(PlannedBatch(epoch, bucket_length(int(lengths[indices].max()), widths),
                                     tuple(int(i) for i in indices)))
    return plan


def plan_fingerprint(plan: Sequence[PlannedBatch]) -> str:
    """Identifies a batch order; a resumed run must see the same one."""
    digest = hashlib.sha256()
    for batch in plan:
        digest.update(f"{batch.width}:{','.join(map(str, batch.indices))};".encode())
    return digest.hexdigest()[:16]


def collate(examples: Sequence[Example], batch: PlannedBatch, batch_size: int, pad_id: int,
            decision_tokens: int = 0, decision_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Right-padded [batch_size, width] inputs, next-token targets, the target mask, per-token loss
    weights and `soft` (1 where the target is the teacher's distribution rather than the token).

    The first `decision_tokens` targets of each response weigh `decision_weight` times more:
    there the model decides between answering and refusing, while the rest of a refusal is
    easy once it has begun and would otherwise dominate the loss."""
    shape = (batch_size, batch.width)
    inputs = np.full(shape, pad_id, np.int32)
    targets = np.zeros(shape, np.int32)
    mask = np.zeros(shape, np.float32)
    weights = np.zeros(shape, np.float32)
    soft = np.zeros(shape, np.float32)
    for row, index in enumerate(batch.indices):
        ex = examples[index]
        n = ex.inputs_length
        inputs[row, :n] = ex.tokens[:-1]
        targets[row, :n] = ex.tokens[1:]
        mask[row, :n] = ex.loss_mask[1:]
        weights[row, :n] = ex.loss_mask[1:] * ex.weight
        if decision_tokens:
            first = np.flatnonzero(ex.loss_mask[1:])[:decision_tokens]
            weights[row, first] *= decision_weight
        soft[row, :n] = ex.loss_mask[1:] * ex.match_teacher
    return {"inputs": inputs, "targets": targets, "mask": mask, "weights": weights, "soft": soft}


# ----------------------------------------------------------------------------- the default dataset

def parse_harmful(obj: dict) -> dict:
    for key in ("id", "prompt", "response", "split"):
        _text(obj, key)
    return obj


def parse_benign(obj: dict) -> dict:
    for key in ("id", "prompt", "split"):
        _text(obj, key)
    return obj


def looks_like_refusal(text: str) -> bool:
    return any(marker.lower() in text.lower() for marker in ALREADY_REFUSES)


def generate_answers(make_engine: Callable[[], object], tokenizer, requests: Sequence[tuple[str, str]],
                     max_new_tokens: int, batch_size: int, cache_path: Path, teacher: str, chat_template=None,
                     system_prompt=None) -> dict[str, dict]:
    """The teacher's greedy answers {id: {"response_ids", "finished", ...}} to (id, prompt) requests.

    Answers are appended to `cache_path` batch by batch, so an interrupted run keeps what it
    generated and a later run (or --resume) generates only what is missing; `make_engine` (a
    base-mode Engine of the teacher) is called only then. Every batch is filled to
    `batch_size` rows (repeating its last prompt) so one compiled program serves them all.
    """
    key = {"teacher": teacher, "max_new_tokens": max_new_tokens, "system": system_prompt}
    answers: dict[str, dict] = {}
    if cache_path.is_file():
        for origin, line in read_jsonl(cache_path, lambda obj: obj, strict=False):
            if all(line.get(k) == v for k, v in key.items()) and isinstance(line.get("response_ids"), list):
                answers[line["id"] + "\0" + line["prompt"]] = line
    wanted = {f"{rid}\0{prompt}": (rid, prompt) for rid, prompt in requests}
    missing = [(k, encode_chat(tokenizer, prompt, system_prompt, chat_template))
               for k, (rid, prompt) in wanted.items() if k not in answers]
    missing.sort(key=lambda item: len(item[1]))  # similar lengths share a prompt bucket
    if not missing:
        return {rid: answers[k] for k, (rid, _) in wanted.items()}
    engine = make_engine()
    stop_ids = set(engine.stop_ids.tolist())
    settings = DecodeSettings(mode="base", max_new_tokens=max_new_tokens)
    # Every process decodes (one SPMD program); process 0 alone appends to the cache, which the
    # others read from the same (shared) run directory on a later run.
    primary = is_primary()
    if primary:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path if primary else os.devnull, "a", encoding="utf-8") as out, tqdm(
            total=len(missing), unit="answer", desc="base answers (self-distillation)", dynamic_ncols=True,
            disable=not primary) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start: start + batch_size]
            prompts = [ids for _, ids in chunk]
            prompts += [prompts[-1]] * (batch_size - len(prompts))
            result = engine.decode(prompts, None, settings)
            for row, (k, _) in enumerate(chunk):
                rid, prompt = wanted[k]
                ids = result.sequence(row)
                finished = len(ids) < max_new_tokens or int(ids[-1]) in stop_ids
                line = {"id": rid, "prompt": prompt, **key, "finished": finished, "response_ids": ids,
                        "response": tokenizer.decode(ids, skip_special_tokens=True)}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                answers[k] = line
            out.flush()
            bar.update(len(chunk))
    return {rid: answers[k] for k, (rid, _) in wanted.items()}


def build_default_records(harmful: Sequence[dict], benign: Sequence[dict], answers: dict[str, dict], *,
                          recovery_ids: Sequence[str], recovery_prefix_tokens: Sequence[int],
                          prefixes_per_prompt: int | None, eot_id: int, tokenizer, harmful_weight: float,
                          benign_weight: float, recovery_weight: float, match_teacher: bool,
                          recovery_separator: str = "", refusal_ids: set[str] | None = None) -> list[dict]:
    """Training records: refusals for harmful prompts, the teacher's own answers for benign ones
    (to be matched token by token, or distribution by distribution with `match_teacher`), and
    deep-alignment recovery examples (the teacher's harmful start, then the refusal).

    Each recovery prompt gets `prefixes_per_prompt` of the prefix lengths (all when None),
    taken in turn from the list, so many prompts can share the lengths between them. A
    recovery refusal starts with `recovery_separator` (e.g. a paragraph break), so that the
    turn after the base's words reads as text ("Subject\n\nI can't ..." rather than
    "SubjectI can't ..."). `refusal_ids` (None = all) picks the harmful prompts trained as plain
    refusals; recovery prompts may be any harmful ones."""
    records = [{"kind": "refusal", "id": r["id"], "prompt": r["prompt"], "response": r["response"],
                "weight": harmful_weight} for r in harmful if refusal_ids is None or r["id"] in refusal_ids]
    for r in benign:
        answer = answers[r["id"]]
        ids = list(answer["response_ids"])
        if answer["finished"] and ids and ids[-1] != eot_id:
            ids = ids[:-1] + [eot_id]  # stopped on another stop token: train the template's end of turn
        records.append({"kind": "distill", "id": r["id"], "prompt": r["prompt"], "response_ids": ids,
                        "response": answer["response"], "end_of_turn": answer["finished"], "weight": benign_weight,
                        "match_teacher": match_teacher})
    by_id = {r["id"]: r for r in harmful}
    lengths = list(recovery_prefix_tokens)
    per_prompt = len(lengths) if prefixes_per_prompt is None else min(prefixes_per_prompt, len(lengths))
    for n, rid in enumerate(recovery_ids):
        answer = answers[rid]
        if looks_like_refusal(answer["response"]):
            continue  # the base already refuses: there is no harmful start to recover from
        body = [t for t in answer["response_ids"] if t != eot_id]
        for k in (lengths[(n * per_prompt + j) % len(lengths)] for j in range(per_prompt)):
            if len(body) >= k:
                records.append({"kind": f"recovery{k}", "id": rid, "prompt": by_id[rid]["prompt"],
                                "prefix_ids": body[:k], "prefix": tokenizer.decode(body[:k]),
                                "response": recovery_separator + by_id[rid]["response"],
                                "weight": recovery_weight})
    return records


# ----------------------------------------------------------------------------- a recipe's examples

@dataclasses.dataclass(frozen=True)
class BaseAnswers:
    """The base model as the source of self-distilled answers, loaded only if some are missing."""

    name: str  # identifies the answers in the run directory's cache
    tokenizer: object  # the base's own, for its own chat format (the vocabulary is the expert's)
    make_engine: object  # () -> a base-mode Engine


def prepare_examples(recipe: Recipe, tokenizer, answers_from: BaseAnswers, run_dir: Path, strict: bool):
    """All training examples: the default dataset (built/cached in run_dir/data) plus recipe data files."""
    eot = end_of_turn_id(tokenizer, recipe.chat_template)
    sources: list[Path] = []
    if recipe.harmful_data or recipe.benign_data or recipe.ordinary_data:
        sources.append(build_default_dataset(recipe, tokenizer, answers_from, eot, run_dir, strict))
    sources += [resolve_data_path(p) for p in recipe.data]
    examples = []
    for path in sources:
        for origin, record in read_jsonl(path, parse_record, strict):
            try:
                examples.append(encode_record(record, tokenizer, eot, origin, recipe.chat_template,
                                              recipe.system_prompt))
            except DataError as err:
                if strict:
                    raise
                warn(f"{err}; line skipped")
    if not examples:
        raise UsageError("no usable training examples in " + ", ".join(map(str, sources)))
    return fit_to_width(examples, max(recipe.bucket_widths))


def build_default_dataset(recipe: Recipe, tokenizer, answers_from: BaseAnswers, eot: int, run_dir: Path,
                          strict: bool) -> Path:
    """run_dir/data/train.jsonl from the harmful and benign prompt files (train split only)."""

    def train_split(paths, parse):
        paths = [paths] if isinstance(paths, str) else (paths or [])
        return [row for path in paths for _, row in read_jsonl(resolve_data_path(path), parse, strict)
                if row["split"] == "train"]

    harmful = train_split(recipe.harmful_data, parse_harmful)
    benign = train_split(recipe.benign_data, parse_benign)
    # One generator per draw, so that a change to one file or count leaves the other draws (and the
    # base answers already generated for them) as they were.
    def rng(draw: int):
        return np.random.default_rng([recipe.seed, draw])

    if recipe.distill_prompts is not None and recipe.distill_prompts < len(benign):
        benign = [benign[i] for i in sorted(rng(0).choice(len(benign), recipe.distill_prompts, replace=False))]
    recovery_count = len(harmful) if recipe.recovery_prompts is None else min(recipe.recovery_prompts, len(harmful))
    recovery_count = recovery_count if recipe.recovery_prefix_tokens else 0
    recovery = [harmful[i]["id"] for i in sorted(rng(1).choice(len(harmful), recovery_count, replace=False))]
    ordinary = train_split(recipe.ordinary_data, parse_benign)
    if recipe.ordinary_prompts is not None and recipe.ordinary_prompts < len(ordinary):
        ordinary = [ordinary[i] for i in sorted(rng(2).choice(len(ordinary), recipe.ordinary_prompts, replace=False))]
    benign = benign + ordinary
    refusal_ids = None
    if recipe.refusal_prompts is not None and recipe.refusal_prompts < len(harmful):
        refusal_ids = {harmful[i]["id"] for i in rng(3).choice(len(harmful), recipe.refusal_prompts, replace=False)}
    by_id = {r["id"]: r for r in harmful}
    requests = [(r["id"], r["prompt"]) for r in benign] + [(rid, by_id[rid]["prompt"]) for rid in recovery]
    data_dir = run_dir / "data"
    answers = {}
    if requests:
        answers = generate_answers(answers_from.make_engine, answers_from.tokenizer, requests,
                                   recipe.distill_max_new_tokens, recipe.generation_batch,
                                   data_dir / "base_answers.jsonl", answers_from.name,
                                   recipe.base_chat_template, recipe.base_system_prompt)
    records = build_default_records(
        harmful, benign, answers, recovery_ids=recovery, recovery_prefix_tokens=recipe.recovery_prefix_tokens,
        prefixes_per_prompt=recipe.recovery_prefixes_per_prompt, eot_id=eot, tokenizer=tokenizer,
        harmful_weight=recipe.harmful_weight, benign_weight=recipe.benign_weight,
        recovery_weight=recipe.recovery_weight, match_teacher=recipe.distill_loss == "kl",
        recovery_separator=recipe.recovery_separator, refusal_ids=refusal_ids)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    warn("default dataset: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    path = data_dir / "train.jsonl"
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    barrier("train.jsonl written")  # every process reads it back
    return path
