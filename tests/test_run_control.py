"""Stopping, limiting and recovering runs through the real services: cancel, the active-run limit, a terminal event
nobody sent, a killed worker."""

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import wait_for, worker_pids

from tasks.errors import TooManyActiveRunsError
from tasks.run_record import RUN_TAG

pytestmark = pytest.mark.e2e


def test_cancel_stops_the_run_and_its_worker_but_keeps_its_files(fm, tiny_model_dir, chat_file):
    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="100000ba", context_length=64)
    assert fm.get_events(run)[0].type == "CREATED"  # read at once: what create() sent is there
    for event in fm.get_events(run, follow=True):
        if event.type == "TRAIN_UPDATED":
            break
    assert worker_pids(run.name), "the worker should be running"
    assert fm.cancel(run) == 1
    cancelled_at = time.monotonic()
    run = wait_for(run, {fm.RunStatus.STOPPED}, timeout=30)
    events = fm.get_events(run)  # read at once: a run that has ended has its terminal event, and all before it
    assert events[-1].type == "CANCELED" and "TRAIN_UPDATED" in [e.type for e in events], events
    while worker_pids(run.name) and time.monotonic() - cancelled_at < 30:
        time.sleep(0.5)
    assert not worker_pids(run.name), "no training process may outlive a cancel by 30 s"
    run_dir = Path(os.environ["TESSERA_HOME"]) / "runs" / run.name
    assert (run_dir / "logs" / "worker.log").stat().st_size > 0
    assert fm.cancel(run) == 0  # already stopped


def test_a_run_cancelled_while_its_process_starts_stays_cancelled(fm, tiny_model_dir, chat_file):
    """Cancelled while the runner is starting its process (Pending): TERMINATING until the flow, started, ends
    itself; STOPPED from then on, never RUNNING again, and nothing trained."""
    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="100000ba", context_length=64)
    while (run := run.refresh()).status != fm.RunStatus.STARTING:
        assert run.status in (fm.RunStatus.PENDING, fm.RunStatus.QUEUED), run.status
        time.sleep(0.1)
    assert fm.cancel(run) == 1 and run.refresh().status == fm.RunStatus.TERMINATING
    seen, stopped_at, deadline = [run.status], None, time.monotonic() + 60
    while stopped_at is None or time.monotonic() - stopped_at < 10:  # and 10 s after it stopped
        assert time.monotonic() < deadline, seen
        if (status := run.refresh().status) != seen[-1]:
            seen.append(status)
        if status == fm.RunStatus.STOPPED and stopped_at is None:
            stopped_at = time.monotonic()
        time.sleep(0.2)
    assert seen == [fm.RunStatus.TERMINATING, fm.RunStatus.STOPPED], seen
    events = [e.type for e in fm.get_events(run)]
    assert events[-1] == "CANCELED" and "TRAIN_UPDATED" not in events, events
    assert not worker_pids(run.name)


def test_an_ended_run_whose_process_never_said_so_gets_its_terminal_event_once(fm):
    """A run that ended with nobody left to send its terminal event (its process killed with the runner): the first
    read writes it from the flow run's final state; every later read sees that one event."""
    from prefect import get_client
    from prefect.states import Crashed, Scheduled

    from deployments import services

    name = f"ift-orphan-{uuid.uuid4().hex[:6]}"
    with services.connected(), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("finetune/default")
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)  # the runner must not start it
        flow_run = prefect.create_flow_run_from_deployment(deployment.id, name=name, tags=[RUN_TAG],
                                                           state=Scheduled(scheduled_time=tomorrow))
        prefect.set_flow_run_state(flow_run.id, Crashed(message="the runner was killed"), force=True)
    assert fm.get(name).status == fm.RunStatus.FAILED
    (ended,) = fm.get_events(name)
    assert (ended.type, ended.message, ended.payload["from_state"]) == ("FAILED", "the runner was killed", True)
    assert [e.type for e in fm.get_events(name)] == ["FAILED"]  # written once, whoever reads


def test_a_run_that_ended_a_while_ago_is_read_without_waiting_for_its_events(fm, monkeypatch):
    """Only a run that has just ended may have events still on their way: one that ended longer ago than that gets
    its terminal event written at once. A listing of many such runs (the Databricks SDK's list() waits 10 s for the
    answer) must not wait on each."""
    from prefect import get_client
    from prefect.states import Crashed, Scheduled

    from client import jobs
    from deployments import services

    monkeypatch.setattr(jobs, "EVENTS_SETTLE_S", 8.0)
    name = f"ift-old-{uuid.uuid4().hex[:6]}"
    with services.connected(), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("finetune/default")
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
        flow_run = prefect.create_flow_run_from_deployment(deployment.id, name=name, tags=[RUN_TAG],
                                                           state=Scheduled(scheduled_time=tomorrow))
        prefect.set_flow_run_state(flow_run.id, Crashed(message="the runner was killed"), force=True)
    time.sleep(jobs.EVENTS_SETTLE_S)
    started = time.monotonic()
    (event,) = fm.get_events(name)
    # Waiting for events still on their way would take EVENTS_SETTLE_S before the event is even written.
    assert event.type == "FAILED" and time.monotonic() - started < jobs.EVENTS_SETTLE_S - 2, time.monotonic() - started


