"""Sweeps: start one, read it back (its status, trials and best trial), list, resume and cancel them.

A sweep is a flow run of the `sweep/default` deployment (flows/sweep.py) tagged `tessera-sweep`; its trials are
runs tagged `sweep:<name>`, and its events Prefect events on the resource `tessera.run.<name>`, as a run's.
"""

import builtins
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prefect.deployments import run_deployment

from flows import services
from flows.foundation_model.runs import (
    RunStatus,
    TrainingRun,
    _filters,
    _follow,
    _read_flow_runs,
    _status,
    _training_run,
    failed_unless_started,
    get,
    newest_flow_run,
    settled_events,
    stop_flow_run,
    under_way,
)
from flows.foundation_model.runs import cancel as cancel_runs
from flows.services import SWEEP_DEPLOYMENT
from tasks.config import run_name_for
from tasks.errors import InvalidInputError
from tasks.events import RunEvent, emit, flush
from tasks.prefect_api import prefect_client
from tasks.recipe import SHORTHANDS
from tasks.run_record import (
    RUN_TAG,
    SWEEP_TAG,
    RunRecord,
    current_user,
    sweep_tags,
    tag_value,
    trial_tag,
)
from tasks.search import BEST_RUN_TAG, SweepConfig, configure_sweep
from tasks.tracking import client as mlflow_client
from tasks.tracking import experiment_for, start_run
from tasks.validate_paths import check_paths


@dataclass
class Sweep:
    name: str
    status: RunStatus
    created_by: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    experiment_id: str | None
    run_id: str | None  # the parent MLflow run, which the trials' runs are nested under
    details: str | None
    flow_run_id: str
    config: SweepConfig | None = field(default=None, repr=False)

    @property
    def trials(self) -> "builtins.list[TrainingRun]":
        """Every trial's run so far, oldest first."""
        with services.connected(), prefect_client() as prefect:
            found = _read_flow_runs(prefect, _filters(tags=[RUN_TAG, trial_tag(self.name)]), limit=10_000)
            return sorted((_training_run(r, include_details=False) for r in found), key=lambda r: r.created_at)

    @property
    def best(self) -> TrainingRun | None:
        """The trial with the best metric among those that completed, or None before one has."""
        if self.run_id is None:
            return None
        with services.connected():
            best = mlflow_client().get_run(self.run_id).data.tags.get(BEST_RUN_TAG)
        return get(best) if best else None

    def refresh(self) -> "Sweep":
        self.__dict__.update(get_sweep(self.name).__dict__)
        return self

    def cancel(self) -> int:
        """Stop the sweep and every trial still running; returns how many trials were stopped."""
        with services.connected(), prefect_client() as prefect:
            stop_flow_run(prefect, _latest(self.name), "sweep")
            trials = under_way(prefect, [trial_tag(self.name)])
        flush()
        return cancel_runs([t.name for t in trials]) if trials else 0

    def get_events(self, follow: bool = False):
        """The sweep's events (started, each trial started and finished, completed), oldest first; with
        follow=True an iterator that ends at a terminal event."""
        if follow:
            return _follow(self.name, _latest)
        with services.connected():
            return settled_events(self.name, _latest(self.name))


