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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState
from prefect import flow
from prefect.states import Cancelled

from flows.lifecycle import (
    FlowKind,
    begin,
    child_run,
    end_hooks,
    start_child,
    stop_child,
    stop_children,
)
from tasks.errors import TesseraError
from tasks.events import RunEvent, emit
from tasks.flow_runs import RunStatus
from tasks.prefect_api import prefect_client
from tasks.process_group import exit_with_parent
from tasks.register_model import register_model
from tasks.run_record import (
    RunRecord,
    cancelled_while_starting,
    sweep_tags,
    tag_value,
    trial_tag,
)
from tasks.search import (
    BEST_RUN_TAG,
    SweepConfig,
    configure_sweep,
    distributions,
    open_study,
    trial_config,
)
from tasks.tracking import client, end_run, experiment_for
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


def _stop_trials(record: RunRecord, cancelled: bool) -> str:
    """Cancelled: stop every running trial. Crashed or failed: leave them running for the sweep, run again, to
    watch."""
    return f"; {stop_children(SWEEP, record)} running trial(s) stopped" if cancelled else ""


SWEEP = FlowKind("sweep", "sweep", tags=lambda user, experiment_id, config: sweep_tags(user, experiment_id),
                 experiment=experiment_for, stop=_stop_trials,
                 crash_hint=lambda name: f"; fm.resume_sweep('{name}') continues it", children=trial_tag)


# Parameters arrive as JSON and are checked by configure_sweep, as fm.sweep() checks them.
@flow(name="sweep", validate_parameters=False, **end_hooks(SWEEP))
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
    record = begin(SWEEP, config, sweep_name, mlflow_run_id)
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
    best_config = trial_config(config, best.params)
    with _final_export(best.user_attrs["run"]) as (best_record, best_export):
        version = register_model(best_record, best_config, best_export, alias=CHALLENGER,
                                 tags={"tessera.sweep": record.name, "tessera.sweep_metric": settings.metric,
                                       f"tessera.sweep_{settings.metric}": str(best.value)})
    registered = best_config.registered_model_name(best_record.name)
    _summarize(record, config, study)
    end_run(record.mlflow_run_id, "FINISHED")
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
        if started := child_run(t.user_attrs["run"]) if "run" in t.user_attrs else None:
            active[t.number] = Running(t.number, started.name, started.parameters["mlflow_run_id"], None)
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
    name = f"{record.name}-t{trial.number}"
    trial.set_user_attr("run", name)
    mlflow_run_id = start_child(SWEEP, record, trial_config(config, trial.params), name, register=False)
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
            stop_child(running.run)
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
    flow_run = child_run(run_name)
    return RunStatus.of(flow_run) if flow_run else None


@contextmanager
def _final_export(run: str) -> Iterator[tuple[RunRecord, str]]:
    """A trial's record and the Hugging Face export of its last checkpoint: in its run folder when it trained on
    this machine, else fetched from its MLflow run (where the worker that trained it uploaded its checkpoints) into
    a temporary folder, removed on leaving."""
    record = RunRecord.load(run)
    if record is not None:
        yield record, str(final_export(record.checkpoints))
        return
    trial = child_run(run)
    record = RunRecord(run, str(trial.id), tag_value(trial.tags, "experiment"), trial.parameters["mlflow_run_id"])
    checkpoints = checkpoints_uri(record.mlflow_run_id, run)
    step = tag_step(mlflow.artifacts.load_text(f"{checkpoints}/{LATEST}").strip())
    with tempfile.TemporaryDirectory(prefix="tessera-best-") as folder:
        yield record, mlflow.artifacts.download_artifacts(f"{checkpoints}/{export_dir(Path(), step).as_posix()}",
                                                          dst_path=folder)


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