def test_the_active_run_limit_holds_when_creates_race(fm, tiny_model_dir, chat_file, monkeypatch):
    from prefect import get_client
    from prefect.states import Scheduled

    from deployments import services

    active = len(fm.list(statuses=[s for s in fm.ACTIVE], include_details=False))
    monkeypatch.setenv("TESSERA_MAX_ACTIVE_RUNS", str(active + 3))
    # A run of the finetune deployment that a schedule holds for tomorrow: no run yet, so it holds no slot.
    with services.connected(), get_client(sync_client=True) as prefect:
        later = prefect.create_flow_run_from_deployment(
            prefect.read_deployment_by_name("finetune/default").id, tags=[RUN_TAG],
            state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=1)))
    assert len(fm.list(statuses=[s for s in fm.ACTIVE], include_details=False)) == active
    assert later.name not in [r.name for r in fm.list(include_details=False)]
    results: list = []

    def submit():
        try:
            results.append(fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                                     training_duration="100000ba", context_length=64))
        except Exception as e:  # each create's outcome is asserted: a refusal, or what went wrong
            results.append(e)

    # The machine's device slots are held, as by runs training on it already: the runs created wait for a slot,
    # active, instead of three training at once on 2 cores and starving the creates still racing of CPU.
    with _device_slots_held():
        threads = [threading.Thread(target=submit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        created = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, TooManyActiveRunsError)]
        try:
            assert (len(created), len(refused)) == (3, 3), results
            assert "cancel one" in str(refused[0])
        finally:  # a failure leaves no run training under the tests after it
            assert fm.cancel(created) == len(created)
        for run in created:
            wait_for(run, {fm.RunStatus.STOPPED}, timeout=120)
    with services.connected(), get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(later.id).state.is_scheduled()  # neither started nor stopped by any of it
        prefect.delete_flow_run(later.id)


@contextmanager
def _device_slots_held() -> Iterator[None]:
    """Every slot of the session server's device limit, taken as runs training take theirs (once no run holds one)."""
    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments import services
    from tasks.devices import DEVICE_SLOTS

    with services.connected(), get_client(sync_client=True) as prefect:
        slots = prefect.read_global_concurrency_limit_by_name(DEVICE_SLOTS).limit
        deadline = time.monotonic() + 60
        while True:
            try:
                lease = prefect.increment_concurrency_slots_with_lease(
                    [DEVICE_SLOTS], slots, "concurrency", lease_duration=600).json()["lease_id"]
                break
            except PrefectHTTPStatusError as e:  # 423: an earlier test's run has not let its slot go yet
                if e.response.status_code != 423 or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        try:
            yield
        finally:
            prefect.release_concurrency_slots_with_lease(lease)


@pytest.mark.slow
def test_a_killed_worker_is_resumed_by_the_train_tasks_retry(fm, tiny_model_dir, chat_file):
    """Two processes through the deepspeed launcher, SIGKILLed after a checkpoint: the retry resumes and completes."""
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file, "register_to": "main.test"},
        "training_config": {"max_length": 64, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 10,
                            "save_top_k": 2, "trainer": {"max_steps": 30}, "deepspeed": {"processes": 2}},
    }
    run = fm.create(recipe=recipe, learning_rate=1e-3)
    checkpoints = Path(os.environ["TESSERA_HOME"]) / "runs" / run.name / "checkpoints"
    deadline, polls = time.monotonic() + 240, 0
    while not (checkpoints / "latest-sharded-rank0.symlink").is_symlink():
        assert time.monotonic() < deadline, "no checkpoint in 240 s"
        polls += 1
        assert polls % 40 or not run.refresh().status.is_terminal(), run.details  # every 2 s: did it end?
        time.sleep(0.05)
    os.killpg(int((checkpoints.parent / "worker.pgid").read_text()), signal.SIGKILL)  # the launcher and both ranks
    resumed_from = os.readlink(checkpoints / "latest-sharded-rank0.symlink")

    events = list(fm.get_events(run, follow=True))
    assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
    assert f"resumed from {resumed_from}" in [e.message for e in events if e.type == "TRAIN_UPDATED"]
    assert next(e for e in events if e.type == "TRAIN_FINISHED").message == "training finished after 30 batches"
    log = (checkpoints.parent / "logs" / "worker.log").read_text()
    assert log.count("2 process(es) on cpu") == 2  # the first attempt and the retry, both on two ranks
    kept = fm.get_checkpoints(run)
    assert len(kept) == 2 and kept[-1].endswith("-ba30"), kept  # save_top_k held across the retry


def test_a_runs_flow_is_forked_warm_and_ends_with_the_process_the_worker_started(fm, tiny_model_dir, chat_file):
    """The worker starts a launcher, which has Prefect's engine forked from the warm-start server: when the launcher
    is killed outright (as the worker kills a process that ignores a cancel), the flow ends itself and its training,
    and Prefect records the run as crashed (FAILED)."""
    from deployments import services

    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="100000ba", context_length=64)
    for event in fm.get_events(run, follow=True):
        if event.type == "TRAIN_UPDATED":
            break
    processes = _processes()
    (launcher,) = [pid for pid, (_, cmdline, environ) in processes.items() if "tasks.flow_launcher" in cmdline
                   and f"PREFECT__FLOW_RUN_ID={run.flow_run_id}" in environ]
    (warm,) = [pid for pid, (ppid, cmdline, _) in processes.items()
               if ppid == services.WORKER.pid() and "tasks.warm_start --socket" in cmdline]
    (engine,) = [pid for pid, (ppid, cmdline, _) in processes.items()
                 if ppid == warm and f"-m prefect.engine {run.flow_run_id}" in cmdline]
    assert processes[launcher][0] == services.WORKER.pid() and worker_pids(run.name)
    os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (engine in _processes() or worker_pids(run.name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine not in _processes() and not worker_pids(run.name), "the flow or its training outlived the launcher"
    assert wait_for(run, timeout=60).status == fm.RunStatus.FAILED


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, environment) of every process this user may read."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmdline, environ = ((proc / f).read_bytes().replace(b"\0", b" ").decode(errors="replace")
                                for f in ("cmdline", "environ"))
        except OSError:
            continue
        found[int(proc.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), cmdline, environ)
    return found
