"""Where Tessera keeps its state on this machine."""

import os
import shutil
from pathlib import Path

from tasks.errors import StorageError

MIN_FREE_BYTES = 64 * 2**20  # below this a service's database or a run's log fails mid-write: refuse before


def tessera_home() -> Path:
    """Services, run folders and the default MLflow store: `TESSERA_HOME`, default `~/.tessera`."""
    return _usable_folder("TESSERA_HOME", "~/.tessera")


def cache_dir() -> Path:
    """Converted models and prepared datasets, shared by every run: `TESSERA_CACHE`, default `~/.cache/tessera`."""
    return _usable_folder("TESSERA_CACHE", "~/.cache/tessera")


def _usable_folder(variable: str, default: str) -> Path:
    """The folder `variable` names, created if need be; a typed error saying what is wrong with it otherwise."""
    folder = Path(os.environ.get(variable, default)).expanduser().resolve()
    fix = f"set {variable} to a writable folder on a disk with space"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{variable} {folder} cannot be used as a folder ({e.strerror}): {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"{variable} {folder} is not writable by this user: {fix}")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StorageError(f"{variable} {folder} is on a full disk ({free / 2**20:.0f} MiB free, Tessera needs at "
                           f"least {MIN_FREE_BYTES // 2**20} MiB): free space there, or {fix}")
    return folder


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


def files_root() -> str:
    """Where files uploaded through the OpenAI-compatible API live, one folder per file: `TESSERA_FILES_ROOT` (a
    folder or s3://bucket/prefix), default `TESSERA_HOME/files`."""
    return _data_root("TESSERA_FILES_ROOT", "files")


def models_root() -> Path | None:
    """The base-model folders `tessera serve`'s users may name as their model, besides the catalog's:
    `TESSERA_MODELS_ROOT`; unset, catalog names only."""
    value = os.environ.get("TESSERA_MODELS_ROOT")
    return Path(value).expanduser().resolve() if value else None


def _data_root(variable: str, default: str) -> str:
    value = os.environ.get(variable)
    if not value:
        return str(tessera_home() / default)
    if value.startswith("s3://"):
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())
