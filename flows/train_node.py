"""One node of a run over several machines (tasks/nodes.py): its DeepSpeed launcher on the worker that took it,
started by the run's head through the work pool. Cancelling it (Prefect stops the flow run's process group) stops
the launcher and its ranks with it."""

import os
import subprocess
from pathlib import Path

from prefect import flow
from prefect.states import Cancelled

from tasks.devices import claim_gpus
from tasks.errors import InvalidInputError, WorkerFailed
from tasks.nodes import NAME_ENV, launcher_command
from tasks.run_record import cancelled_while_starting
from tasks.train import worker_env
from tasks.training.spec import TrainSpec


@flow(name="train-node", validate_parameters=False)
def train_node(run_name: str, spec: str, nodes: list[str], node_rank: int, master_addr: str, master_port: int) -> None:
    """Run node `node_rank` of the run's DeepSpeed launch on this machine until its ranks end."""
    if cancelled_while_starting():  # its head stopped while this process was starting
        return Cancelled(message="its run's head stopped")
    spec_path = Path(spec)
    loaded = TrainSpec.load(spec_path) if spec_path.is_file() else None
    for path in [spec_path] + ([loaded.model_dir, loaded.data_dir, loaded.eval_data_dir] if loaded else []):
        if path is not None and not path.exists():
            raise InvalidInputError(
                f"{path} is not on this machine ({os.environ.get(NAME_ENV)}): a run over several machines needs the "
                "head's TESSERA_HOME and TESSERA_CACHE at the same paths on every one (a shared filesystem: README "
                "'One run over several machines')")
    log_path = spec_path.parent / "logs" / f"node{node_rank}.log"
    with claim_gpus(loaded.processes) as gpus, open(log_path, "a") as log:
        # In this flow run's process group: Prefect's cancel reaches the launcher and every rank.
        returncode = subprocess.run(
            launcher_command(loaded, spec_path, nodes, node_rank, master_addr, master_port, gpus),
            stdout=log, stderr=subprocess.STDOUT, env=worker_env(gpus)).returncode
    if returncode != 0:
        raise WorkerFailed(f"run {run_name} node {node_rank} ({nodes[node_rank]}): its ranks exited with code "
                           f"{returncode}; see {log_path}")
