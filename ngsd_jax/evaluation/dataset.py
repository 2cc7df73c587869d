"""An evaluation data set: rows of a JSON list, JSONL, CSV or .txt file as `EvalItem`s, with
their labels, prefills and expected answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ngsd_jax.decoding.prompts import check_utf8, find_prompt_field, read_records
from ngsd_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One dataset row: `index` is its position in the file."""

    index: int
    prompt: str
    harmful: bool
    prefill: str = ""  # the prefill field's whole text; the first --prefill-tokens tokens are forced
    answer: object = None  # the answer field, for the exact-answer judge


def read_dataset(path: Path, prompt_field: str | None = None, label_field: str | None = None,
                 harmful_label: str | None = None, prefill_field: str | None = None,
                 answer_field: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Rows of a JSON list, JSONL, CSV or .txt file (one prompt per line) as EvalItems.

    The prompt field is found among decoding.prompts.PROMPT_FIELDS unless named; without a label field
    every prompt counts as harmful; `limit` keeps the first N prompts of each label."""
    records = read_records(path)
    if not records:
        raise UsageError(f"{path}: empty dataset; it needs at least one prompt")
    objects = [r for r in records if isinstance(r, dict)]
    if len(objects) < len(records):
        given = [flag for flag, value in (("--prompt-field", prompt_field), ("--label-field", label_field),
                                          ("--prefill-field", prefill_field), ("--answer-field", answer_field))
                 if value is not None]
        if given:
            raise UsageError(f"{path}: holds bare prompts without fields, so {given[0]} cannot apply; "
                             f"use a CSV or JSON objects with that field")
    if objects and prompt_field is None:
        prompt_field = find_prompt_field(objects[0])
        if prompt_field is None:
            raise UsageError(f"{path}: no prompt field among {', '.join(sorted(map(str, objects[0])))}; "
                             f"name it with --prompt-field")

    def field(record, number, name, flag):
        if not isinstance(record, dict):
            raise UsageError(f"{path}: item {number} is not an object with fields")
        if name not in record:
            raise UsageError(f"{path}: item {number} has no field '{name}' (fields: "
                             f"{', '.join(sorted(map(str, record)))}); fix {flag}")
        return record[name]

    if label_field is not None:
        values = [str(field(r, n, label_field, "--label-field")) for n, r in enumerate(records, start=1)]
        wanted = "harmful" if harmful_label is None else str(harmful_label)
        if wanted not in values:
            seen = ", ".join(sorted(set(values))[:10])
            raise UsageError(f"{path}: label value '{wanted}' never occurs in field '{label_field}' "
                             f"(values: {seen}); pass the harmful one with --harmful-label")
    elif harmful_label is not None:
        raise UsageError("--harmful-label needs --label-field (without one every prompt counts as harmful)")
    items = []
    for number, record in enumerate(records, start=1):
        prompt = record if isinstance(record, str) else field(record, number, prompt_field, "--prompt-field")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{path}: item {number} has an empty or non-text prompt")
        prefill = "" if prefill_field is None else field(record, number, prefill_field, "--prefill-field")
        for text in (prompt, prefill):
            if isinstance(text, str):
                check_utf8(text, f"{path}: item {number}")  # a JSON escape may be a lone surrogate
        items.append(EvalItem(
            index=number - 1, prompt=prompt,
            harmful=label_field is None or values[number - 1] == wanted,
            prefill=str(prefill or ""),
            answer=None if answer_field is None else field(record, number, answer_field, "--answer-field"),
        ))
    if limit is not None:
        items = [i for i in items if i.harmful][:limit] + [i for i in items if not i.harmful][:limit]
        items.sort(key=lambda i: i.index)
    return items
