"""One run over several machines: DeepSpeed's multi-node launch, one launcher per node, each started through the work
pool (Prefect's routing; DeepSpeed's `--no_ssh` mode, so no node needs ssh to another).

The worker that takes a run with `training_config.deepspeed.nodes: N` is its head, node 0. It picks N-1 other online
workers of its pool, starts a `train-node` flow run on each one's own queue (`node-<name>`), and runs node 0's
launcher itself. Every node runs `deepspeed --hostfile H --no_ssh --node_rank k --master_addr <head> ...`: DeepSpeed
gives each process its global rank and they meet at the head's address. The run folder (spec, rows, checkpoints)
must be at the same path on every node: a shared filesystem, as DeepSpeed's multi-node checkpoints need.

`tessera worker --name NAME --addr ADDR` sets both for its runs (TESSERA_NODE, TESSERA_NODE_ADDR); gloo finds its
interface by GLOO_SOCKET_IFNAME, NCCL by NCCL_SOCKET_IFNAME, from the worker's environment.
"""

import os
import sys
import threading
import time
from pathlib import Path

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run

from tasks import routing
from tasks.errors import InvalidInputError, ServiceError
from tasks.ports import free_port
from tasks.prefect_api import prefect_client
from tasks.process_group import stop_group
from tasks.run_record import cancel_flow_run
from tasks.training.spec import TrainSpec

NAME_ENV, ADDR_ENV = "TESSERA_NODE", "TESSERA_NODE_ADDR"
START_S = 180  # a node's flow run not running by then (its worker gone): the run fails instead of waiting
END_S = 60  # how long a head that trained to the end waits for the other nodes' flow runs to end on their own
WATCH_S = 2.0


def node_queue(name: str) -> str:
    """The work queue only the worker named `name` takes: where the head sends that machine's node."""
    return f"node-{name}"


def launcher_command(spec: TrainSpec, spec_path: Path, nodes: list[str], node_rank: int, master_addr: str,
                     master_port: int, gpus: list[str]) -> list[str]:
    """Node `node_rank`'s DeepSpeed launcher, its hostfile written beside the spec.

    The hostfile lists every node with `spec.processes` slots, in the same order on each, so that each process gets
    the same global rank everywhere. On a GPU machine this node's entry names the GPUs it holds (machine-wide ids);
    the other nodes' entries only count."""
    hostfile = spec_path.parent / f"hostfile.node{node_rank}"
    slots = {node: spec.processes for node in nodes}
    include = []
    if gpus:
        own = nodes[node_rank]
        slots[own] = max(int(gpu) for gpu in gpus) + 1
        ids = {node: list(range(spec.processes)) for node in nodes} | {own: gpus}
        include = ["--include", "@".join(f"{node}:{','.join(map(str, ids[node]))}" for node in nodes)]
    hostfile.write_text("".join(f"{node} slots={count}\n" for node, count in slots.items()))
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), *include, "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(master_port),
            "--module", "tasks.training.worker", "--run-name", spec.run_name, "--spec", str(spec_path)]


class OtherNodes:
    """The head's view of nodes 1..N-1: chosen among the pool's workers, started as flow runs on their queues,
    watched while node 0 trains, and cancelled if still running when it stops."""

    def __init__(self, spec: TrainSpec, spec_path: Path):
        self.spec, self.spec_path, self.flow_runs = spec, spec_path, []
        self.failure: str | None = None  # why another node ended the run, when one did
        self._stopped = threading.Event()
        nodes = spec.config.training_config.deepspeed.nodes
        own, self.master_addr = os.environ.get(NAME_ENV), os.environ.get(ADDR_ENV)
        if not own or not self.master_addr:
            raise InvalidInputError(
                f"training_config.deepspeed.nodes {nodes} needs its head to know its name and address: start the "
                "workers with `tessera worker --name NAME --addr ADDRESS` (the address the other machines reach "
                "this one at), as README 'When one machine is not enough' shows")
        with prefect_client() as prefect:
            pool = prefect.read_flow_run(current_flow_run.id).work_pool_name
            if pool is None:
                raise InvalidInputError(f"training_config.deepspeed.nodes {nodes} needs a work pool: the embedded "
                                        "runner trains on one machine (README 'When one machine is not enough')")
            # Tessera's workers: online, and taking their own node queue.
            queues = {q.name for q in prefect.read_work_queues(work_pool_name=pool)}
            online = sorted(w.name for w in prefect.read_workers_for_work_pool(pool)
                            if w.status == WorkerStatus.ONLINE and w.name != own and node_queue(w.name) in queues)
        if len(online) < nodes - 1:
            raise ServiceError(
                f"training_config.deepspeed.nodes {nodes} needs {nodes - 1} more machine(s) with a worker of work "
                f"pool {pool!r}; online besides this one ({own}): {', '.join(online) or 'none'}. Start "
                f"`tessera worker --pool {pool} --name NAME --addr ADDRESS` on another machine")
        self.nodes = [own, *online[: nodes - 1]]
        self.master_port = free_port()

    def start(self) -> None:
        """A train-node flow run for each other node, on that worker's own queue."""
        for rank, node in enumerate(self.nodes[1:], start=1):
            parameters = dict(run_name=self.spec.run_name, spec=str(self.spec_path), nodes=self.nodes,
                              node_rank=rank, master_addr=self.master_addr, master_port=self.master_port)
            self.flow_runs.append(run_deployment(routing.NODE, parameters=parameters, timeout=0,
                                                 work_queue_name=node_queue(node),
                                                 flow_run_name=f"{self.spec.run_name}-node{rank}").id)

    def command(self, gpus: list[str]) -> list[str]:
        """Node 0's launcher: this machine's part of the run."""
        return launcher_command(self.spec, self.spec_path, self.nodes, 0, self.master_addr, self.master_port, gpus)

    def watch(self, pgid: int) -> None:
        """In the background: when another node fails, is cancelled, or does not start within START_S, say why in
        `failure` and stop node 0's launcher (group `pgid`), so that no rank waits for a peer that is gone."""

        def check() -> None:
            started = time.monotonic()
            while not self._stopped.wait(WATCH_S):
                try:
                    self.failure = self._failed_node(time.monotonic() - started)
                except Exception:  # the server busy or restarting: look again at the next round
                    continue
                if self.failure:
                    stop_group(pgid)
                    return

        threading.Thread(target=check, name="other-nodes", daemon=True).start()

    def stop(self, wait_s: float = 0) -> None:
        """End the watch and cancel the nodes still running or waiting, after `wait_s` for them to end on their own
        (their ranks end with node 0's): a stopped head leaves no rank behind."""
        self._stopped.set()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not all(r.state.is_final() for r in self._read()):
            time.sleep(WATCH_S)
        with prefect_client() as prefect:
            for run in self._read():
                cancel_flow_run(prefect, run, "its run's head stopped")

    def _failed_node(self, waited_s: float) -> str | None:
        for rank, run in enumerate(self._read(), start=1):
            where = f"node {rank} ({self.nodes[rank]})"
            if run.state_type in (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
                return f"{where} {run.state_name.lower()}: {run.state.message}"
            if run.state_type in (StateType.SCHEDULED, StateType.PENDING) and waited_s > START_S:
                return f"{where} did not start within {START_S} s: is its worker still running?"
        return None

    def _read(self) -> list:
        if not self.flow_runs:
            return []
        with prefect_client() as prefect:
            runs = {r.id: r for r in prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=self.flow_runs)))}
        return [runs[i] for i in self.flow_runs if i in runs]
