"""Which flow runs are under way, and which a listing shows, as jobs.py asks Prefect for them (no server here): never
a run that a schedule holds for later, SCHEDULED with its start time in the future (DESIGN.md 6), and always a run
that changes state while it is read. test_retraining.py proves it on the real services, under a live schedule."""

import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from prefect.client.schemas.objects import StateType

from tasks.flow_runs import (
    ACTIVE,
    RunStatus,
    flow_run_filter,
    read_flow_runs,
    under_way,
)

NOW = datetime.now(timezone.utc)


def test_a_filter_asks_for_the_states_of_the_statuses_and_the_times_given():
    under = flow_run_filter(statuses=ACTIVE, tags=["model:m"])
    assert set(under.state.type.any_) == {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING,
                                          StateType.CANCELLING, StateType.PAUSED}
    assert under.tags.all_ == ["model:m"] and under.expected_start_time is None
    assert set(flow_run_filter().state.type.any_) == set(StateType)
    assert flow_run_filter(statuses=[RunStatus.QUEUED]).state.type.any_ == [StateType.SCHEDULED]
    assert flow_run_filter(statuses=[RunStatus.COMPLETED]).state.type.any_ == [StateType.COMPLETED]
    week_ago, tomorrow = NOW - timedelta(days=7), NOW + timedelta(days=1)
    bounded = flow_run_filter(before=tomorrow, after=week_ago)
    assert (bounded.expected_start_time.before_, bounded.expected_start_time.after_) == (tomorrow, week_ago)


class Prefect:
    """A Prefect client's read_flow_runs over `runs` (newest first), answering a filter's state types and expected
    start times as the server does, in pages; `moves` changes the runs' states after each read."""

    def __init__(self, runs: list, moves=lambda runs, reads: None):
        self.runs, self.moves, self.reads = runs, moves, 0

    def read_flow_runs(self, flow_run_filter, sort, limit, offset):
        types, times = flow_run_filter.state.type.any_, flow_run_filter.expected_start_time
        found = [r for r in self.runs if r.state_type in types
                 and (times is None or times.before_ is None or r.expected_start_time <= times.before_)]
        self.reads += 1
        self.moves(self.runs, self.reads)
        return found[offset:offset + limit]


def _run(name: str, hours: float, state: StateType = StateType.RUNNING) -> SimpleNamespace:
    return SimpleNamespace(id=uuid.uuid4(), name=name, state_type=state, expected_start_time=NOW + timedelta(hours=hours))


def test_what_a_schedule_holds_for_later_is_left_out_and_a_run_due_is_under_way():
    runs = [_run("tomorrows", 24, StateType.SCHEDULED), _run("late", -0.01, StateType.SCHEDULED),
            _run("training", -1), _run("ended", -2, StateType.COMPLETED)]
    prefect = Prefect(runs)
    assert [r.name for r in under_way(prefect, ["t"])] == ["late", "training"]
    assert [r.name for r in read_flow_runs(prefect, flow_run_filter(), limit=100)] == ["late", "training", "ended"]
    assert [r.name for r in read_flow_runs(prefect, flow_run_filter(), limit=2)] == ["late", "training"]


def test_a_run_that_starts_while_it_is_read_is_found():
    """A run just created leaves SCHEDULED the moment the worker takes it: whatever the moment, it is listed."""
    def starts(runs, reads):
        runs[0].state_type = StateType.PENDING

    prefect = Prefect([_run("just-created", -0.001, StateType.SCHEDULED)], moves=starts)
    assert [r.name for r in read_flow_runs(prefect, flow_run_filter(), limit=100)] == ["just-created"]
    assert prefect.reads == 1


def test_runs_are_read_in_the_servers_pages_and_a_run_created_meanwhile_is_not_read_twice(monkeypatch):
    from tasks import flow_runs

    monkeypatch.setattr(flow_runs, "PAGE", 2)
    older = [_run(f"h{h}", -h) for h in range(1, 6)]
    held = [_run("next-week", 24 * 7, StateType.SCHEDULED)]

    def created(runs, reads):
        if reads == 1:  # the next page starts one later: its first run is the last of this one
            runs.insert(1, _run("new", -0.5))

    prefect = Prefect(held + older, moves=created)
    assert [r.name for r in under_way(prefect, ["t"])] == ["h1", "h2", "h3", "h4", "h5"]
    assert prefect.reads == 4  # pages of 2: next-week and h1, h1 again and h2, h3 and h4, h5
