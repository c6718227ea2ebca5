"""Runs: create, get, list, cancel, their events and checkpoints, as the anchor's foundation_model has them.

A run is a flow run of the `finetune/default` deployment tagged `tessera`; its status is the flow run's Prefect
state, its events Prefect events on the resource `tessera.run.<name>`.
"""

import builtins
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any
from uuid import UUID

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)

from deployments.queues import queue_for
from flows import services
from tasks.config import RunConfig, run_name_for
from tasks.data.validation import DataValidation, validate_data  # noqa: F401  (public API)
from tasks.errors import (
    InvalidInputError,
    RunNotFoundError,
    ServiceError,
    TooManyActiveRunsError,
)
from tasks.events import RunEvent, emit, flush, resource_id
from tasks.models import ModelInfo
from tasks.models import get_models as _catalog
from tasks.prefect_api import prefect_client
from tasks.recipe import SHORTHANDS, configure
from tasks.run_record import CANCELLED_TAG, RUN_TAG, RunRecord, cancel_flow_run, current_user, run_tags, tag_value
from tasks.tracking import client as mlflow_client
from tasks.tracking import experiment_for, start_run
from tasks.training.checkpoint_names import complete_checkpoints
from tasks.training.protocol import seconds_left
from tasks.upload_checkpoints import artifact_dir
from tasks.validate_paths import check_paths

PAGE = 200
FOLLOW_POLL_S = 1.0
# Prefect stores an event a moment after it is sent (the embedded server flushes every 0.5 s): how long an ended
# run's own terminal event may take to show before it is written from the run's final state instead.
EVENTS_SETTLE_S = 10.0


class RunStatus(StrEnum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    def is_terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED)

    @property
    def display_name(self) -> str:
        return self.value.capitalize()

    @classmethod
    def of(cls, flow_run) -> "RunStatus":
        """A flow run's status. One cancelled while its process was starting (CANCELLED_TAG) is TERMINATING until it
        ends, then STOPPED however Prefect recorded the end: the runner may kill that process mid-start (Crashed)."""
        status = cls.from_state(flow_run.state)
        if CANCELLED_TAG not in flow_run.tags:
            return status
        return cls.STOPPED if status.is_terminal() else cls.TERMINATING

    @classmethod
    def from_state(cls, state) -> "RunStatus":
        """The anchor's status for a Prefect flow-run state."""
        if state is None:
            return cls.PENDING
        if state.type == StateType.SCHEDULED:
            return cls.QUEUED if state.name == "AwaitingConcurrencySlot" else cls.PENDING
        return {
            StateType.PENDING: cls.STARTING,
            StateType.RUNNING: cls.RUNNING,
            StateType.CANCELLING: cls.TERMINATING,
            StateType.COMPLETED: cls.COMPLETED,
            StateType.CANCELLED: cls.STOPPED,
            StateType.FAILED: cls.FAILED,
            StateType.CRASHED: cls.FAILED,
            StateType.PAUSED: cls.PENDING,
        }[state.type]


# The Prefect states a status may be read from; RunStatus.of decides (a run cancelled while starting is TERMINATING
# while Pending or Running, and STOPPED after a crash), so a filter by status asks for these and keeps the matches.
_STATE_TYPES = {
    RunStatus.PENDING: [StateType.SCHEDULED, StateType.PAUSED],
    RunStatus.QUEUED: [StateType.SCHEDULED],
    RunStatus.STARTING: [StateType.PENDING],
    RunStatus.RUNNING: [StateType.RUNNING],
    RunStatus.TERMINATING: [StateType.CANCELLING, StateType.PENDING, StateType.RUNNING],
    RunStatus.COMPLETED: [StateType.COMPLETED],
    RunStatus.STOPPED: [StateType.CANCELLED, StateType.FAILED, StateType.CRASHED],
    RunStatus.FAILED: [StateType.FAILED, StateType.CRASHED],
}
# Under way: started and not ended, or due to start. Read through _filters (under_way), which never counts a run that
# a schedule holds for later.
ACTIVE = [RunStatus.PENDING, RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING, RunStatus.TERMINATING]


@dataclass
class FineTuningEvent:
    type: str
    time: datetime
    message: str
    payload: dict = field(default_factory=dict, repr=False)


