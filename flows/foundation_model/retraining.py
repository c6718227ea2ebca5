"""Scheduled retraining: schedule it, run it now, read retrainings back, and move @champion by hand.

A model's retraining is a Prefect schedule on the `retrain/default` deployment (slug: the registered model's name;
parameters: its settings), so the Prefect UI shows and pauses it and the runner serves it. Each retraining is a
flow run tagged `tessera-retrain` and `model:<name>` (flows/retrain.py); its events are Prefect events on the
resource `tessera.run.<name>`, as a run's.
"""

import builtins
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
)
from prefect.client.schemas.schedules import CronSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from pydantic import ValidationError

from flows import services
from flows.foundation_model.runs import (
    ACTIVE,
    RunStatus,
    _filter,
    _follow,
    _read_events,
    _read_flow_runs,
    stop_flow_run,
)
from flows.foundation_model.runs import cancel as cancel_runs
from flows.services import RETRAIN_DEPLOYMENT
from tasks.config import run_name_for
from tasks.errors import InvalidInputError, RunNotFoundError
from tasks.events import RunEvent, emit, flush
from tasks.recipe import SHORTHANDS
from tasks.retraining import (
    CHALLENGER_TAG,
    CHAMPION,
    OUTCOME_TAG,
    RetrainConfig,
    champion,
    check_retraining,
    configure_retraining,
)
from tasks.run_record import (
    RETRAIN_TAG,
    RunRecord,
    challenger_tag,
    current_user,
    retrain_tags,
    tag_value,
)
from tasks.tracking import client, start_run


@dataclass
class RetrainingSchedule:
    registered_model: str
    cron: str
    timezone: str
    active: bool  # False: paused (here or in the Prefect UI)
    config: RetrainConfig


@dataclass
class Retraining:
    name: str
    registered_model: str
    status: RunStatus
    outcome: str | None  # promoted, rejected or skipped, once completed
    challenger: str | None  # the challenger's run, once started
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    details: str | None
    flow_run_id: str

    def refresh(self) -> "Retraining":
        self.__dict__.update(get_retraining(self.name).__dict__)
        return self

    def cancel(self) -> int:
        """Stop the retraining and its challenger's run; the champion stays. Returns how many runs were stopped."""
        with services.connected(), get_client(sync_client=True) as prefect:
            stop_flow_run(prefect, _latest(prefect, self.name), "retraining")
            running = _read_flow_runs(prefect, _filter(statuses=ACTIVE, tags=[challenger_tag(self.name)]), limit=10)
        flush()
        return cancel_runs([r.name for r in running]) if running else 0

    def get_events(self, follow: bool = False):
        """The retraining's events (started, the challenger, the verdict, completed), oldest first; with
        follow=True an iterator that ends at a terminal event."""
        if follow:
            return _follow(self.name, _latest_status)
        with services.connected():
            return _read_events(self.name)


def schedule_retraining(
    registered_model: str,
    train_data_path: str | None = None,
    eval_data_path: str | None = None,
    *,
    cron: str,
    timezone: str = "UTC",
    mode: str | None = None,
    min_improvement: float | None = None,
    recipe: "str | dict | RetrainConfig | None" = None,
    overrides: dict[str, Any] | None = None,
    validate_inputs: bool = True,
    **arguments: Any,
) -> RetrainingSchedule:
    """Retrain `registered_model` on `cron` (a Prefect schedule of `retrain/default`; scheduling a model again
    replaces its schedule). The settings are checked now, as create() checks a run's: `train_data_path` is a folder
    or S3 prefix of .jsonl files, or a Delta table, that grows; `eval_data_path` the frozen set champion and
    challenger are judged on; `mode` "continue" (from the champion, on what is new) or "from_base"; the rest as
    create() takes them, or by `recipe` and `overrides`. The base model defaults to the champion's."""
    config = _configure(registered_model, recipe, overrides, mode, min_improvement,
                        dict(arguments, train_data_path=train_data_path, eval_data_path=eval_data_path),
                        validate_inputs)
    try:
        cron_schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        raise InvalidInputError(f"cron {cron!r} (timezone {timezone!r}) is not a schedule: "
                                f"{e.errors()[0]['msg']}; write five fields, e.g. '0 3 * * *' (03:00 daily)") from None
    schedule = dict(schedule=cron_schedule, active=True, parameters={"config": config.to_recipe()},
                    slug=registered_model)
    with services.connected(), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        existing = next((s for s in deployment.schedules if s.slug == registered_model), None)
        if existing is None:
            prefect.create_deployment_schedules(deployment.id, [DeploymentScheduleCreate(**schedule)])
        else:
            prefect.update_deployment_schedule(deployment.id, existing.id, **schedule)
    return get_retraining_schedule(registered_model)


