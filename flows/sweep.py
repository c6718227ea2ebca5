"""A hyperparameter sweep as a Prefect flow: trials fanned out as finetune runs, searched and pruned by Optuna.

Each trial is a real run of the `finetune/default` deployment, started as a subflow of the sweep's flow run, its
MLflow run nested under the sweep's. Optuna asks for a trial's values and is told its result (ask/tell: this flow
drives the trials); with pruning on, each trial's eval losses are reported as they come, and a trial that falls
behind is cancelled. Only the best trial is registered, as the `challenger`. The study lives in a database
(tasks/search.py), so running a crashed sweep again (`fm.resume_sweep`) continues it: finished trials are kept,
and trials still training are watched to their end.
"""

import json
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState
from prefect import flow
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled

from flows.foundation_model.jobs import RunStatus, under_way
from flows.foundation_model.runs import cancel, get, submit
from tasks.config import run_name_for
from tasks.errors import TesseraError
from tasks.events import RunEvent, emit, flush
from tasks.prefect_api import prefect_client
from tasks.process_group import exit_with_parent
from tasks.register_model import register_model
from tasks.run_record import RunRecord, cancelled_while_starting, current_user, run_tags, sweep_tags, trial_tag
from tasks.search import (
    BEST_RUN_TAG,
    SweepConfig,
    configure_sweep,
    distributions,
    open_study,
    trial_config,
)
from tasks.tracking import client, experiment_for, start_run
from tasks.training.checkpoint_names import LATEST, export_dir, final_export, tag_step
from tasks.upload_checkpoints import checkpoints_uri

CHALLENGER = "challenger"  # the alias of a sweep's best trial in the registry
POLL_S = 1.0  # how often running trials are looked at


class NoTrialCompleted(TesseraError):
    """Every trial of a sweep failed, was stopped or was pruned."""

    retryable = False


@dataclass
class Running:
    """A trial whose run is under way. `trial` is None for one an earlier attempt of the sweep started: its result
    is still told, but its eval losses are no longer reported (nor judged for pruning)."""

    number: int
    run: str
    mlflow_run_id: str
    trial: optuna.trial.Trial | None
    reported: set[int] = field(default_factory=set)  # the steps whose eval loss Optuna has
    pruned: bool = False  # told as pruned, its run still stopping


def stop_trials(flow, flow_run, state) -> None:
    """Cancelled: stop every running trial. Crashed or failed: say why; a crash leaves the trials running for the
    sweep, run again, to watch."""
    record = RunRecord.of_flow_run(flow_run)
    if record is None:  # it never got as far as naming itself
        return
    if state.is_cancelled():
        with prefect_client() as prefect:
            trials = under_way(prefect, [trial_tag(record.name)])
        stopped = cancel([t.name for t in trials]) if trials else 0
        emit(record.name, RunEvent.CANCELED, f"sweep cancelled; {stopped} running trial(s) stopped",
             flow_run_id=str(flow_run.id))
        client().set_terminated(record.mlflow_run_id, "KILLED")
    else:
        exc = state.result(raise_on_failure=False) if state.is_failed() else None
        reason = str(exc) if isinstance(exc, BaseException) else (
            f"the sweep's flow crashed ({state.message}); fm.resume_sweep('{record.name}') continues it")
        emit(record.name, RunEvent.FAILED, reason, flow_run_id=str(flow_run.id))
        client().set_terminated(record.mlflow_run_id, "FAILED")
    flush()


# Parameters arrive as JSON and are checked by configure_sweep, as fm.sweep() checks them.
@flow(name="sweep", validate_parameters=False, on_cancellation=[stop_trials], on_crashed=[stop_trials],
      on_failure=[stop_trials])
