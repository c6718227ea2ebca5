"""Jobs: what a run, a sweep and a retraining are alike on the client, so that each module holds only what differs.

A job is a flow run of its kind's deployment, named as the job and carrying its kind's tag; its status is the flow
run's Prefect state, its events Prefect events on the resource `tessera.run.<name>`. A Kind says which tag,
deployment and word; Job is the base of TrainingRun, Sweep and Retraining (read back, refreshed, cancelled and
followed alike); Kind.start and tracked() are the one way any of them is started.
"""

import builtins
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Self, TypeVar
from uuid import UUID

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.events.filters import (
    EventFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)

from deployments import services
from flows.lifecycle import launch
from tasks.errors import InvalidInputError, RunNotFoundError
from tasks.events import RunEvent, emit, flush, resource_id
from tasks.flow_runs import RunStatus, newest_flow_run, stop_flow_run, under_way
from tasks.prefect_api import prefect_client
from tasks.run_record import RunRecord, tag_value
from tasks.tracking import end_run, start_run

FOLLOW_POLL_S = 1.0
# Prefect stores an event a moment after it is sent (the embedded server flushes every 0.5 s): how long an ended
# run's own terminal event may take to show before it is written from the run's final state instead.
EVENTS_SETTLE_S = 10.0
# The longest one read waits for that terminal event before writing it: the Databricks SDK gives a read 10 s.
READ_WAIT_S = 4.0



@dataclass
class FineTuningEvent:
    type: str
    time: datetime
    message: str
    payload: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, payload: dict, occurred: datetime, event: str = "") -> "FineTuningEvent":
        """The event whose payload tasks.events.emit sent; `event`, the Prefect event's name, types one without."""
        return cls(payload.get("type", event), occurred, payload.get("message", ""), payload)


