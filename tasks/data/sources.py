"""Where records come from. A source yields (line number, record) pairs, so every reader plugs into the
same validation and tokenization; the S3, Delta and Hugging Face readers will yield the same pairs."""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tasks.errors import InvalidInputError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Unparsable:
    """A record the source could not decode; it stays in the stream so validation can name where it is."""

    error: str


def local_path(uri: str | Path) -> Path:
    """The local path behind a plain path or a `file://` URI."""
    text = str(uri)
    if not _URI.match(text):
        return Path(text).expanduser()
    parsed = urlparse(text)
    if parsed.scheme != "file":
        raise InvalidInputError(
            f"{text}: {parsed.scheme}:// data is not supported yet; pass a local path or a file:// URI"
        )
    return Path(unquote(parsed.path))


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Each non-blank line of a JSON Lines file, parsed, with its 1-based line number."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, Unparsable(f"invalid JSON ({e.msg} at column {e.colno})")
            except UnicodeDecodeError as e:
                yield number, Unparsable(f"bytes that are not UTF-8 (0x{line[e.start]:02x} at column {e.start + 1})")


def text_files(path: Path) -> list[Path]:
    """The file itself, or every .txt file under a folder, in sorted order so the data order is stable."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return [path]


def read_documents(path: Path) -> Iterator[tuple[str, str | Unparsable]]:
    """Each text file's name (relative to a folder source) and its whole UTF-8 text: one document per file."""
    root = path if path.is_dir() else path.parent
    for file in text_files(path):
        data = file.read_bytes()
        try:
            text: str | Unparsable = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            text = Unparsable(f"bytes that are not UTF-8 (0x{data[e.start]:02x} on line {line})")
        yield str(file.relative_to(root)), text
