"""The local runner: serves `finetune/`, `sweep/` and `retrain/default` from this machine. Started by the embedded
default.

`DEPLOYMENTS` is the deployments' one definition, shared with deployments/deploy.py (work pools).
"""

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType

from flows.finetune import finetune
from flows.retrain import retrain
from flows.services import device_slots, max_active_runs
from flows.sweep import sweep
from tasks.devices import DEVICE_SLOTS
from tasks.run_record import RETRAIN_TAG, RUN_TAG, SWEEP_TAG


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
        # Each model's retraining is a schedule of this deployment (fm.schedule_retraining), kept when it is served
        # again: Prefect keeps schedules that have a slug.
        (retrain, "flows/retrain.py:retrain", dict(
            name="default", description="Retrain a registered model on its new data; promote the challenger if "
                                        "it beats the champion.",
            tags=[RETRAIN_TAG],
        )),
    ]


def ensure_device_slots() -> None:
    """The global concurrency limit training takes slots of (one per GPU): two runs never share a GPU."""
    with get_client(sync_client=True) as prefect:
        prefect.upsert_global_concurrency_limit_by_name(DEVICE_SLOTS, device_slots())


def main() -> None:
    ensure_device_slots()
    # Importable from any working directory.
    served = [flow.to_deployment(**options, entrypoint_type=EntrypointType.MODULE_PATH)
              for flow, _, options in deployments()]
    serve(*served, print_starting_message=False)  # finetune's concurrency limit bounds its runs


if __name__ == "__main__":
    main()
