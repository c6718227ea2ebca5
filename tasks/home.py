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


def volumes_root() -> str:
    """Where `dbfs:/Volumes/<catalog>/<schema>/<volume>/...` lives: `TESSERA_VOLUMES_ROOT` (a folder or
    s3://bucket/prefix), default `TESSERA_HOME/volumes`."""
    return _data_root("TESSERA_VOLUMES_ROOT", "volumes")


def tables_root() -> str:
    """Where Delta tables `catalog.schema.table` live, as `<root>/<catalog>/<schema>/<table>`:
    `TESSERA_TABLES_ROOT` (a folder or s3://bucket/prefix), default `TESSERA_HOME/tables`."""
    return _data_root("TESSERA_TABLES_ROOT", "tables")


def _data_root(variable: str, default: str) -> str:
    value = os.environ.get(variable)
    if not value:
        return str(tessera_home() / default)
    if value.startswith("s3://"):
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())