def sweep(config: SweepConfig, sweep_name: str | None = None, mlflow_run_id: str | None = None) -> dict:
    """Search the settings of `config.sweep.space` with finetune runs of the recipe; register the best.

    Args:
        config: The recipe every trial starts from, with its `sweep` section.
        sweep_name: Set by fm.sweep(); empty, the sweep names itself. A sweep's name again continues its study.
        mlflow_run_id: The sweep's parent MLflow run, set by fm.sweep().
    """
    if cancelled_while_starting():
        return Cancelled(message="cancelled before it started")
    config = configure_sweep(config, called=None)
    record = _name_sweep(config, sweep_name, mlflow_run_id)
    exit_with_parent(lambda: None)  # its runs have watchdogs of their own
    settings = config.sweep
    emit(record.name, RunEvent.STARTED, f"sweep {record.name} started: {settings.trials} trials of "
         f"{', '.join(settings.space)}, {settings.max_parallel} at a time ({settings.strategy})")
    study = open_study(record.name, settings, config.training_config.seed)
    run_trials(record, config, study)

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise NoTrialCompleted(f"sweep {record.name}: no trial completed, so none is registered; the trials' FAILED "
                               "and PRUNED events say why (fm.get_sweep(name).trials)")
    best = study.best_trial
    (best_record, best_export), best_config = _final_export(best.user_attrs["run"]), trial_config(config, best.params)
    version = register_model(best_record, best_config, best_export, alias=CHALLENGER,
                             tags={"tessera.sweep": record.name, "tessera.sweep_metric": settings.metric,
                                   f"tessera.sweep_{settings.metric}": str(best.value)})
    registered = best_config.registered_model_name(best_record.name)
    _summarize(record, config, study)
    client().set_terminated(record.mlflow_run_id, "FINISHED")
    emit(record.name, RunEvent.COMPLETED,
         f"sweep {record.name} completed: best trial {best.number} ({best_record.name}), {settings.metric} "
         f"{best.value:.4f} with {_values(best.params)}; registered {registered} version {version} as {CHALLENGER}",
         best_run=best_record.name, best_value=best.value, best_params=best.params, registered_model=registered,
         version=version)
    return {"sweep_name": record.name, "best_run": best_record.name, "registered_model": registered,
            "version": version}


def run_trials(record: RunRecord, config: SweepConfig, study: optuna.Study) -> None:
    """Keep up to max_parallel trials running until the sweep has had all its trials, each told how it ended."""
    settings, space = config.sweep, distributions(config.sweep)
    active = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by an earlier attempt
        if "mlflow_run_id" in t.user_attrs:
            active[t.number] = Running(t.number, t.user_attrs["run"], t.user_attrs["mlflow_run_id"], None)
        else:  # asked for, but stopped before its run was started
            study.tell(t.number, state=TrialState.FAIL)
    while True:
        while (len(active) < settings.max_parallel and _asked(study) < settings.trials
               and not _cancelling(record)):
            running = _start_trial(record, config, study.ask(space))
            active[running.number] = running
        if not active:
            return
        time.sleep(POLL_S)
        for number, running in list(active.items()):
            if _watch(record, config, study, running):
                del active[number]


def _start_trial(record: RunRecord, config: SweepConfig, trial: optuna.trial.Trial) -> Running:
    """A finetune run of the recipe with the trial's values, as a subflow, its MLflow run nested under the sweep's."""
    trial_cfg, user = trial_config(config, trial.params), current_user()
    name = f"{record.name}-t{trial.number}"
    experiment_id, mlflow_run_id = start_run(trial_cfg.params(), name, experiment_for(config, record.name, user),
                                             user, parent_run_id=record.mlflow_run_id)
    trial.set_user_attr("run", name)
    trial.set_user_attr("mlflow_run_id", mlflow_run_id)
    submit(trial_cfg, name, mlflow_run_id, [*run_tags(user, experiment_id), trial_tag(record.name)], register=False,
           as_subflow=True)
    emit(record.name, RunEvent.TRAIN_UPDATED, f"trial {trial.number} started as run {name}: {_values(trial.params)}",
         trial=trial.number, run=name, params=trial.params)
    return Running(trial.number, name, mlflow_run_id, trial)


def _watch(record: RunRecord, config: SweepConfig, study: optuna.Study, running: Running) -> bool:
    """Report the trial's new eval losses, prune it if it falls behind, tell Optuna how it ended; True once its run
    has ended and Optuna was told."""
    metric, status = config.sweep.metric, _status(running.run)
    if running.pruned:  # it keeps its slot until its process is gone: the sweep never ends before its trials do
        return status is not None and status.is_terminal()
    history = sorted((m.step, m.value) for m in client().get_metric_history(running.mlflow_run_id, metric))
    for step, value in history if running.trial is not None else []:
        if step in running.reported:
            continue
        running.trial.report(value, step)
        running.reported.add(step)
        if config.sweep.prune and status == RunStatus.RUNNING and running.trial.should_prune():
            emit(running.run, RunEvent.PRUNED, f"pruned by sweep {record.name} at batch {step}: {metric} "
                 f"{value:.4f}, behind {_others_at(study, running.number, step)}", batch=step, value=value,
                 sweep=record.name)
            cancel(running.run)
            study.tell(running.number, state=TrialState.PRUNED)
            _trial_finished(record, running, "pruned", value)
            running.pruned = True
            return False
    if status is None or not status.is_terminal():
        return False
    if status == RunStatus.COMPLETED and history:
        study.tell(running.number, history[-1][1])
        # The best so far, where every client reads it (fm.get_sweep().best): the study may be on a worker's disk.
        client().set_tag(record.mlflow_run_id, BEST_RUN_TAG, study.best_trial.user_attrs["run"])
        _trial_finished(record, running, "completed", history[-1][1])
    else:
        study.tell(running.number, state=TrialState.FAIL)
        _trial_finished(record, running, status.value.lower(), None)
    return True


