"""Sweeps: start one, read it back (its status, trials and best trial), list, resume and cancel them.

A sweep is a flow run of the `sweep/default` deployment (flows/sweep.py) tagged `tessera-sweep`; its trials are
runs tagged `sweep:<name>`, and its events Prefect events on the resource `tessera.run.<name>`, as a run's.
"""

import builtins
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from client.jobs import (
    Job,
    Kind,
    common_fields,
    creator,
    name_of,
    newest_first,
    tracking_ids,
    wanted_statuses,
)
from client.runs import TrainingRun, get
from deployments import services
from tasks import routing
from tasks.arguments import refuse_unknown
from tasks.config import run_name_for
from tasks.errors import InvalidInputError
from tasks.flow_runs import RunStatus, flow_run_filter, read_flow_runs
from tasks.prefect_api import prefect_client
from tasks.run_record import RUN_TAG, SWEEP_TAG, current_user, sweep_tags, trial_tag
from tasks.search import BEST_RUN_TAG, SweepConfig, configure_sweep
from tasks.tracking import client as mlflow_client
from tasks.tracking import experiment_for
from tasks.validate_paths import check_paths

SWEEP = Kind(SWEEP_TAG, "sweep", "fm.list_sweeps()", routing.SWEEP, runs_under=trial_tag)


@dataclass
class Sweep(Job):
    """A sweep; cancel() stops its trials still running too (returning how many), and its events are the sweep's:
    started, each trial started and finished, completed."""

    KIND: ClassVar[Kind] = SWEEP
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

    @classmethod
    def of(cls, flow_run) -> "Sweep":
        """The sweep a flow run (one attempt) is."""
        try:
            config = configure_sweep(flow_run.parameters.get("config"), called=None)
        except InvalidInputError:  # refused by the sweep itself, which says why in its FAILED state
            config = None
        experiment_id, run_id = tracking_ids(flow_run)
        return cls(**common_fields(flow_run), created_by=creator(flow_run), experiment_id=experiment_id,
                   run_id=run_id, config=config)

    @property
    def trials(self) -> "builtins.list[TrainingRun]":
        """Every trial's run so far, oldest first."""
        with services.connected(), prefect_client() as prefect:
            found = read_flow_runs(prefect, flow_run_filter(tags=[RUN_TAG, trial_tag(self.name)]), limit=10_000)
            return sorted((TrainingRun.of(r, include_details=False) for r in found), key=lambda r: r.created_at)

    @property
    def best(self) -> TrainingRun | None:
        """The trial with the best metric among those that completed, or None before one has."""
        if self.run_id is None:
            return None
        with services.connected():
            best = mlflow_client().get_run(self.run_id).data.tags.get(BEST_RUN_TAG)
        return get(best) if best else None


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
    refuse_unknown(arguments, "sweep()")
    given = dict(space=space, strategy=strategy, metric=metric, mode=mode, max_trials=max_trials,
                 max_parallel=max_parallel, prune=prune)
    config = configure_sweep(recipe, shorthands=arguments,
                             overrides=(overrides or {}) | {f"sweep.{k}": v for k, v in given.items() if v is not None})
    if validate_inputs:
        config = check_paths(config)
    name, user = run_name_for(config.run.model_name_or_path, config.run.task_type, prefix="sweep"), current_user()
    flow_run = SWEEP.start_tracked(config, name, experiment_for(config, name, user), user,
                                   {"config": config.to_recipe(), "sweep_name": name},
                                   lambda experiment_id: sweep_tags(user, experiment_id),
                                   f"sweep {name} created: {config.sweep.trials} trials")
    return Sweep.of(flow_run)


def get_sweep(sweep: "str | Sweep") -> Sweep:
    """The sweep by name, with its current status."""
    return Sweep.read(name_of(sweep))


def list_sweeps(statuses: "builtins.list[str | RunStatus] | None" = None, limit: int = 100) -> "builtins.list[Sweep]":
    """Sweeps, newest first (a sweep run again shows once, as its latest attempt)."""
    wanted = wanted_statuses(statuses)
    with services.connected(), prefect_client() as prefect:
        latest: dict[str, Any] = {}
        for flow_run in read_flow_runs(prefect, flow_run_filter(tags=[SWEEP_TAG]), limit=10_000):
            latest.setdefault(flow_run.name, flow_run)  # newest first: the first of a name is its latest
    return newest_first([Sweep.of(flow_run) for flow_run in latest.values()], wanted, limit)


def resume_sweep(sweep: "str | Sweep") -> Sweep:
    """Run a sweep whose flow crashed, failed or was stopped again: its study continues, finished trials are kept
    and trials still training are watched to their end."""
    name = name_of(sweep)
    with services.connected():
        earlier = SWEEP.newest(name)
        status = RunStatus.of(earlier)
        if not status.is_terminal() or status == RunStatus.COMPLETED:
            raise InvalidInputError(f"sweep {name} is {status.value}: only a sweep that crashed, failed or was stopped "
                                    "can be resumed")
        return Sweep.of(SWEEP.start(name, earlier.parameters, earlier.tags, f"sweep {name} resumed"))
