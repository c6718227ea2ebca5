"""Which devices a run trains on. The Prefect global concurrency limit DEVICE_SLOTS (one slot per GPU,
deployments/serve.py) bounds how many GPUs are in use at once; a lock file per GPU under TESSERA_HOME says which
ones each run holds, so two runs never share a GPU. The operating system drops a lock when its holder dies, so a
killed run frees its GPUs."""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from tasks.home import tessera_home

DEVICE_SLOTS = "tessera-devices"
POLL_S = 1.0  # how often a run waiting for a GPU held outside the limit looks again


def visible_gpus() -> list[str]:
    """This process's GPUs by their machine-wide ids (CUDA_VISIBLE_DEVICES when set), in CUDA's order."""
    import torch  # here: the API does not need it

    count = torch.cuda.device_count()
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
