"""Which flow runs are under way, and which a listing shows, as jobs.py asks Prefect for them (no server here): never
a run that a schedule holds for later, SCHEDULED with its start time in the future (DESIGN.md 6). test_retraining.py
proves it on the real services, under a live schedule."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from prefect.client.schemas.objects import StateType

from tasks.flow_runs import (
    ACTIVE,
    RunStatus,
    flow_run_filters,
    read_flow_runs,
    under_way,
)

STARTED = {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED}


def test_a_scheduled_run_is_under_way_once_its_start_time_has_come():
    before = datetime.now(timezone.utc)
    started, scheduled = flow_run_filters(statuses=ACTIVE, tags=["model:m"])
    after = datetime.now(timezone.utc)
    assert set(started.state.type.any_) == STARTED and started.expected_start_time is None
    assert scheduled.state.type.any_ == [StateType.SCHEDULED]  # just submitted, late, or waiting for a slot
    assert before <= scheduled.expected_start_time.before_ <= after and scheduled.expected_start_time.after_ is None
    assert started.tags.all_ == scheduled.tags.all_ == ["model:m"]


def test_a_listing_leaves_out_what_a_schedule_holds_for_later_whatever_the_status_asked():
    now = datetime.now(timezone.utc)
    every, scheduled = flow_run_filters()
    assert set(every.state.type.any_) == set(StateType) - {StateType.SCHEDULED}
    assert scheduled.state.type.any_ == [StateType.SCHEDULED] and scheduled.expected_start_time.before_ >= now
    pending_filters = flow_run_filters(statuses=[RunStatus.PENDING])
    (pending,) = [f for f in pending_filters if f.state.type.any_ == [StateType.SCHEDULED]]
    assert now <= pending.expected_start_time.before_ <= datetime.now(timezone.utc)
    # Waiting for a concurrency slot: SCHEDULED, its time come.
    (queued,) = flow_run_filters(statuses=[RunStatus.QUEUED])
    assert queued.state.type.any_ == [StateType.SCHEDULED] and queued.expected_start_time.before_ >= now
    (ended,) = flow_run_filters(statuses=[RunStatus.COMPLETED])
    assert ended.state.type.any_ == [StateType.COMPLETED] and ended.expected_start_time is None


def test_before_and_after_bound_both_reads_and_now_bounds_the_scheduled_one():
    now = datetime.now(timezone.utc)
    week_ago, tomorrow = now - timedelta(days=7), now + timedelta(days=1)
    started, scheduled = flow_run_filters(before=tomorrow, after=week_ago)
    assert (started.expected_start_time.before_, started.expected_start_time.after_) == (tomorrow, week_ago)
    assert now <= scheduled.expected_start_time.before_ < tomorrow and scheduled.expected_start_time.after_ == week_ago
    yesterday = now - timedelta(days=1)
    started, scheduled = flow_run_filters(before=yesterday)
    assert started.expected_start_time.before_ == scheduled.expected_start_time.before_ == yesterday


class Prefect:
    """A Prefect client's read_flow_runs over fixed answers: `scheduled` for the filter of SCHEDULED runs, `started`
    for the other, each newest first, given in pages."""

    def __init__(self, started: list, scheduled: list):
        self.started, self.scheduled, self.reads = started, scheduled, 0

    def read_flow_runs(self, flow_run_filter, sort, limit, offset):
        self.reads += 1
        found = self.scheduled if flow_run_filter.state.type.any_ == [StateType.SCHEDULED] else self.started
        return found[offset:offset + limit]


def _runs(*hours: int) -> list:
    start = datetime(2026, 12, 6, tzinfo=timezone.utc)
    return [SimpleNamespace(name=f"h{h}", expected_start_time=start + timedelta(hours=h), created=start) for h in hours]


def test_runs_read_through_both_filters_come_newest_first_up_to_the_limit():
    prefect = Prefect(started=_runs(9, 5, 1), scheduled=_runs(7, 3))
    newest = read_flow_runs(prefect, flow_run_filters(statuses=ACTIVE), limit=3)
    assert [r.name for r in newest] == ["h9", "h7", "h5"]
    assert [r.name for r in under_way(prefect, ["t"])] == ["h9", "h7", "h5", "h3", "h1"]


def test_each_filter_is_read_in_the_servers_pages(monkeypatch):
    from tasks import flow_runs

    monkeypatch.setattr(flow_runs, "PAGE", 2)
    prefect = Prefect(started=_runs(5, 4, 3, 2, 1), scheduled=_runs(15, 14, 13))
    assert [r.name for r in under_way(prefect, ["t"])] == ["h15", "h14", "h13", "h5", "h4", "h3", "h2", "h1"]
    assert prefect.reads == 3 + 2  # pages of 2: 2, 2, 1 and 2, 1
