"""A Prefect worker of a process work pool on this machine: what `tessera worker` runs on each machine of a team, and
what the embedded default runs against its local server (deployments/serve.py). One way to run a flow: the same
queues, device locks and warm starts on one machine as on many."""

import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from deployments.queues import ensure_queues, queues_for
from tasks import warm_start
from tasks.devices import gpu_count
from tasks.errors import InvalidInputError
from tasks.nodes import ADDR_ENV, NAME_ENV, node_queue


def start(pool: str, gpus: int | None = None, name: str | None = None, addr: str | None = None) -> NoReturn:
    """Become the worker of `pool` (on the Prefect server in force) taking the runs that fit this machine: those that
    ask for at most `gpus` processes (default: the GPUs it sees, 1 without any), those that ask for none, and the
    nodes of runs over several machines sent to it by `name` (default: the host name). `addr` is where the other
    machines reach this one. Prefect's `prefect worker start --pool POOL --name NAME --work-queue ...`, with a
    warm-start server beside it."""
    if gpus is None:
        gpus = gpu_count() or 1
    if gpus < 1:
        raise InvalidInputError(f"--gpus {gpus}: a worker takes runs of at least 1 process")
    name = name or socket.gethostname()
    queues = [*queues_for(gpus), node_queue(name)]
    ensure_queues(pool, queues)
    os.environ[NAME_ENV] = name  # for its flow runs: the node's name, and where the others reach it
    if addr:
        os.environ[ADDR_ENV] = addr
    command = ["prefect", "worker", "start", "--pool", pool, "--name", name,
               *(f for q in queues for f in ("--work-queue", q))]
    print(" ".join(command), flush=True)
    # Flow runs start as `python -m prefect.engine` (deploy.py): this interpreter, whatever PATH the user had.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    warm_start.start_server()  # for the flow runs it starts; it leaves with the worker
    os.execvp(sys.executable, [sys.executable, "-m", *command])
