"""Register Tessera's deployments to a Prefect work pool, whose workers (`tessera worker`) run them. The embedded
default does this for its local pool at every start (deployments/serve.py); a team does it once:

    prefect work-pool create tessera --type process
    python -m deployments.deploy --pool tessera       # registers Tessera's deployments, run from this checkout
    tessera worker --pool tessera                     # on each machine that trains (with this checkout installed)

then point clients at the same server: export PREFECT_API_URL=http://<server>:4200/api. README "When one machine is
not enough" has the whole topology.
"""

import argparse
from pathlib import Path

from deployments.services import CREATE_LOCK, device_slots, max_active_runs
from flows.finetune import finetune
from flows.retrain import retrain
from flows.sweep import sweep
from flows.train_node import train_node
from tasks.devices import DEVICE_SLOTS
from tasks.prefect_api import prefect_client
from tasks.run_record import RETRAIN_TAG, RUN_TAG, SWEEP_TAG

REPO = Path(__file__).resolve().parents[1]
# Prefect's engine forked from the worker's warm-start server (tasks/flow_launcher.py). Without a command, a process
# worker starts each flow run through a workspace supervisor: a second Python process importing Prefect (~2 CPU-s a
# run), which also sets PYTHONPATH, a setting the warm-start server refuses. `python` is the worker's own
# (deployments/worker.py).
FLOW_RUN_COMMAND = "python -m tasks.flow_launcher"


def deployments() -> list[tuple]:
    """Each flow, where it is in the repository, and its deployment's settings: their one definition."""
    return [
        (finetune, "flows/finetune.py:finetune", dict(
            name="default", description="One Tessera fine-tuning run, from validation to a registered model.",
            tags=[RUN_TAG],
            # Runs past the limit wait in AwaitingConcurrencySlot (QUEUED) instead of overloading the box.
            concurrency_limit=max_active_runs(),
        )),
        (sweep, "flows/sweep.py:sweep", dict(
            name="default", description="A hyperparameter sweep: trials as finetune runs, the best registered.",
            tags=[SWEEP_TAG],
        )),
        # Each model's scheduled retraining is this deployment's twin, retrain/<model> (fm.schedule_retraining).
        (retrain, "flows/retrain.py:retrain", dict(
            name="default", description="Retrain a registered model on its new data; promote the challenger if "
                                        "it beats the champion.",
            tags=[RETRAIN_TAG],
        )),
        # Started by a run's head on the other machines of a run over several (tasks/nodes.py).
        (train_node, "flows/train_node.py:train_node", dict(
            name="default", description="One node of a training run over several machines: its DeepSpeed launcher.",
        )),
    ]


def ensure_concurrency_limits() -> None:
    """The global concurrency limits: training takes slots of DEVICE_SLOTS (one per GPU), so two runs never share a
    GPU; create() holds CREATE_LOCK's one slot while it counts the active runs and submits."""
    with prefect_client() as prefect:
        prefect.upsert_global_concurrency_limit_by_name(DEVICE_SLOTS, device_slots())
        prefect.upsert_global_concurrency_limit_by_name(CREATE_LOCK, 1)


def apply(pool: str, source: str = str(REPO), name: str = "default") -> list[str]:
    """The concurrency limits, and each deployment of deployments() on `pool`, run from `source`; their ids."""
    ensure_concurrency_limits()
    ids = []
    for flow, entrypoint, options in deployments():
        remote = flow.from_source(source=source, entrypoint=entrypoint)
        ids.append(str(remote.deploy(**{**options, "name": name}, work_pool_name=pool,
                                     job_variables={"command": FLOW_RUN_COMMAND}, print_next_steps=False,
                                     ignore_warnings=True)))
    return ids


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="tessera", help="the work pool whose workers run them (default: tessera)")
    parser.add_argument("--source", default=str(REPO), help="where workers find this repository (default: here)")
    parser.add_argument("--name", default="default", help="the deployments' name (default: default)")
    args = parser.parse_args(argv)
    return apply(args.pool, args.source, args.name)


if __name__ == "__main__":
    print("\n".join(main()))
