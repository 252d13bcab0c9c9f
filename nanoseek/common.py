"""Neutral helpers every layer may use: device choice and file I/O that never leaves half a file.

Writes are atomic (a temporary file in the same directory, then a rename), so a reader or a killed run sees the
old file or the new one, never a torn one; reads name the file and line of anything they cannot parse.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


def pick_device(name: str) -> torch.device:
    """"auto": CUDA when there is a GPU, else the CPU; any other name as torch spells it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it over `path` (the directory is created
    if needed). On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """JSON, indented, atomically; NaN and infinity are refused (they are not JSON)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line, atomically; returns the number of records written."""
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1

    atomic_write(path, write)
    return count


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a line that is not UTF-8 or not a JSON object is an error
    naming it. Lines are decoded one by one (a text-mode file would fail on a bad byte without saying which
    line); a UTF-8 byte-order mark, as some editors write, is allowed at the start of the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise ValueError(f"{path}:{i}: not valid JSON ({why})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
            yield i, record