def _trial_finished(record: RunRecord, running: Running, how: str, value: float | None) -> None:
    result = f": eval loss {value:.4f}" if value is not None else ""
    emit(record.name, RunEvent.TRIAL_FINISHED, f"trial {running.number} ({running.run}) {how}{result}",
         trial=running.number, run=running.run, state=how, value=value)


def _others_at(study: optuna.Study, number: int, step: int) -> str:
    """What a pruned trial was judged against: the completed trials' values at that step (the median pruner's)."""
    values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.number != number and step in t.intermediate_values]
    return f"the median {statistics.median(values):.4f} of {len(values)} completed trial(s) there" if values else (
        "the completed trials")


def _asked(study: optuna.Study) -> int:
    """Trials started so far, whatever became of them (a grid's waiting combinations do not count)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.FAIL)))


def _cancelling(record: RunRecord) -> bool:
    """Whether the sweep is being cancelled: start no trial its cancellation would miss."""
    with prefect_client() as prefect:
        return RunStatus.of(prefect.read_flow_run(record.flow_run_id)) == RunStatus.TERMINATING


def _status(run_name: str) -> RunStatus | None:
    with prefect_client() as prefect:
        found = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])), limit=1)
    return RunStatus.of(found[0]) if found else None


def _final_export(run: str) -> tuple[RunRecord, str]:
    """A trial's record and the Hugging Face export of its last checkpoint: in its run folder when it trained on
    this machine, else fetched from its MLflow run, where the worker that trained it uploaded its checkpoints."""
    record = RunRecord.load(run)
    if record is not None:
        return record, str(final_export(record.checkpoints))
    trial = get(run)
    record = RunRecord(run, trial.flow_run_id, trial.experiment_id, trial.run_id)
    checkpoints = checkpoints_uri(trial.run_id, run)
    step = tag_step(mlflow.artifacts.load_text(f"{checkpoints}/{LATEST}").strip())
    return record, mlflow.artifacts.download_artifacts(f"{checkpoints}/{export_dir(Path(), step).as_posix()}",
                                                       dst_path=tempfile.mkdtemp(prefix="tessera-best-"))


def _values(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _summarize(record: RunRecord, config: SweepConfig, study: optuna.Study) -> None:
    """The parent MLflow run: the sweep's settings, every trial's values and result, the best, and the metric
    against each searched setting."""
    mlflow_client, run_id, metric = client(), record.mlflow_run_id, config.sweep.metric
    trials, best = study.get_trials(deepcopy=False), study.best_trial
    mlflow_client.log_dict(run_id, config.sweep.model_dump(mode="json", by_alias=True), "sweep/sweep.json")
    mlflow_client.log_table(run_id, data={
        "trial": [t.number for t in trials], "run": [t.user_attrs.get("run") for t in trials],
        "state": [t.state.name for t in trials], metric: [t.value for t in trials],
        **{key: [t.params.get(key) for t in trials] for key in config.sweep.space},
    }, artifact_file="sweep/trials.json")
    mlflow_client.log_metric(run_id, f"best_{metric}", best.value)
    mlflow_client.log_text(run_id, json.dumps(best.params, indent=1), "sweep/best_params.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_slice(study, target_name=metric)
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
    mlflow_client.log_figure(run_id, figure, "sweep/metric_by_setting.png")


def _name_sweep(config: SweepConfig, sweep_name: str | None, mlflow_run_id: str | None) -> RunRecord:
    """The sweep's record: named, with its parent MLflow run, by fm.sweep(); here when started from the deployment.
    A sweep run again under its name keeps both."""
    flow_run_id, user = str(current_flow_run.id), current_user()
    earlier = RunRecord.load(sweep_name) if sweep_name else None
    name = sweep_name or run_name_for(config.run.model_name_or_path, config.run.task_type, prefix="sweep")
    if mlflow_run_id is None and earlier is None:
        experiment_id, mlflow_run_id = start_run(config.params(), name, experiment_for(config, name, user), user)
        emit(name, RunEvent.CREATED, f"sweep {name} created from its deployment")
    else:
        mlflow_run_id = mlflow_run_id or earlier.mlflow_run_id
        experiment_id = client().get_run(mlflow_run_id).info.experiment_id
    with prefect_client() as prefect:
        tags = prefect.read_flow_run(flow_run_id).tags
        prefect.update_flow_run(flow_run_id, name=name, tags=sorted({*tags, *sweep_tags(user, experiment_id)}))
    record = RunRecord(name, flow_run_id, experiment_id, mlflow_run_id)
    record.save()
    return record
