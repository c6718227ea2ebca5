"""Folders in the cache, built once and published whole: converted models, fetched sources, prepared rows."""

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path


def publish_once(target: Path, build: Callable[[Path], None], complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """`target`, built by `build(staging folder)` unless it is already `complete`.

    Under a lock, so concurrent runs build it once; into a staging folder that one rename publishes, so a folder
    under its final name is always whole, whatever killed an earlier build.
    """
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(target):
            return target
        staging = target.with_name(f"{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            build(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