# --- kinds ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What tells one kind of job from another: the tag its flow runs carry, the word messages call one by, the call
    that lists them (named when a name is not found), its deployment, and the tag of the runs one starts (a sweep's
    trials, a retraining's challenger; None for a run)."""

    tag: str
    word: str
    listing: str
    deployment: str
    runs_under: Callable[[str], str] | None = None

    def newest(self, name: str):
        """The newest flow run named `name` of this kind (a resumed sweep has one per attempt). Asked for by name, a
        job is found whatever its state or start time."""
        with prefect_client() as prefect:
            found = newest_flow_run(prefect, name, self.tag)
        if found is None:
            raise self.not_found(name)
        return found

    def not_found(self, name: str) -> RunNotFoundError:
        """The error for a name with no job behind it: also what `tessera serve` says of another user's run."""
        return RunNotFoundError(f"no {self.word} named {name!r} on {services.prefect_api_url()}: see {self.listing} "
                                "for names")

    def start(self, name: str, parameters: dict[str, Any], tags: "builtins.list[str]", created: str, *,
              deployment: str | None = None):
        """Start a flow run of the kind's deployment (or `deployment`, a twin of it) named as the job and return at
        once, its CREATED event delivered."""
        return launch(deployment or self.deployment, name, parameters, tags, created)

    def start_tracked(self, config, name: str, experiment_path: str, user: str, parameters: dict[str, Any],
                      tags: Callable[[str], "builtins.list[str]"], created: str, deployment: str | None = None):
        """Start a job with its MLflow run (tracked) as start() does: `tags` are its flow run's, given the MLflow
        experiment's id; the flow is passed `mlflow_run_id` besides `parameters`."""
        with services.connected(), tracked(config, name, experiment_path, user) as (experiment_id, mlflow_run_id):
            return self.start(name, parameters | {"mlflow_run_id": mlflow_run_id}, tags(experiment_id), created,
                              deployment=deployment)


@contextmanager
def tracked(config, name: str, experiment_path: str, user: str) -> Iterator[tuple[str, str]]:
    """The MLflow run a job is started with, as (experiment_id, mlflow_run_id), failed if the job is not started."""
    experiment_id, mlflow_run_id = start_run(config.params(), name, experiment_path, user,
                                             display_name=config.run.mlflow_run_name,
                                             mirror=config.run.mlflow_tracking_uri)
    with failed_unless_started(mlflow_run_id):
        yield experiment_id, mlflow_run_id


@contextmanager
def failed_unless_started(mlflow_run_id: str) -> Iterator[None]:
    """No MLflow run without its flow run: the MLflow run of a run, sweep or retraining whose flow run could not be
    started (the Prefect server refused the client, or was down) ends FAILED instead of showing RUNNING for good."""
    try:
        yield
    except Exception:
        end_run(mlflow_run_id, "FAILED")
        raise


# --- the returned objects ------------------------------------------------------------------------------------------


class Job:
    """The base of TrainingRun, Sweep and Retraining: read back, refreshed, cancelled and followed alike. Its fields
    are declared by each dataclass, in its own order; this class holds none, so that order stays the public one."""

    KIND: ClassVar[Kind]
    name: str  # each has the fields common_fields() reads, name first

    @classmethod
    def of(cls, flow_run) -> Self:
        """The job a flow run of its kind is."""
        raise NotImplementedError

    @classmethod
    def read(cls, name: str) -> Self:
        """The job by name (its newest attempt), with its current status."""
        with services.connected():
            return cls.of(cls.KIND.newest(name))

    def refresh(self) -> Self:
        """Read it again in place: whoever holds it sees the status and times as they are now."""
        self.__dict__.update(self.read(self.name).__dict__)
        return self

    def cancel(self) -> int:
        """Stop it and then the runs it started, which would otherwise train on for no one; returns how many runs
        were stopped (a sweep or a retraining is not one)."""
        with services.connected(), prefect_client() as prefect:
            stopped = stop_flow_run(prefect, self.KIND.newest(self.name), self.KIND.word)
            if self.KIND.runs_under is not None:
                started = under_way(prefect, [self.KIND.runs_under(self.name)])
                stopped = sum(stop_flow_run(prefect, flow_run, "run") for flow_run in started)
            flush()
        return int(stopped)

    def get_events(self, follow: bool = False):
        """Its events, oldest first; with follow=True an iterator that ends at a terminal event."""
        return job_events(self.KIND, self.name, follow)


def name_of(job: "str | Job") -> str:
    """The job's name, given it or the job."""
    return job.name if isinstance(job, Job) else job


def common_fields(flow_run) -> dict[str, Any]:
    """The fields every job reads alike off its flow run: name, status, times, why it failed, the flow run's id."""
    status = RunStatus.of(flow_run)
    return dict(name=flow_run.name, status=status, created_at=flow_run.created, started_at=flow_run.start_time,
                completed_at=flow_run.end_time if status.is_terminal() else None,
                details=flow_run.state.message if flow_run.state and status == RunStatus.FAILED else None,
                flow_run_id=str(flow_run.id))


def tracking_ids(flow_run) -> tuple[str | None, str | None]:
    """The job's MLflow experiment and run, as its tags and parameters say, else as its run record does (a job
    started some other way, e.g. `prefect deployment run`)."""
    record = RunRecord.load(flow_run.name)
    experiment_id = tag_value(flow_run.tags, "experiment") or (record.experiment_id if record else None)
    return experiment_id, flow_run.parameters.get("mlflow_run_id") or (record.mlflow_run_id if record else None)


def creator(flow_run) -> str:
    """Who started the job; one started from Prefect itself (its UI, a schedule) is Prefect's."""
    return tag_value(flow_run.tags, "created_by") or "prefect"


# --- listing -------------------------------------------------------------------------------------------------------

J = TypeVar("J", bound=Job)


def wanted_statuses(values: "builtins.list[str | RunStatus] | None") -> "builtins.list[RunStatus] | None":
    """The statuses a listing asks for (None: any); one that is not a status is refused as the caller's mistake."""
    return [_status(value) for value in values] if values else None


def _status(value: "str | RunStatus") -> RunStatus:
    """A status, or the typed error naming the ones there are."""
    try:
        return RunStatus(value)
    except ValueError:
        raise InvalidInputError(f"status {value!r} is unknown: use one of {', '.join(RunStatus)}") from None


def newest_first(jobs: "builtins.list[J]", wanted: "builtins.list[RunStatus] | None", limit: int) -> "builtins.list[J]":
    """The jobs in a wanted status, newest first, up to `limit`: the filters ask for more states than match."""
    return sorted((j for j in jobs if wanted is None or j.status in wanted), key=lambda j: j.created_at,
                  reverse=True)[:limit]


# --- events --------------------------------------------------------------------------------------------------------


def job_events(kind: Kind, name: str, follow: bool = False):
    """The job's events, oldest first; with follow=True an iterator that ends at a terminal event."""
    if follow:
        return _follow(kind, name)
    with services.connected():
        return settled_events(name, kind.newest(name))


def read_events(name: str) -> "builtins.list[FineTuningEvent]":
    """The job's events as stored now, oldest first."""
    with prefect_client() as prefect:
        return _read_events_of(prefect, [name])[name]


def _read_events_of(prefect, names: "builtins.list[str]") -> "dict[str, builtins.list[FineTuningEvent]]":
    """The events of each named run, oldest first: one query for all of them."""
    event_filter = EventFilter(
        resource=EventResourceFilter(id=[resource_id(name) for name in names]),
        occurred=EventOccurredFilter(since=datetime(2020, 1, 1, tzinfo=timezone.utc)),
        order=EventOrder.ASC,
    )
    events: dict[str, builtins.list[FineTuningEvent]] = {name: [] for name in names}
    by_resource = {resource_id(name): name for name in names}
    page = prefect.read_events(filter=event_filter, limit=50)  # the server's page size cap
    while True:
        for e in page.events:
            events[by_resource[e.resource.id]].append(
                FineTuningEvent.of(e.payload, e.occurred, e.event))
        if not page.next_page:
            break
        page = prefect.read_events_page(page.next_page)
    return {name: sorted(found, key=lambda e: e.time) for name, found in events.items()}


def events_of(jobs: "builtins.list[Job]") -> "builtins.list[builtins.list[FineTuningEvent]]":
    """Each job's events as get_events() gives them, read together: one query for all, and a wait only for a job
    whose events may still be on their way. A page of a listing costs a few queries, not a few per run."""
    if not jobs:
        return []
    with services.connected(), prefect_client() as prefect:
        ids = FlowRunFilterId(any_=[UUID(j.flow_run_id) for j in jobs])
        flow_runs = {str(f.id): f for f in prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=ids))}
        read = _read_events_of(prefect, [j.name for j in jobs])
        return [settled_events(j.name, flow_runs[j.flow_run_id], read[j.name]) for j in jobs]