@dataclass
class TrainingRun:
    name: str
    status: RunStatus
    created_by: str
    model: str
    train_data_path: str
    register_to: str
    task_type: str
    experiment_path: str
    eval_data_path: str | None
    eval_prompts: list[str] | None
    custom_weights_path: str | None
    training_duration: str
    learning_rate: float
    context_length: int | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    estimated_end_time: datetime | None
    experiment_id: str | None
    run_id: str | None
    details: str | None
    flow_run_id: str
    config: RunConfig | None = field(default=None, repr=False)  # the whole configuration (None: unreadable)

    def refresh(self) -> "TrainingRun":
        fresh = get(self)
        self.__dict__.update(fresh.__dict__)
        return self

    def cancel(self) -> int:
        return cancel(self)

    def get_events(self, follow: bool = False):
        return get_events(self, follow=follow)


def create(
    model: str | None = None,
    train_data_path: str | None = None,
    register_to: str | None = None,
    *,
    experiment_path: str | None = None,
    task_type: str | None = None,
    eval_data_path: str | None = None,
    eval_prompts: list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | None = None,
    context_length: int | None = None,
    validate_inputs: bool = True,
    data_prep_cluster_id: str | None = None,
    allow_percentage_invalid_samples: float | None = None,
    recipe: "str | os.PathLike | dict | RunConfig | None" = None,
    overrides: "dict[str, Any] | None" = None,
) -> TrainingRun:
    """Submit a fine-tuning run and return at once; it goes on after this process exits.

    `recipe` (a YAML file, a dict or a RunConfig, laid out like Nova's SFT recipes: tasks/config.py) sets any
    setting; `overrides` sets settings by their path (`{"training_config.trainer.max_steps": 40}`); the anchor's
    arguments set theirs. Arguments and overrides win over the recipe. The config is checked here, before any run
    exists: an error names the setting as it was given."""
    if data_prep_cluster_id is not None:
        warnings.warn("data_prep_cluster_id is ignored: Tessera prepares data inside the run, no cluster needed",
                      stacklevel=2)
    arguments = locals()
    given = {k: arguments[k] for k in SHORTHANDS if arguments[k] is not None}
    config = configure(recipe, shorthands=given, overrides=overrides)
    if config.training_config.deepspeed.nodes > 1 and services.embedded():
        raise InvalidInputError(
            f"training_config.deepspeed.nodes {config.training_config.deepspeed.nodes}: the embedded default trains "
            "on this machine only; a run over several needs the shared server and a worker on each machine (README "
            "'When one machine is not enough')")
    if validate_inputs:
        config = check_paths(config)
    name = run_name_for(config.run.model_name_or_path, config.run.task_type)
    with services.connected(), _create_lock():  # count and submit as one step: racing creates cannot pass the limit
        with prefect_client() as prefect:
            active = sum(prefect.count_flow_runs(flow_run_filter=f) for f in _filters(statuses=ACTIVE))
        if active >= services.max_active_runs():
            raise TooManyActiveRunsError(
                f"{active} runs are active, the limit is {services.max_active_runs()}: cancel one "
                "(fm.cancel(name)) or wait for one to finish, then create again"
            )
        experiment_id, mlflow_run_id = start_run(config.params(), name,
                                                 experiment_for(config, name, current_user()), current_user())
        with failed_unless_started(mlflow_run_id):
            # The arguments beside the config they are in: the run names a setting as it was given.
            flow_run = submit(config, name, mlflow_run_id, run_tags(current_user(), experiment_id), given)
    return _training_run(flow_run, include_details=False)


@contextmanager
def failed_unless_started(mlflow_run_id: str) -> Iterator[None]:
    """No MLflow run without its flow run: the MLflow run of a run, sweep or retraining whose flow run could not be
    started (the Prefect server refused the client, or was down) ends FAILED instead of showing RUNNING for good."""
    try:
        yield
    except Exception:
        mlflow_client().set_terminated(mlflow_run_id, "FAILED")
        raise


