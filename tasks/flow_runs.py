"""Flow runs as Tessera reads them, for the flows that start runs and the client alike: a run's status (the
anchor's, read off its flow run's Prefect state), the filters that find runs by status and tag, and cancelling one."""

import builtins
from datetime import datetime, timezone
from enum import StrEnum

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from tasks.events import RunEvent, emit
from tasks.run_record import CANCELLED_TAG, RUN_TAG, cancel_flow_run

PAGE = 200  # the most flow runs the Prefect server returns in one read


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
        ends, then STOPPED however Prefect recorded the end: the worker may kill that process mid-start (Crashed)."""
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
# Under way: started and not ended, or due to start. Read through read_flow_runs (under_way), which never counts a
# run that a schedule holds for later.
ACTIVE = [RunStatus.PENDING, RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING, RunStatus.TERMINATING]


def flow_run_filter(names=None, statuses=None, tags=None, before=None, after=None) -> FlowRunFilter:
    """The Prefect filter of the flow runs asked for (`statuses` None: any status), their expected start time within
    `before` and `after`. Read it through read_flow_runs, which leaves out what a schedule holds for later."""
    wanted = {t for s in statuses for t in _STATE_TYPES[s]} if statuses else set(StateType)
    return FlowRunFilter(
        name=FlowRunFilterName(any_=names) if names else None,
        tags=FlowRunFilterTags(all_=tags or [RUN_TAG]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(wanted))),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=before, after_=after) if before or after else None,
    )


def held_for_later(flow_run, now: datetime) -> bool:
    """Whether a schedule holds the flow run for later. Prefect's scheduler makes a scheduled deployment's coming runs
    ahead of time, SCHEDULED with their start time in the future (DESIGN.md 6): such a run is neither under way nor
    holding a slot, and until it starts it is the schedule's, not a run, sweep or retraining of anyone's. A SCHEDULED
    run whose start time has come (just submitted, late, or waiting for a concurrency slot or a retry) is about to
    start. Clocks are taken to agree, as Prefect's scheduling takes them."""
    return flow_run.state_type == StateType.SCHEDULED and flow_run.expected_start_time > now


def under_way(prefect, tags: "builtins.list[str]", limit: int = 10_000) -> builtins.list:
    """The flow runs with all `tags` that are under way (ACTIVE): a run's slot, a sweep's running trials, a
    retraining still going; never a run a schedule holds for later."""
    return read_flow_runs(prefect, flow_run_filter(statuses=ACTIVE, tags=tags), limit)


def read_flow_runs(prefect, run_filter: FlowRunFilter, limit: int) -> builtins.list:
    """Up to `limit` flow runs that match `run_filter` and that no schedule holds for later, newest first, in the
    server's pages of at most 200. One filter for every state, the held runs dropped here: two reads (those started,
    those due) miss a run that leaves SCHEDULED between them, and a run just created would not be found."""
    now = datetime.now(timezone.utc)
    runs: builtins.list = []
    seen, offset = set(), 0
    while len(runs) < limit:
        asked = min(PAGE, limit - len(runs))
        page = prefect.read_flow_runs(flow_run_filter=run_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                      limit=asked, offset=offset)
        offset += len(page)
        # A run created mid-read moves the later pages down by one: their first may be one read already.
        runs += [r for r in page if r.id not in seen and not held_for_later(r, now)]
        seen.update(r.id for r in page)
        if len(page) < asked:
            break
    return runs


def stop_flow_run(prefect, flow_run, what: str) -> bool:
    """Cancel a run's, sweep's or retraining's flow run (cancel_flow_run); False when it has ended or is ending
    already. One that had not started gets its CANCELED event here: its flow never runs its hooks. The caller
    flushes the events."""
    was = cancel_flow_run(prefect, flow_run, "cancelled by the user")
    if was in (StateType.SCHEDULED, StateType.PENDING):
        emit(flow_run.name, RunEvent.CANCELED, f"{what} cancelled before it started", flow_run_id=str(flow_run.id))
    return was is not None


def newest_flow_run(prefect, name: str, tag: str):
    """The newest flow run named `name` with `tag` (a resumed sweep has one per attempt), whatever its state or start
    time; None when there is none."""
    found = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]),
                                                                 tags=FlowRunFilterTags(all_=[tag])),
                                   sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return found[0] if found else None
