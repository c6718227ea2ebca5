"""Which devices a run trains on. The Prefect global concurrency limit DEVICE_SLOTS (one slot per GPU,
deployments/deploy.py) bounds how many GPUs are in use at once; a lock file per GPU under TESSERA_HOME says which
ones each run holds, so two runs never share a GPU. The operating system drops a lock when its holder dies, so a
killed run frees its GPUs."""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from tasks.home import tessera_home

DEVICE_SLOTS = "tessera-devices"
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"
POLL_S = 1.0  # how often a run waiting for a GPU held outside the limit looks again


def gpu_count() -> int:
    """The NVIDIA GPUs this process may use, as the driver lists them (one folder each), less those
    CUDA_VISIBLE_DEVICES hides; no torch, which a run's flow process and the API never import."""
    try:
        count = len(os.listdir(NVIDIA_GPUS))
    except FileNotFoundError:  # no NVIDIA driver: a CPU machine
        return 0
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return count
    listed = 0
    for gpu in mask.split(","):
        if not gpu.strip() or gpu.strip().startswith("-"):  # CUDA stops at the first entry that names no GPU
            break
        listed += 1
    return min(count, listed)


def visible_gpus() -> list[str]:
    """This process's GPUs by their machine-wide ids (CUDA_VISIBLE_DEVICES when set), in CUDA's order."""
    count = gpu_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [gpu.strip() for gpu in mask.split(",")][:count] if mask else [str(i) for i in range(count)]


@contextmanager
def claim_gpus(count: int, visible: list[str] | None = None) -> Iterator[list[str]]:
    """Hold `count` of the `visible` GPUs (default: this process's) until the block ends; yields their machine-wide
    ids, [] on a machine without GPUs."""
    visible = visible_gpus() if visible is None else visible
    if not visible:
        yield []
        return
    folder = tessera_home() / "services" / "gpus"
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        claimed: list[str] = []
        while True:
            for gpu in visible:
                if len(claimed) == count:
                    break
                if gpu in claimed:
                    continue
                lock = open(folder / f"gpu-{gpu}.lock", "w")
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another run's
                    lock.close()
                    continue
                held.enter_context(lock)
                claimed.append(gpu)
            if len(claimed) == count:
                break
            time.sleep(POLL_S)
        yield claimed
