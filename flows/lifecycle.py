"""What every Tessera flow does alike, so each flow holds only what differs: a run, a sweep and a retraining begin
(named, with an MLflow run and tags, CREATED when started straight from its deployment), end through the same hooks
(CANCELED or FAILED, the MLflow run ended, what the job started stopped), and start the finetune runs under them (a
sweep's trials, a retraining's challenger) the way the client starts one.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled

from tasks import routing
from tasks.config import RunConfig, run_name_for
from tasks.events import RunEvent, emit, flush
from tasks.flow_runs import newest_flow_run, stop_flow_run, under_way
from tasks.prefect_api import prefect_client
from tasks.run_record import RUN_TAG, RunRecord, current_user, run_tags
from tasks.tracking import client, end_run, start_run

# Why a run was started again (deployments/interrupted.py), as its RESUMED event says.
STOPPED_UNDER = "the services stopped under it"


@dataclass(frozen=True)
class FlowKind:
    """What tells the flows of one kind of job apart in their life cycle."""

    word: str  # what events call one: "run", "sweep", "retraining"
    prefix: str | None  # of the names one gives itself (run_name_for)
    tags: Callable[[str, str, Any], list[str]]  # its flow run's, given (user, MLflow experiment id, config)
    experiment: Callable[[Any, str, str], str]  # its MLflow experiment, given (config, name, user)
    # Stop what the job started as it ends (cancelled: True); returns what was stopped as a clause ("; ...") or "".
    stop: Callable[[RunRecord, bool], str]
    crash_hint: Callable[[str], str] = lambda name: ""  # after a crash's message: how to carry on, given its name
    children: Callable[[str], str] | None = None  # the tag of the runs one starts, given its name


def begin(kind: FlowKind, config, name: str | None, mlflow_run_id: str | None) -> RunRecord:
    """The job's record. The client names it and makes its MLflow run and tags; one started straight from its
    deployment (or a schedule) gets them here, and its CREATED event. A name with a record already (a sweep run
    again) keeps that record's MLflow run."""
    flow_run_id, user = str(current_flow_run.id), current_user()
    earlier = RunRecord.load(name) if name else None
    from_deployment = mlflow_run_id is None
    name = name or run_name_for(config.run.model_name_or_path, config.run.task_type, prefix=kind.prefix)
    if from_deployment and earlier is None:
        experiment_id, mlflow_run_id = start_run(config.params(), name, kind.experiment(config, name, user), user,
                                                 display_name=config.run.mlflow_run_name,
                                                 mirror=config.run.mlflow_tracking_uri)
    else:
        mlflow_run_id = mlflow_run_id or earlier.mlflow_run_id
        experiment_id = client().get_run(mlflow_run_id).info.experiment_id
    if from_deployment:
        with prefect_client() as prefect:
            tags = prefect.read_flow_run(flow_run_id).tags
            prefect.update_flow_run(flow_run_id, name=name,
                                    tags=sorted({*tags, *kind.tags(user, experiment_id, config)}))
        if earlier is None:
            emit(name, RunEvent.CREATED, f"{kind.word} {name} created by its deployment or schedule")
    record = RunRecord(name, flow_run_id, experiment_id, mlflow_run_id)
    record.save()
    return record


def end_hooks(kind: FlowKind) -> dict[str, list]:
    """The @flow hooks for each way a job ends early: on_cancellation, on_crashed and on_failure."""

    def ended(flow, flow_run, state) -> None:
        record = RunRecord.of_flow_run(flow_run)
        if record is None:  # it never got as far as naming itself
            return
        cancelled = state.is_cancelled() or (state.is_crashed() and _cancelled_while_starting(flow_run))
        stopped = kind.stop(record, cancelled)
        if cancelled:
            emit(record.name, RunEvent.CANCELED, f"{kind.word} cancelled{stopped}", flow_run_id=str(flow_run.id))
        else:
            reason = _why(kind, record, state)
            emit(record.name, RunEvent.FAILED, reason + stopped, flow_run_id=str(flow_run.id))
        flush()
        end_run(record.mlflow_run_id, "KILLED" if cancelled else "FAILED")

    return dict(on_cancellation=[ended], on_crashed=[ended], on_failure=[ended])