@contextmanager
def _create_lock() -> Iterator[None]:
    """Hold the server's one CREATE_LOCK slot (waiting for it, at most a minute): for every client on any machine.

    Prefect raises ConcurrencySlotAcquisitionError whatever went wrong; only one without a cause is the limit
    missing. Otherwise its cause is raised: the server's refusal (a 401 or 403, which connected() says is one, and
    what to set), another answer, or no answer at all."""
    try:
        with concurrency(services.CREATE_LOCK, strict=True, lease_duration=60, timeout_seconds=60):
            yield
    except ConcurrencySlotAcquisitionError as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise ServiceError(f"the Prefect server at {services.prefect_api_url()} has no concurrency limit "
                           f"{services.CREATE_LOCK}: register Tessera's deployments there "
                           "(python -m deployments.deploy --pool <pool>), which creates it") from None


def submit(config: RunConfig, name: str, mlflow_run_id: str, tags: "builtins.list[str]", given: dict | None = None,
           register: bool = True, as_subflow: bool = False):
    """Start a flow run of the finetune deployment, its MLflow run made by the caller; returns the flow run.

    `given`: the arguments the config was made with; `register=False` leaves registration to the caller (a sweep,
    which registers only its best trial); `as_subflow`: from inside a flow, shown as its subflow."""
    parameters = {"config": config.to_recipe(), **(given or {}), "run_name": name, "mlflow_run_id": mlflow_run_id}
    with prefect_client() as prefect:  # on a work pool: the queue of the workers whose machines it fits
        pooled = prefect.read_deployment_by_name(services.DEPLOYMENT).work_pool_name is not None
    queue = queue_for(config.training_config.deepspeed.processes) if pooled else None
    flow_run = run_deployment(services.DEPLOYMENT, parameters=parameters | ({} if register else {"register": False}),
                              flow_run_name=name, timeout=0, as_subflow=as_subflow, tags=tags, work_queue_name=queue)
    emit(name, RunEvent.CREATED, f"run {name} created", flow_run_id=str(flow_run.id))
    flush()
    return flow_run


def get(training_run: "str | TrainingRun") -> TrainingRun:
    """The run by name, with its current status."""
    with services.connected():
        return _training_run(_flow_run(training_run), include_details=True)


def list(
    training_runs: "builtins.list[str | TrainingRun] | None" = None,
    experiment_id: str | None = None,
    *,
    statuses: "builtins.list[str | RunStatus] | None" = None,
    user_emails: "builtins.list[str] | None" = None,
    before: "str | datetime | None" = None,
    after: "str | datetime | None" = None,
    include_details: bool = True,
    limit: int = 100,
) -> "builtins.list[TrainingRun]":
    """Runs, newest first, filtered as the anchor's list() filters them."""
    names = [r.name if isinstance(r, TrainingRun) else r for r in training_runs] if training_runs else None
    wanted = [_status(s) for s in statuses] if statuses else None
    tags = [RUN_TAG] + ([f"experiment:{experiment_id}"] if experiment_id else [])
    with services.connected(), prefect_client() as prefect:
        runs = []
        for email in user_emails or [None]:
            run_filters = _filters(names, wanted, tags + ([f"created_by:{email}"] if email else []),
                                   _parse_time(before, "before"), _parse_time(after, "after"))
            runs += _read_flow_runs(prefect, run_filters, limit)
        result = [_training_run(r, include_details) for r in runs]
    result = [r for r in result if wanted is None or r.status in wanted]
    return sorted(result, key=lambda r: r.created_at, reverse=True)[:limit]


def cancel(runs: "str | TrainingRun | builtins.list[str | TrainingRun] | None" = None,
           experiment_id: str | None = None) -> int:
    """Stop runs (by name, run or list; or every run of an experiment); returns how many were cancelled."""
    if (runs is None) == (experiment_id is None):
        raise InvalidInputError("cancel() takes exactly one of runs= or experiment_id=")
    with services.connected():
        if runs is not None:
            targets = [_flow_run(r) for r in (runs if isinstance(runs, builtins.list) else [runs])]
        else:
            with prefect_client() as prefect:
                targets = under_way(prefect, [RUN_TAG, f"experiment:{experiment_id}"])
        with prefect_client() as prefect:
            cancelled = sum(stop_flow_run(prefect, flow_run, "run") for flow_run in targets)
        flush()
        return cancelled


