"""The local runner: serves `finetune/`, `sweep/`, `retrain/default` and `train-node/default`, and each model's
`retrain/<model>` as fm.schedule_retraining() creates it, from this machine. Started by the embedded default.

`deployments()` is their one definition, shared with deployments/deploy.py (work pools).
"""

import asyncio

import anyio
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.deployments.runner import EntrypointType
from prefect.logging import get_logger
from prefect.runner import Runner

from flows.finetune import finetune
from flows.retrain import retrain
from deployments.services import CREATE_LOCK, device_slots, max_active_runs
from flows.sweep import sweep
from flows.train_node import train_node
from tasks import warm_start
from tasks.devices import DEVICE_SLOTS
from tasks.prefect_api import prefect_client
from tasks.run_record import RETRAIN_TAG, RUN_TAG, SWEEP_TAG

ADOPT_EVERY_S = 5  # how soon a new model's retrain deployment is served: its first run waits at most this long


def deployments() -> list[tuple]:
    """Each flow, where it is in the repository, and its deployment's settings."""
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
        # Started by a run's head on the other machines of a run over several (tasks/nodes.py): on work pools only.
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


async def serve_model_retrainings(runner: Runner) -> None:
    """Serve each retrain/<model> deployment this runner did not start with, as it appears.

    Prefect's runner serves the deployments it is given, and its add_deployment() re-applies one, which would reset
    the model's schedule and settings; so the deployment is registered as it stands. Those in a work pool are its
    workers' to run."""
    registry = runner._deployment_registry  # Prefect 3.9: no public way to serve an existing deployment
    logger = get_logger("tessera.runner")
    while True:
        try:
            async with get_client() as prefect:
                found = await prefect.read_deployments(
                    deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[RETRAIN_TAG])))
            for deployment in found:
                if deployment.work_pool_name is None and deployment.id not in registry.get_deployment_ids():
                    registry.register_deployment(deployment.id, deployment.name)
                    logger.info("serving retrain/%s", deployment.name)
        except Exception as e:  # the server restarting: try again at the next round
            logger.warning("could not list the retrain deployments: %s", e)
        await anyio.sleep(ADOPT_EVERY_S)


async def serve() -> None:
    # Schedules stay on when the runner stops: a retraining due while it is down runs, late, when it is back.
    runner = Runner(name="tessera", pause_on_shutdown=False)
    for flow, _, options in deployments():  # importable from any working directory
        await runner.aadd_deployment(await flow.ato_deployment(**options, entrypoint_type=EntrypointType.MODULE_PATH))
    async with anyio.create_task_group() as group:
        group.start_soon(serve_model_retrainings, runner)
        await runner.start()  # until SIGTERM; finetune's concurrency limit bounds its runs
        group.cancel_scope.cancel()


def main() -> None:
    ensure_concurrency_limits()
    warm_start.start_server()  # for the flow runs it starts; it leaves with the runner
    asyncio.run(serve())


if __name__ == "__main__":
    main()
