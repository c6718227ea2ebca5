"""Local paths as users write them: a plain path or a `file://` URI, and the documents under a folder."""

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from tasks.errors import InvalidInputError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def text_files(path: Path) -> list[Path]:
    """The file itself, or every .txt file under a folder, in sorted order so the data order is stable."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return [path]
