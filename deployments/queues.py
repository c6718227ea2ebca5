"""The work queues a worker takes, by its machine's GPU count (tasks/routing.py names them), created in its pool."""

from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.errors import ServiceError
from tasks.prefect_api import prefect_client
from tasks.routing import DEFAULT_QUEUE, queue_for


def queues_for(gpus: int) -> list[str]:
    """The queues a worker on a machine with `gpus` GPUs takes."""
    return [DEFAULT_QUEUE] + [queue_for(n) for n in range(1, gpus + 1)]


def ensure_queues(pool: str, queues: list[str]) -> None:
    """Create the pool's queues that do not exist yet: a worker that names one the pool lacks never gets a run."""
    with prefect_client() as prefect:
        for queue in queues:
            try:
                prefect.create_work_queue(name=queue, work_pool_name=pool)
            except ObjectAlreadyExists:
                pass
            except ObjectNotFound:
                raise ServiceError(f"no work pool {pool!r} on {prefect.api_url}: create it "
                                   f"(prefect work-pool create {pool} --type process)") from None