def sweep(
    space: dict[str, Any] | None = None,
    *,
    strategy: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    max_trials: int | None = None,
    max_parallel: int | None = None,
    prune: bool | None = None,
    recipe: "str | dict | SweepConfig | None" = None,
    overrides: dict[str, Any] | None = None,
    validate_inputs: bool = True,
    **arguments: Any,
) -> Sweep:
    """Start a hyperparameter sweep and return at once: trials of the base run with the settings of `space` set.

    `space` maps a create() argument's name or a config path to a list of values, {"uniform": [lo, hi]},
    {"loguniform": [lo, hi]} or {"int": [lo, hi]}. The base run is `recipe` (which may hold a `sweep` section),
    `overrides` by path and create()'s own arguments (model, train_data_path, eval_data_path, register_to, ...);
    the arguments here win. Every value the space can take is checked before anything runs."""
    unknown = sorted(set(arguments) - set(SHORTHANDS))
    if unknown:
        raise InvalidInputError(f"sweep() has no argument {', '.join(unknown)}: use create()'s ({', '.join(SHORTHANDS)})")
    given = dict(space=space, strategy=strategy, metric=metric, mode=mode, max_trials=max_trials,
                 max_parallel=max_parallel, prune=prune)
    config = configure_sweep(recipe, shorthands=arguments,
                             overrides=(overrides or {}) | {f"sweep.{k}": v for k, v in given.items() if v is not None})
    if validate_inputs:
        config = check_paths(config)
    name, user = run_name_for(config.run.model_name_or_path, config.run.task_type, prefix="sweep"), current_user()
    with services.connected():
        experiment_id, mlflow_run_id = start_run(config.params(), name, experiment_for(config, name, user), user)
        with failed_unless_started(mlflow_run_id):
            flow_run = run_deployment(SWEEP_DEPLOYMENT, parameters={"config": config.to_recipe(), "sweep_name": name,
                                                              "mlflow_run_id": mlflow_run_id}, flow_run_name=name,
                                      timeout=0, as_subflow=False, tags=sweep_tags(user, experiment_id))
        emit(name, RunEvent.CREATED, f"sweep {name} created: {config.sweep.trials} trials", flow_run_id=str(flow_run.id))
        flush()
        return _sweep(flow_run)


def get_sweep(sweep: "str | Sweep") -> Sweep:
    """The sweep by name, with its current status."""
    with services.connected():
        return _sweep(_latest(sweep.name if isinstance(sweep, Sweep) else sweep))


def list_sweeps(statuses: "builtins.list[str | RunStatus] | None" = None, limit: int = 100) -> "builtins.list[Sweep]":
    """Sweeps, newest first (a sweep run again shows once, as its latest attempt)."""
    wanted = [_status(s) for s in statuses] if statuses else None
    with services.connected(), prefect_client() as prefect:
        latest: dict[str, Sweep] = {}
        for flow_run in _read_flow_runs(prefect, _filters(tags=[SWEEP_TAG]), limit=10_000):
            latest.setdefault(flow_run.name, _sweep(flow_run))  # newest first: the first of a name is its latest
    found = [s for s in latest.values() if wanted is None or s.status in wanted]
    return sorted(found, key=lambda s: s.created_at, reverse=True)[:limit]


def resume_sweep(sweep: "str | Sweep") -> Sweep:
    """Run a sweep whose flow crashed, failed or was stopped again: its study continues, finished trials are kept
    and trials still training are watched to their end."""
    name = sweep.name if isinstance(sweep, Sweep) else sweep
    with services.connected():
        earlier = _latest(name)
        status = RunStatus.of(earlier)
        if not status.is_terminal() or status == RunStatus.COMPLETED:
            raise InvalidInputError(f"sweep {name} is {status.value}: only a sweep that crashed, failed or was stopped "
                                    "can be resumed")
        flow_run = run_deployment(SWEEP_DEPLOYMENT, parameters=earlier.parameters, flow_run_name=name, timeout=0,
                                  as_subflow=False, tags=earlier.tags)
        emit(name, RunEvent.CREATED, f"sweep {name} resumed", flow_run_id=str(flow_run.id))
        flush()
        return _sweep(flow_run)


def _latest(name: str):
    """The sweep's newest flow run (a resumed sweep has one per attempt)."""
    return newest_flow_run(name, SWEEP_TAG, "sweep", "fm.list_sweeps()")


def _sweep(flow_run) -> Sweep:
    status = RunStatus.of(flow_run)
    record = RunRecord.load(flow_run.name)
    try:
        config = configure_sweep(flow_run.parameters.get("config"), called=None)
    except InvalidInputError:  # refused by the sweep itself, which says why in its FAILED state
        config = None
    return Sweep(
        name=flow_run.name, status=status, created_by=tag_value(flow_run.tags, "created_by") or "prefect",
        created_at=flow_run.created, started_at=flow_run.start_time,
        completed_at=flow_run.end_time if status.is_terminal() else None,
        experiment_id=tag_value(flow_run.tags, "experiment") or (record.experiment_id if record else None),
        run_id=flow_run.parameters.get("mlflow_run_id") or (record.mlflow_run_id if record else None),
        details=flow_run.state.message if flow_run.state and status == RunStatus.FAILED else None,
        flow_run_id=str(flow_run.id), config=config,
    )
