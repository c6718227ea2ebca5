"""The embedded default's worker: a process work pool on the local Prefect server, Tessera's deployments applied to
it (deployments/deploy.py), and `tessera worker`'s own code (deployments/worker.py) serving it, so that one machine
runs flows the way a team's machines do. Started by deployments/services.py as `python -m deployments.serve`.

Each model's `retrain/<model>` deployment is created on the pool retrain/default is on (fm.schedule_retraining), so
the worker runs it like any other.
"""

from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.exceptions import ObjectAlreadyExists

from deployments import deploy, worker
from deployments.services import LOCAL_POOL, device_slots
from tasks.prefect_api import prefect_client
from tasks.run_record import RETRAIN_TAG


def ensure_pool() -> None:
    """The local process pool; and the retrain/<model> deployments a home's earlier runner served without a pool moved
    onto it, so their schedules go on."""
    with prefect_client() as prefect:
        try:
            prefect.create_work_pool(WorkPoolCreate(name=LOCAL_POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        for found in prefect.read_deployments(deployment_filter=DeploymentFilter(
                tags=DeploymentFilterTags(all_=[RETRAIN_TAG]))):
            if found.work_pool_name is None:
                prefect.update_deployment(found.id, DeploymentUpdate(work_pool_name=LOCAL_POOL))


def main() -> None:
    ensure_pool()
    deploy.apply(LOCAL_POOL)
    # Every run this machine can train: on a CPU machine a run's processes are bounded by its device slots.
    worker.start(LOCAL_POOL, gpus=device_slots())


if __name__ == "__main__":
    main()