def stop_flow_run(prefect, flow_run, what: str) -> bool:
    """Cancel a run's, sweep's or retraining's flow run (cancel_flow_run); False when it has ended or is ending
    already. One that had not started gets its CANCELED event here: its flow never runs its hooks. The caller
    flushes the events."""
    was = cancel_flow_run(prefect, flow_run, "cancelled by the user")
    if was in (StateType.SCHEDULED, StateType.PENDING):
        emit(flow_run.name, RunEvent.CANCELED, f"{what} cancelled before it started", flow_run_id=str(flow_run.id))
    return was is not None


def get_events(training_run: "str | TrainingRun", follow: bool = False):
    """The run's events, oldest first; with follow=True an iterator that ends at a terminal event."""
    name = training_run.name if isinstance(training_run, TrainingRun) else training_run
    if not follow:
        with services.connected():
            return settled_events(name, _flow_run(name))
    return _follow(name, _flow_run)


def get_checkpoints(training_run: "str | TrainingRun") -> "builtins.list[str]":
    """The run's `ep*-ba*` checkpoints as full URIs: in the MLflow artifact store once uploaded, else local."""
    run = get(training_run) if not isinstance(training_run, TrainingRun) else training_run
    record = RunRecord.load(run.name)
    if run.run_id:
        with services.connected():  # a shared MLflow server's refusal, said as one
            store = mlflow_client()
            uploaded = [a for a in store.list_artifacts(run.run_id, artifact_dir(run.name)) if a.is_dir]
            if uploaded:
                base = store.get_run(run.run_id).info.artifact_uri.rstrip("/")
                return sorted(f"{base}/{a.path}" for a in uploaded if a.path.split("/")[-1].startswith("ep"))
    if record is None:
        return []
    return [p.as_uri() for p in complete_checkpoints(record.checkpoints)]


def get_models() -> "builtins.list[ModelInfo]":
    """The catalog: name, display name, max context length, and whether the weights are on this machine."""
    return _catalog()


# --- reading runs back from Prefect -------------------------------------------------------------


def _filters(names=None, statuses=None, tags=None, before=None, after=None) -> "builtins.list[FlowRunFilter]":
    """Prefect filters whose matches together are the flow runs asked for (`statuses` None: any status), never one
    that a schedule holds for later. Prefect's scheduler makes a scheduled deployment's coming runs ahead of time,
    SCHEDULED with their start time in the future (DESIGN.md 6): such a run is neither under way nor holding a slot,
    and until it starts it is the schedule's, not a run, sweep or retraining of anyone's. A SCHEDULED run whose start
    time has come (just submitted, late, or waiting for a concurrency slot or a retry) is about to start, so it is
    asked for: by a filter of its own, as Prefect's filters AND their parts. Clocks are taken to agree, as Prefect's
    scheduling takes them."""
    wanted = {t for s in statuses for t in _STATE_TYPES[s]} if statuses else set(StateType)
    now = datetime.now(timezone.utc)
    parts = [(wanted - {StateType.SCHEDULED}, before)]
    if StateType.SCHEDULED in wanted:
        parts.append(({StateType.SCHEDULED}, min(before, now) if before else now))
    return [FlowRunFilter(
        name=FlowRunFilterName(any_=names) if names else None,
        tags=FlowRunFilterTags(all_=tags or [RUN_TAG]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(types))),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=by, after_=after) if by or after else None,
    ) for types, by in parts if types]


def under_way(prefect, tags: "builtins.list[str]", limit: int = 10_000) -> builtins.list:
    """The flow runs with all `tags` that are under way (ACTIVE): a run's slot, a sweep's running trials, a
    retraining still going; never a run a schedule holds for later."""
    return _read_flow_runs(prefect, _filters(statuses=ACTIVE, tags=tags), limit)


def _read_flow_runs(prefect, run_filters: "builtins.list[FlowRunFilter]", limit: int) -> builtins.list:
    """Up to `limit` flow runs that match any of `run_filters`, newest first, in the server's pages of at most 200."""
    runs: builtins.list = []
    for run_filter in run_filters:
        matched: builtins.list = []
        while len(matched) < limit:
            page = prefect.read_flow_runs(flow_run_filter=run_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                          limit=min(PAGE, limit - len(matched)), offset=len(matched))
            matched += page
            if len(page) < PAGE:
                break
        runs += matched
    return sorted(runs, key=lambda r: r.expected_start_time or r.created, reverse=True)[:limit]


