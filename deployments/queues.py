"""Work queues by GPU count, so that a run lands only on a machine it fits (Prefect's routing, no scheduler of ours).

A run that asks for `training_config.deepspeed.processes: n` goes to the queue `gpus-<n>`; one that leaves it unset
(one process per GPU of whichever machine takes it) to `default`. A worker on a machine with G GPUs takes `default`
and `gpus-1` ... `gpus-<G>` (`tessera worker`); the embedded default's worker every queue up to its device slots.
"""

from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.errors import ServiceError
from tasks.prefect_api import prefect_client

DEFAULT = "default"


def queue_for(processes: int | None) -> str:
    """The queue of a run that asks for `processes` processes on one machine (None: as many as it has GPUs)."""
    return DEFAULT if processes is None else f"gpus-{processes}"


def queues_for(gpus: int) -> list[str]:
    """The queues a worker on a machine with `gpus` GPUs takes."""
    return [DEFAULT] + [queue_for(n) for n in range(1, gpus + 1)]


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
