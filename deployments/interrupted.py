"""Runs the services stopped under: found, their leftover processes ended, and their flow runs brought back.

The embedded default's worker is the one process that executes this home's flow runs, so when a new one is about to
start, a flow run that Prefect still shows as pending or running was interrupted: by `tessera server stop`, a reboot,
or the worker killed on its own. Before the new worker starts:

- whatever is left of the old worker's process group and of the runs' training workers is killed;
- each interrupted run is scheduled again: the worker starts it at once, its finetune flow says RESUMED, and its
  training continues from the latest checkpoint (from the start when it had none);
- a sweep or retraining, whose flow cannot pick up where it was, fails saying the services stopped under it (a
  sweep resumes with fm.resume_sweep, its trials having resumed on their own); a retraining's challenger is
  cancelled with it, as when a retraining ends early;
- a run that was being cancelled is cancelled.
"""

import os
from datetime import datetime, timezone
from pathlib import Path

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Failed, Scheduled

from flows.lifecycle import STOPPED_UNDER
from tasks.events import RunEvent, emit, flush
from tasks.home import runs_dir, tessera_home
from tasks.prefect_api import prefect_client
from tasks.process_group import kill_group
from tasks.run_record import (
    RETRAIN_TAG,
    SWEEP_TAG,
    WORKER_PGID,
    RunRecord,
    challenger_tag,
    tag_value,
)
from tasks.tracking import end_run

def kill_leftovers(worker_pid: int | None) -> None:
    """Kill the worker's process group (it and the flows it runs) and every run's training worker, which has a
    group of its own."""
    if worker_pid is not None:
        _kill_group_of_this_home(worker_pid)
    for pgid_file in runs_dir().glob(f"*/{WORKER_PGID}"):
        _kill_group_of_this_home(int(pgid_file.read_text()))
        pgid_file.unlink(missing_ok=True)


def recover(old_worker_pid: int | None) -> None:
    """End what the old worker left, then bring its flow runs back."""
    kill_leftovers(old_worker_pid)
    with prefect_client() as prefect:
        interrupted = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]))))
        challengers = {challenger_tag(r.name) for r in interrupted if RETRAIN_TAG in r.tags}
        for flow_run in interrupted:
            if flow_run.state.type == StateType.CANCELLING or challengers & set(flow_run.tags):
                _end(prefect, flow_run, Cancelled(message="cancelled by the user" if flow_run.state.type ==
                                                  StateType.CANCELLING else f"its retraining stopped: {STOPPED_UNDER}"),
                     RunEvent.CANCELED, "KILLED")
            elif SWEEP_TAG in flow_run.tags or RETRAIN_TAG in flow_run.tags:
                again = (f"fm.resume_sweep({flow_run.name!r})" if SWEEP_TAG in flow_run.tags else
                         f"`tessera retrain now {tag_value(flow_run.tags, 'model')}`")
                _end(prefect, flow_run, Failed(message=f"{STOPPED_UNDER}; run it again with {again}"),
                     RunEvent.FAILED, "FAILED")
            else:
                prefect.set_flow_run_state(flow_run.id, Scheduled(
                    scheduled_time=datetime.now(timezone.utc), message=f"{STOPPED_UNDER}: resuming"), force=True)
    flush()


def _end(prefect, flow_run, state, event: RunEvent, mlflow_status: str) -> None:
    prefect.set_flow_run_state(flow_run.id, state, force=True)
    emit(flow_run.name, event, state.message, flow_run_id=str(flow_run.id))
    if record := RunRecord.load(flow_run.name):
        end_run(record.mlflow_run_id, mlflow_status)


def _kill_group_of_this_home(pgid: int) -> None:
    """SIGKILL the process group if its processes are this home's: a pid from an old pidfile may be reused."""
    ours = f"TESSERA_HOME={tessera_home()}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if os.getpgid(int(environ.parent.name)) == pgid and ours in environ.read_bytes().split(b"\0"):
                kill_group(pgid)
                return
        except (OSError, ValueError):  # a process that ended while we looked, or one not ours to read
            continue