def _flow_run(training_run: "str | TrainingRun"):
    return newest_flow_run(training_run.name if isinstance(training_run, TrainingRun) else training_run)


def newest_flow_run(name: str, tag: str = RUN_TAG, what: str = "run", listing: str = "fm.list()"):
    """The newest flow run named `name` with `tag`: a run's, or a sweep's or retraining's (one per attempt). Asked for
    by name, a run is found whatever its state or start time."""
    with prefect_client() as prefect:
        found = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]),
                                                                     tags=FlowRunFilterTags(all_=[tag])),
                                       sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    if not found:
        raise not_found(name, what, listing)
    return found[0]


def not_found(name: str, what: str = "run", listing: str = "fm.list()") -> RunNotFoundError:
    """The error for a name with no run behind it: also what `tessera serve` says of another user's run."""
    return RunNotFoundError(f"no {what} named {name!r} on {services.prefect_api_url()}: see {listing} for names")


def _training_run(flow_run, include_details: bool) -> TrainingRun:
    p = flow_run.parameters
    status = RunStatus.of(flow_run)
    record = RunRecord.load(flow_run.name)
    try:  # create() passes the config; `prefect deployment run` may pass the anchor's arguments instead
        config = configure(p.get("config"), shorthands={k: p.get(k) for k in SHORTHANDS})
    except InvalidInputError:  # refused by the run itself, which says why in its FAILED state
        config = None
    run = config.run if config else None
    run_id = p.get("mlflow_run_id") or (record.mlflow_run_id if record else None)
    experiment_id = tag_value(flow_run.tags, "experiment") or (record.experiment_id if record else None)
    created_by = tag_value(flow_run.tags, "created_by") or "prefect"
    details = flow_run.state.message if flow_run.state and status == RunStatus.FAILED else None
    return TrainingRun(
        name=flow_run.name, status=status, created_by=created_by,
        model=run.model_name_or_path if run else p.get("model"),
        train_data_path=run.train_data_path if run else p.get("train_data_path"),
        register_to=run.register_to if run else p.get("register_to"),
        task_type=run.task_type.value if run else p.get("task_type"),
        experiment_path=experiment_for(config, flow_run.name, created_by) if config else "",
        eval_data_path=run.eval_data_path if run else None, eval_prompts=run.eval_prompts if run else None,
        custom_weights_path=run.custom_weights_path if run else None,
        training_duration=str(config.duration) if config else p.get("training_duration"),
        learning_rate=config.training_config.model.optim.lr if config else p.get("learning_rate"),
        context_length=config.training_config.max_length if config else p.get("context_length"),
        created_at=flow_run.created, started_at=flow_run.start_time,
        completed_at=flow_run.end_time if status.is_terminal() else None,
        estimated_end_time=_estimated_end(flow_run.name) if include_details and status == RunStatus.RUNNING else None,
        experiment_id=experiment_id, run_id=run_id, details=details, flow_run_id=str(flow_run.id), config=config,
    )


def _estimated_end(name: str) -> datetime | None:
    updates = [e for e in _read_events(name) if e.type == RunEvent.TRAIN_UPDATED and "elapsed_s" in e.payload]
    left = seconds_left(updates[-1].payload) if updates else None
    return None if left is None else updates[-1].time + timedelta(seconds=left)


def _read_events(name: str) -> "builtins.list[FineTuningEvent]":
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
                FineTuningEvent(e.payload.get("type", e.event), e.occurred, e.payload.get("message", ""), e.payload))
        if not page.next_page:
            break
        page = prefect.read_events_page(page.next_page)
    return {name: sorted(found, key=lambda e: e.time) for name, found in events.items()}


