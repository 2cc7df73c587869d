"""Files written so that a killed run never leaves a half-written one, and JSONL read line by line."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


def replace_path(staging: Path, target: Path) -> None:
    """Puts `staging` (a file or directory written next to `target`) in `target`'s place: an
    existing target is renamed aside first and removed after, so a reader finds the old target,
    the new one, or (for an instant) none, never a half-written one."""
    staging, target = Path(staging), Path(target)
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.replaced-{os.getpid()}-{time.time_ns()}")
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()


def directory_problem(directory: Path, flag: str) -> str | None:
    """Why the directory a `flag` names cannot be used or created (a file in its place, or in
    place of one of its parents), as one line naming the flag; None when it can."""
    directory = Path(directory)
    for path in (directory, *directory.absolute().parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return None
            where = "" if path == directory else f": {path}"
            return f"{flag} {directory}{where} is a file, not a directory; give a directory"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Replaces `path` by `text` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    replace_path(staging, path)


def jsonl_values(lines: Iterable[str]) -> Iterator[tuple[int, str, object]]:
    """(line number, line, its JSON value or the json.JSONDecodeError) for each non-blank line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, line, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, line, err
