"""Where Tessera keeps its state on this machine."""

import os
from pathlib import Path


def tessera_home() -> Path:
    """Services, run folders and the default MLflow store: `TESSERA_HOME`, default `~/.tessera`."""
    home = Path(os.environ.get("TESSERA_HOME", "~/.tessera")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir() -> Path:
    """Converted models and prepared datasets, shared by every run: `TESSERA_CACHE`, default `~/.cache/tessera`."""
    cache = Path(os.environ.get("TESSERA_CACHE", "~/.cache/tessera")).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def runs_dir() -> Path:
    """One folder per run: its config, logs, prepared data links and checkpoints."""
    path = tessera_home() / "runs"
    path.mkdir(exist_ok=True)
    return path