def _why(kind: FlowKind, record: RunRecord, state) -> str:
    """Why a job failed: its error, or how its flow crashed."""
    if state.is_crashed():
        return f"the {kind.word}'s flow crashed ({state.message}){kind.crash_hint(record.name)}"
    exc = state.result(raise_on_failure=False)
    return str(exc) if isinstance(exc, BaseException) else state.message


def _cancelled_while_starting(flow_run) -> bool:
    """A crash of a job cancelled while its process was starting: the server freed its slot of the deployment's
    concurrency limit and the process, its lease gone, crashed. It was cancelled, and is set so."""
    with prefect_client() as prefect:
        history = prefect.read_flow_run_states(flow_run.id)
        if not any(s.type in (StateType.CANCELLING, StateType.CANCELLED) for s in history):
            return False
        prefect.set_flow_run_state(flow_run.id, Cancelled(message="cancelled by the user"), force=True)
    return True


def launch(deployment: str, name: str, parameters: dict[str, Any], tags: list[str], created: str, *,
           as_subflow: bool = False, work_queue_name: str | None = None):
    """Start a flow run of `deployment` named as the job and return at once, its CREATED event delivered: a reader
    may look for it the moment this returns."""
    flow_run = run_deployment(deployment, parameters=parameters, flow_run_name=name, timeout=0, as_subflow=as_subflow,
                              tags=tags, work_queue_name=work_queue_name)
    emit(name, RunEvent.CREATED, created, flow_run_id=str(flow_run.id))
    flush()
    return flow_run


def launch_run(config: RunConfig, name: str, mlflow_run_id: str, tags: list[str], given: dict | None = None,
               register: bool = True, as_subflow: bool = False):
    """Start a finetune run, its MLflow run made by the caller; returns its flow run.

    `given`: the arguments the config was made with, so the run names a setting as it was given; `register=False`
    leaves registration to the caller (a sweep registers only its best trial); `as_subflow`: from inside a flow."""
    parameters = {"config": config.to_recipe(), **(given or {}), "run_name": name, "mlflow_run_id": mlflow_run_id}
    return launch(routing.RUN, name, parameters | ({} if register else {"register": False}), tags,
                  f"run {name} created", as_subflow=as_subflow,
                  work_queue_name=routing.queue_for(config.training_config.deepspeed.processes))


def start_child(kind: FlowKind, record: RunRecord, config: RunConfig, name: str, register: bool = True) -> str:
    """A finetune run this job starts, shown as its subflow, its MLflow run nested under the job's in the job's
    experiment, tagged as the kind's children; returns its MLflow run id."""
    user, experiment = current_user(), client().get_experiment(record.experiment_id).name
    experiment_id, mlflow_run_id = start_run(config.params(), name, experiment, user,
                                             parent_run_id=record.mlflow_run_id, mirror=config.run.mlflow_tracking_uri)
    launch_run(config, name, mlflow_run_id, [*run_tags(user, experiment_id), kind.children(record.name)],
               register=register, as_subflow=True)
    return mlflow_run_id


def child_run(name: str):
    """The flow run of a run a job started, by its name (None until the server has it)."""
    with prefect_client() as prefect:
        return newest_flow_run(prefect, name, RUN_TAG)


def stop_child(name: str) -> bool:
    """Cancel one run a job started (a pruned trial); False when it has ended or is ending already."""
    with prefect_client() as prefect:
        stopped = stop_flow_run(prefect, newest_flow_run(prefect, name, RUN_TAG), "run")
    flush()
    return stopped


def stop_children(kind: FlowKind, record: RunRecord) -> int:
    """Cancel the runs the job started that are still under way; returns how many."""
    with prefect_client() as prefect:
        stopped = sum(stop_flow_run(prefect, r, "run") for r in under_way(prefect, [kind.children(record.name)]))
    flush()
    return stopped