def get_retraining_schedule(registered_model: str) -> RetrainingSchedule:
    with services.connected(), get_client(sync_client=True) as prefect:
        return _schedule_of(_schedule(prefect, registered_model))


def list_retraining_schedules() -> "builtins.list[RetrainingSchedule]":
    with services.connected(), get_client(sync_client=True) as prefect:
        schedules = prefect.read_deployment_by_name(RETRAIN_DEPLOYMENT).schedules
    return sorted((_schedule_of(s) for s in schedules if s.slug), key=lambda s: s.registered_model)


def pause_retraining(registered_model: str, paused: bool = True) -> RetrainingSchedule:
    """Pause the model's schedule (paused=False: resume it), as the Prefect UI's toggle does."""
    with services.connected(), get_client(sync_client=True) as prefect:
        schedule = _schedule(prefect, registered_model)
        # The PATCH route replaces parameters it is not given with {}: send them back (the UI's toggle does too).
        prefect.update_deployment_schedule(schedule.deployment_id, schedule.id, active=not paused,
                                           parameters=schedule.parameters)
    return get_retraining_schedule(registered_model)


def unschedule_retraining(registered_model: str) -> None:
    """Remove the model's schedule; its retrainings so far and its champion stay."""
    with services.connected(), get_client(sync_client=True) as prefect:
        schedule = _schedule(prefect, registered_model)
        prefect.delete_deployment_schedule(schedule.deployment_id, schedule.id)


def retrain_now(
    registered_model: str,
    *,
    mode: str | None = None,
    min_improvement: float | None = None,
    recipe: "str | dict | RetrainConfig | None" = None,
    overrides: dict[str, Any] | None = None,
    validate_inputs: bool = True,
    **arguments: Any,
) -> Retraining:
    """Start a retraining of `registered_model` now and return at once: with the settings of its schedule when
    none are given here, else with these (as schedule_retraining() takes them)."""
    given = {k: v for k, v in arguments.items() if v is not None}
    if recipe is None and not given and not overrides and mode is None and min_improvement is None:
        with services.connected():
            config = get_retraining_schedule(registered_model).config
    else:
        config = _configure(registered_model, recipe, overrides, mode, min_improvement, given, validate_inputs)
    name, user = run_name_for(config.run.model_name_or_path, config.run.task_type, prefix="retrain"), current_user()
    from flows.retrain import (
        experiment_path,  # the flow's module, imported only to start one
    )

    with services.connected():
        experiment_id, mlflow_run_id = start_run(config.params(), name, experiment_path(config, user), user)
        flow_run = run_deployment(RETRAIN_DEPLOYMENT, parameters={"config": config.to_recipe(), "run_name": name,
                                                          "mlflow_run_id": mlflow_run_id},
                                  flow_run_name=name, timeout=0, as_subflow=False,
                                  tags=retrain_tags(user, experiment_id, registered_model))
        emit(name, RunEvent.CREATED, f"retraining {name} of {registered_model} created", flow_run_id=str(flow_run.id))
        flush()
        return _retraining(flow_run)


def get_retraining(retraining: "str | Retraining") -> Retraining:
    with services.connected(), get_client(sync_client=True) as prefect:
        return _retraining(_latest(prefect, retraining.name if isinstance(retraining, Retraining) else retraining))


def list_retrainings(registered_model: str | None = None, statuses: "builtins.list[str | RunStatus] | None" = None,
                     limit: int = 100) -> "builtins.list[Retraining]":
    """Retrainings, newest first; of one model when `registered_model` is given."""
    wanted = [RunStatus(s) for s in statuses] if statuses else None
    tags = [RETRAIN_TAG] + ([f"model:{registered_model}"] if registered_model else [])
    with services.connected(), get_client(sync_client=True) as prefect:
        found = [_retraining(r) for r in _read_flow_runs(prefect, _filter(statuses=wanted, tags=tags), limit)]
    return sorted(found, key=lambda r: r.created_at, reverse=True)[:limit]