def events_of(runs: "builtins.list[TrainingRun]") -> "builtins.list[builtins.list[FineTuningEvent]]":
    """Each run's events as get_events() gives them, read together: one query for all, and a wait only for a run
    whose events may still be on their way. A page of a listing costs a few queries, not a few per run."""
    if not runs:
        return []
    with services.connected(), prefect_client() as prefect:
        ids = FlowRunFilterId(any_=[UUID(r.flow_run_id) for r in runs])
        flow_runs = {str(f.id): f for f in prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=ids))}
        read = _read_events_of(prefect, [r.name for r in runs])
    return [settled_events(r.name, flow_runs[r.flow_run_id], read[r.name]) for r in runs]


def settled_events(name: str, flow_run, events: "builtins.list[FineTuningEvent] | None" = None
                   ) -> "builtins.list[FineTuningEvent]":
    """The events of the run (sweep, retraining) whose flow run this is, oldest first: from its CREATED event on for
    a run create() made, and once it has ended, through its terminal event, so that what the status says and what
    the events say agree. A terminal event that never comes (its process was killed) is written from the flow run's
    final state, once: every reader sends the same event id, and the server keeps the first. Only an event sent in
    the last EVENTS_SETTLE_S can still be on its way: a run that ended before that is read without waiting.
    `events`: the run's events as just read, if they were."""
    events = _read_events(name) if events is None else events
    # A run create() submitted has its CREATED event, sent before create() returned and stored a moment later.
    deadline = _settled_by(flow_run.created)
    while not events and flow_run.parameters.get("run_name") and time.monotonic() < deadline:
        time.sleep(0.25)
        events = _read_events(name)
    status = RunStatus.of(flow_run)
    if not status.is_terminal():
        return events
    written, deadline = False, _settled_by(flow_run.end_time)
    while not any(_ends(e, flow_run) for e in events):
        if time.monotonic() > deadline:
            if written:
                break
            ending = {RunStatus.COMPLETED: RunEvent.COMPLETED, RunStatus.STOPPED: RunEvent.CANCELED}
            emit(name, ending.get(status, RunEvent.FAILED), (flow_run.state.message or status.value.lower()),
                 flow_run_id=str(flow_run.id), occurred=flow_run.end_time, from_state=True)
            flush()
            written, deadline = True, time.monotonic() + EVENTS_SETTLE_S
        time.sleep(0.25)
        events = _read_events(name)
    return events


def _settled_by(sent: datetime | None) -> float:
    """The monotonic time by which every event sent up to `sent` (None: now) is stored and readable."""
    ago = (datetime.now(timezone.utc) - sent).total_seconds() if sent else 0.0
    return time.monotonic() + max(0.0, EVENTS_SETTLE_S - ago)


def _ends(event: FineTuningEvent, flow_run) -> bool:
    """Whether the event ends this flow run: a terminal event since it was created. A sweep resumed after a crash
    is a new flow run under the same name, and the old attempt's FAILED is history, not its end."""
    return RunEvent(event.type).is_terminal and event.time >= flow_run.created


def _follow(name: str, flow_run_of) -> Iterator[FineTuningEvent]:
    """The events of a run (sweep, retraining; `flow_run_of` finds its flow run by name) as they come, to the
    terminal one."""
    seen: set[tuple] = set()
    with services.connected():
        while True:
            flow_run = flow_run_of(name)  # read first: if it has ended, the events read next are all there
            ended = RunStatus.of(flow_run).is_terminal()
            for event in settled_events(name, flow_run) if ended else _read_events(name):
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


def _status(value: "str | RunStatus") -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        raise InvalidInputError(f"status {value!r} is unknown: use one of {', '.join(RunStatus)}") from None


def _parse_time(value: "str | datetime | None", field_name: str) -> datetime | None:
    """A datetime, or the anchor's strings: %Y-%m-%d or %m-%d-%Y, optionally with %H:%M:%S."""
    if value is None or isinstance(value, datetime):
        return value.astimezone(timezone.utc) if isinstance(value, datetime) and value.tzinfo else (
            value.replace(tzinfo=timezone.utc) if value else None)
    for fmt in ("%Y-%m-%d", "%m-%d-%Y", "%Y-%m-%d %H:%M:%S", "%m-%d-%Y %H:%M:%S"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise InvalidInputError(
        f"{field_name}={value!r} is not a date: use a datetime or 'YYYY-MM-DD' / 'MM-DD-YYYY', "
        "optionally followed by ' HH:MM:SS'"
    )
