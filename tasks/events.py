"""Run, sweep and retraining events (CREATED … COMPLETED) as Prefect events on the resource `tessera.run.<name>`."""

from datetime import datetime
from enum import StrEnum
from uuid import NAMESPACE_URL, UUID, uuid5

from prefect.events import emit_event
from prefect.events.worker import EventsWorker

from tasks.prefect_api import require_api


class RunEvent(StrEnum):
    CREATED = "CREATED"
    WARNING = "WARNING"  # created with settings that take no effect here (a recipe's Amazon-only keys)
    STARTED = "STARTED"
    RESUMED = "RESUMED"  # started again after the services stopped under it, from its latest checkpoint
    DATA_VALIDATED = "DATA_VALIDATED"
    MODEL_INITIALIZED = "MODEL_INITIALIZED"
    TRAIN_UPDATED = "TRAIN_UPDATED"
    TRAIN_FINISHED = "TRAIN_FINISHED"
    PRUNED = "PRUNED"  # a sweep's trial stopped because its eval loss fell behind the other trials'
    TRIAL_FINISHED = "TRIAL_FINISHED"  # on a sweep: one of its trials ended, with its metric
    RETRAIN_SKIPPED = "RETRAIN_SKIPPED"  # a retraining found nothing new to train on
    RETRAIN_PROMOTED = "RETRAIN_PROMOTED"  # its challenger became the champion, with both eval losses
    RETRAIN_REJECTED = "RETRAIN_REJECTED"  # its challenger did not beat the champion, with both eval losses
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (RunEvent.COMPLETED, RunEvent.CANCELED, RunEvent.FAILED)


EVENT_PREFIX = "tessera.run."


def resource_id(run_name: str) -> str:
    return f"{EVENT_PREFIX}{run_name}"


def terminal_event_id(flow_run_id: str) -> UUID:
    """A flow run's one terminal event: sent twice (a hook and a reader filling the gap), the server keeps the
    first."""
    return uuid5(NAMESPACE_URL, f"tessera:{flow_run_id}:terminal")


def emit(run_name: str, kind: RunEvent, message: str, /, flow_run_id: str | None = None,
         occurred: datetime | None = None, **payload) -> dict:
    """Send one run event; it shows in the Prefect UI's event feed, related to the flow run. Returns its payload."""
    require_api()
    if flow_run_id is None:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.id
    related = (
        [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
        if flow_run_id
        else []
    )
    payload = {"type": kind.value, "message": message, **payload}
    emit_event(
        event=f"{EVENT_PREFIX}{kind.value.lower().replace('_', '-')}",
        resource={"prefect.resource.id": resource_id(run_name), "prefect.resource.name": run_name},
        related=related,
        payload=payload,
        occurred=occurred,
        id=terminal_event_id(str(flow_run_id)) if kind.is_terminal and flow_run_id else None,
    )
    return payload


def flush() -> None:
    """Deliver queued events now: a short-lived process (the CLI, a hook) would otherwise drop them."""
    EventsWorker.drain_all(timeout=10)