def settled_events(name: str, flow_run, events: "builtins.list[FineTuningEvent] | None" = None
                   ) -> "builtins.list[FineTuningEvent]":
    """The events of the run (sweep, retraining) whose flow run this is, oldest first: from its CREATED event on for
    a run create() made, and once it has ended, through its terminal event, so that what the status says and what
    the events say agree. A terminal event that never comes (its process was killed) is written from the flow run's
    final state, once: every reader sends the same event id, and the server keeps the first. Only an event sent in
    the last EVENTS_SETTLE_S can still be on its way: a run that ended before that, or never ran, is read without
    waiting for it, and no read waits more than READ_WAIT_S.
    `events`: the run's events as just read, if they were."""
    events = read_events(name) if events is None else events
    # A run create() submitted has its CREATED event, sent before create() returned and stored a moment later.
    deadline = _settled_by(flow_run.created)
    while not events and flow_run.parameters.get("run_name") and time.monotonic() < deadline:
        time.sleep(0.25)
        events = read_events(name)
    status = RunStatus.of(flow_run)
    if not status.is_terminal():
        return events
    # A run that never ran (cancelled before it started) has no process to send its end: it is written at once.
    deadline = min(_settled_by(flow_run.end_time), time.monotonic() + READ_WAIT_S) if flow_run.run_count else 0.0
    written = None
    while not any(_ends(e, flow_run) for e in events):
        if time.monotonic() > deadline:
            if written is not None:  # stored a moment later: this read does not wait for it
                return [*events, written]
            written = _write_end(name, flow_run, status)
            deadline = time.monotonic() + 1.0
        time.sleep(0.25)
        events = read_events(name)
    return events


def _write_end(name: str, flow_run, status: RunStatus) -> FineTuningEvent:
    """The run's terminal event, sent from its flow run's final state, as a read will give it."""
    kind = {RunStatus.COMPLETED: RunEvent.COMPLETED, RunStatus.STOPPED: RunEvent.CANCELED}.get(status, RunEvent.FAILED)
    message = flow_run.state.message or status.value.lower()
    payload = emit(name, kind, message, flow_run_id=str(flow_run.id), occurred=flow_run.end_time, from_state=True)
    flush()
    return FineTuningEvent.of(payload, flow_run.end_time)


def _settled_by(sent: datetime | None) -> float:
    """The monotonic time by which every event sent up to `sent` (None: now) is stored and readable."""
    ago = (datetime.now(timezone.utc) - sent).total_seconds() if sent else 0.0
    return time.monotonic() + max(0.0, EVENTS_SETTLE_S - ago)


def _ends(event: FineTuningEvent, flow_run) -> bool:
    """Whether the event ends this flow run: a terminal event since it was created. A sweep resumed after a crash
    is a new flow run under the same name, and the old attempt's FAILED is history, not its end."""
    return RunEvent(event.type).is_terminal and event.time >= flow_run.created


def _follow(kind: Kind, name: str) -> Iterator[FineTuningEvent]:
    """The events of a job as they come, to the terminal one."""
    seen: set[tuple] = set()
    with services.connected():
        while True:
            flow_run = kind.newest(name)  # read first: if it has ended, the events read next are all there
            ended = RunStatus.of(flow_run).is_terminal()
            for event in settled_events(name, flow_run) if ended else read_events(name):
                key = (event.type, event.time, event.message)
                if key in seen:
                    continue
                seen.add(key)
                yield event
                if _ends(event, flow_run):
                    return
            if ended:
                return
            time.sleep(FOLLOW_POLL_S)
