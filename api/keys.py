"""API keys: who a bearer token is. The same keys for every HTTP surface of `tessera serve`.

`TESSERA_API_KEYS` holds `user:key` pairs separated by commas; `TESSERA_API_KEYS_FILE` names a file with one
`user:key` a line (# comments allowed). The user is who the caller's runs are created by (an email, as the anchor
records). With no keys, the server answers loopback callers only, each as the local user.
"""

import hmac
import os
from pathlib import Path

from tasks.errors import InvalidInputError


def api_keys() -> dict[str, str]:
    """key → user, from TESSERA_API_KEYS and TESSERA_API_KEYS_FILE; a malformed entry is refused by its place."""
    entries = [("TESSERA_API_KEYS", e) for e in os.environ.get("TESSERA_API_KEYS", "").split(",")]
    if path := os.environ.get("TESSERA_API_KEYS_FILE"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise InvalidInputError(f"TESSERA_API_KEYS_FILE {path} cannot be read: {e.strerror}") from None
        entries += [(f"{path} line {n}", line) for n, line in enumerate(lines, 1) if not line.startswith("#")]
    keys = {}
    for where, entry in entries:
        if not entry.strip():
            continue
        user, _, key = entry.strip().partition(":")
        if not user or len(key) < 16:
            raise InvalidInputError(f"{where}: an API key is user:key with a key of 16 characters or more "
                                    "(e.g. alice@example.com:$(openssl rand -hex 24))")
        keys[key] = user
    return keys


def user_for(token: str, keys: dict[str, str]) -> str | None:
    """The user whose key the token is; None for no match (compared in constant time)."""
    return next((user for key, user in keys.items() if hmac.compare_digest(key.encode(), token.encode())), None)