def promote(registered_model: str, version: int) -> int | None:
    """Move @champion to `version` by hand (a rollback); returns the version it marked before, if any."""
    before = champion(registered_model)
    mlflow_client = client()
    try:
        mlflow_client.get_model_version(registered_model, str(version))
    except Exception:
        raise InvalidInputError(f"{registered_model} has no version {version}: see its versions in the MLflow UI "
                                f"(Models > {registered_model})") from None
    mlflow_client.set_registered_model_alias(registered_model, CHAMPION, str(version))
    mlflow_client.set_model_version_tag(registered_model, str(version), OUTCOME_TAG,
                                        f"promoted by hand by {current_user()}")
    return int(before.version) if before else None


def _configure(registered_model: str, recipe, overrides, mode, min_improvement, arguments: dict,
               validate_inputs: bool) -> RetrainConfig:
    """The checked settings; the base model, when none is given, is the one the champion was trained from."""
    unknown = sorted(set(arguments) - set(SHORTHANDS))
    if unknown:
        raise InvalidInputError(f"no argument {', '.join(unknown)}: use create()'s ({', '.join(SHORTHANDS)})")
    given = {"retrain.registered_model": registered_model, "retrain.mode": mode,
             "retrain.min_improvement": min_improvement}
    incumbent = champion(registered_model)
    if recipe is None and arguments.get("model") is None and incumbent is not None:
        arguments = dict(arguments, model=incumbent.tags.get("tessera.base_model"))
    config = configure_retraining(recipe, shorthands=arguments,
                                  overrides=(overrides or {}) | {k: v for k, v in given.items() if v is not None})
    # The schedule runs in the runner, whose working directory is not this one.
    config = config.replace({f"run.{key}": str(Path(value).resolve()) for key in ("train_data_path", "eval_data_path")
                             if (value := getattr(config.run, key)) and Path(value).exists()})
    return check_retraining(config) if validate_inputs else config


def _schedule(prefect, registered_model: str):
    deployment = prefect.read_deployment_by_name(RETRAIN_DEPLOYMENT)
    found = next((s for s in deployment.schedules if s.slug == registered_model), None)
    if found is None:
        raise RunNotFoundError(f"{registered_model} has no retraining schedule: create one with "
                               "fm.schedule_retraining() or `tessera retrain schedule`")
    return found


def scheduled_config(registered_model: str) -> dict:
    """The settings of the model's schedule, as its parameters hold them."""
    with services.connected(), get_client(sync_client=True) as prefect:
        return _schedule(prefect, registered_model).parameters["config"]


def _schedule_of(schedule) -> RetrainingSchedule:
    config = configure_retraining(schedule.parameters["config"], called=None)
    return RetrainingSchedule(config.retrain.registered_model, schedule.schedule.cron, schedule.schedule.timezone,
                              schedule.active, config)


def _latest(prefect, name: str):
    """The retraining's flow run."""
    found = prefect.read_flow_runs(flow_run_filter=_filter(names=[name], tags=[RETRAIN_TAG]),
                                   sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    if not found:
        raise RunNotFoundError(f"no retraining named {name!r} on {services.prefect_api_url()}: see "
                               "fm.list_retrainings()")
    return found[0]


def _latest_status(name: str) -> RunStatus:
    with get_client(sync_client=True) as prefect:
        return RunStatus.from_state(_latest(prefect, name).state)


def _retraining(flow_run) -> Retraining:
    status = RunStatus.from_state(flow_run.state)
    record = RunRecord.load(flow_run.name)
    mlflow_run_id = flow_run.parameters.get("mlflow_run_id") or (record.mlflow_run_id if record else None)
    tags = client().get_run(mlflow_run_id).data.tags if mlflow_run_id else {}
    return Retraining(
        name=flow_run.name, registered_model=tag_value(flow_run.tags, "model") or "", status=status,
        outcome=tags.get(OUTCOME_TAG) if status == RunStatus.COMPLETED else None,
        challenger=tags.get(CHALLENGER_TAG), created_at=flow_run.created, started_at=flow_run.start_time,
        completed_at=flow_run.end_time if status.is_terminal() else None,
        details=flow_run.state.message if flow_run.state and status == RunStatus.FAILED else None,
        flow_run_id=str(flow_run.id),
    )
