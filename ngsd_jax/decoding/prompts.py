"""Prompt files: .txt (one prompt per line), .jsonl (one JSON value per line), .json (a list)
or .csv, whose items are bare prompts or records with a prompt field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ngsd_jax.errors import UsageError
from ngsd_jax.files import jsonl_values

PROMPT_FIELDS = ("prompt", "goal", "instruction", "question", "query", "request", "behavior", "input",
                 "text")


def check_utf8(text: str, where) -> None:
    """Refuses text that is not valid Unicode (a lone surrogate, as from command-line bytes that are
    not UTF-8, or a JSON escape such as "\\udcff"), naming `where` (a flag, or a file and item)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{where}: not valid UTF-8 text (character {err.start + 1} is an undecodable byte or a "
                         f"lone surrogate); give UTF-8 text") from None


def read_records(path: Path) -> list:
    """The items of a prompts file: strings (.txt lines, bare JSON strings) or dicts (.csv rows, JSON objects).

    .txt holds one prompt per line, .jsonl one JSON value per line, .json a list of values."""
    if not path.is_file():
        raise UsageError(f"{path}: no such prompts file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's CSV export) is not text
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                         f"save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        items = []
        for number, _, value in jsonl_values(text.splitlines()):
            if isinstance(value, json.JSONDecodeError):
                raise UsageError(f"{path}:{number}: not JSON ({value.msg})")
            items.append(value)
        return items
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(items, list):
            raise UsageError(f"{path}: expected a JSON list of prompts")
        return items
    raise UsageError(f"{path}: unknown prompts format '{suffix}'; use .txt, .jsonl, .json or .csv")


def find_prompt_field(keys) -> str | None:
    """The key naming the prompt: the first of PROMPT_FIELDS present, in any case ("Goal" for "goal")."""
    keys = [k for k in keys if isinstance(k, str)]
    for name in PROMPT_FIELDS:
        if name in keys:
            return name
        folded = [k for k in keys if k.lower() == name]
        if folded:
            return folded[0]
    return None


def read_prompts(path: Path) -> list[str]:
    """Prompts from .txt (one per line), .jsonl, .json (a list of strings or objects) or .csv."""
    items = read_records(path)
    if path.suffix.lower() == ".csv":
        field = find_prompt_field(items[0]) if items else None
        if field is None:
            raise UsageError(f"{path}: no prompt column; name one of {', '.join(PROMPT_FIELDS)}")
        return [row[field] for row in items]
    prompts = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, str):
            prompts.append(item)
            continue
        field = find_prompt_field(item) if isinstance(item, dict) else None
        if field is None:
            raise UsageError(f"{path}: item {number} has no prompt field ({', '.join(PROMPT_FIELDS)})")
        prompts.append(item[field])
    for number, prompt in enumerate(prompts, start=1):
        if isinstance(prompt, str):
            check_utf8(prompt, f"{path}: item {number}")  # a JSON escape may be a lone surrogate
    return prompts
