"""Scheduled retraining: schedule it, run it now, read retrainings back, and move @champion by hand.

A model's retraining is its own Prefect deployment, `retrain/<model>`: a twin of `retrain/default` whose parameters
are the model's settings and whose schedule is its cron, so the Prefect UI shows and pauses it, the work pool's worker
serves it, and `prefect deployment run 'retrain/<model>'` runs it. Each retraining is a flow run tagged
`tessera-retrain` and `model:<name>` (flows/retrain.py); its events are Prefect events on the resource
`tessera.run.<name>`, as a run's.
"""

import builtins
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from mlflow.exceptions import MlflowException
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from client.jobs import (
    Job,
    Kind,
    common_fields,
    name_of,
    newest_first,
    tracking_ids,
    wanted_statuses,
)
from deployments import services
from tasks import routing
from tasks.arguments import refuse_unknown
from tasks.config import run_name_for
from tasks.errors import InvalidInputError, RunNotFoundError
from tasks.flow_runs import RunStatus, flow_run_filter, read_flow_runs
from tasks.prefect_api import prefect_client
from tasks.retraining import (
    CHALLENGER_TAG,
    CHAMPION,
    OUTCOME_TAG,
    RetrainConfig,
    champion,
    check_retraining,
    configure_retraining,
    experiment_path,
)
from tasks.run_record import (
    RETRAIN_TAG,
    challenger_tag,
    current_user,
    retrain_tags,
    tag_value,
)
from tasks.tracking import client, refused

RETRAINING = Kind(RETRAIN_TAG, "retraining", "fm.list_retrainings()", routing.RETRAIN, runs_under=challenger_tag)


@dataclass
class RetrainingSchedule:
    registered_model: str
    cron: str
    timezone: str
    active: bool  # False: paused (here or in the Prefect UI)
    config: RetrainConfig


@dataclass
class Retraining(Job):
    """A retraining; cancel() stops its challenger's run too (the champion stays), returning how many runs were
    stopped, and its events are the retraining's: started, the challenger, the verdict, completed."""

    KIND: ClassVar[Kind] = RETRAINING
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

    @classmethod
    def of(cls, flow_run) -> "Retraining":
        """The retraining a flow run is; its outcome and challenger are tags of its MLflow run."""
        common = common_fields(flow_run)
        _, mlflow_run_id = tracking_ids(flow_run)
        tags = client().get_run(mlflow_run_id).data.tags if mlflow_run_id else {}
        return cls(**common, registered_model=tag_value(flow_run.tags, "model") or "",
                   outcome=tags.get(OUTCOME_TAG) if common["status"] == RunStatus.COMPLETED else None,
                   challenger=tags.get(CHALLENGER_TAG))


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
    """Retrain `registered_model` on `cron`, as the deployment `retrain/<registered_model>` (scheduling a model
    again replaces its settings and schedule). The settings are checked now, as create() checks a run's:
    `train_data_path` is a folder or S3 prefix of .jsonl files, or a Delta table, that grows; `eval_data_path` the
    frozen set champion and challenger are judged on; `mode` "continue" (from the champion, on what is new) or
    "from_base"; the rest as create() takes them, or by `recipe` and `overrides`. The base model defaults to the
    champion's."""
    refuse_unknown(arguments, "schedule_retraining()")
    with services.connected():  # the champion is read from MLflow: a refusal there said as one
        config = _configure(registered_model, recipe, overrides, mode, min_improvement,
                            dict(arguments, train_data_path=train_data_path, eval_data_path=eval_data_path),
                            validate_inputs)
    try:
        cron_schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        raise InvalidInputError(f"cron {cron!r} (timezone {timezone!r}) is not a schedule: "
                                f"{e.errors()[0]['msg']}; write five fields, e.g. '0 3 * * *' (03:00 daily)") from None
    with services.connected(), prefect_client() as prefect:
        base = prefect.read_deployment_by_name(routing.RETRAIN)
        # The same flow, served where retrain/default is: its work pool's workers.
        prefect.create_deployment(
            base.flow_id, registered_model, parameters={"config": config.to_recipe()},
            schedules=[DeploymentScheduleCreate(schedule=cron_schedule, active=True)],
            description=f"Retrain {registered_model} on its new data; promote the challenger if it beats the champion.",
            tags=[RETRAIN_TAG, f"model:{registered_model}"], entrypoint=base.entrypoint, path=base.path,
            pull_steps=base.pull_steps, work_pool_name=base.work_pool_name, work_queue_name=base.work_queue_name,
            job_variables=base.job_variables, parameter_openapi_schema=base.parameter_openapi_schema,
            enforce_parameter_schema=base.enforce_parameter_schema,
        )
    return get_retraining_schedule(registered_model)


def get_retraining_schedule(registered_model: str) -> RetrainingSchedule:
    with services.connected(), prefect_client() as prefect:
        return _schedule_of(_deployment(prefect, registered_model))


def list_retraining_schedules() -> "builtins.list[RetrainingSchedule]":
    with services.connected(), prefect_client() as prefect:
        found = prefect.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(
            all_=[RETRAIN_TAG])))
    return sorted((_schedule_of(d) for d in found if tag_value(d.tags, "model")), key=lambda s: s.registered_model)


def pause_retraining(registered_model: str, paused: bool = True) -> RetrainingSchedule:
    """Pause the model's schedule (paused=False: resume it), as the Prefect UI's toggle does."""
    with services.connected(), prefect_client() as prefect:
        deployment = _deployment(prefect, registered_model)
        prefect.update_deployment_schedule(deployment.id, deployment.schedules[0].id, active=not paused)
    return get_retraining_schedule(registered_model)


def unschedule_retraining(registered_model: str) -> None:
    """Remove the model's schedule and its deployment; its retrainings so far and its champion stay."""
    with services.connected(), prefect_client() as prefect:
        prefect.delete_deployment(_deployment(prefect, registered_model).id)


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
    """Start a retraining of `registered_model` now and return at once: as a run of its deployment
    retrain/<registered_model> when no settings are given here, else of retrain/default with these (as
    schedule_retraining() takes them)."""
    refuse_unknown(arguments, "retrain_now()")
    given = {k: v for k, v in arguments.items() if v is not None}
    if recipe is None and not given and not overrides and mode is None and min_improvement is None:
        deployment = routing.model_retrain(registered_model)
        with services.connected():
            config = get_retraining_schedule(registered_model).config
    else:
        deployment = routing.RETRAIN
        with services.connected():  # the champion is read from MLflow
            config = _configure(registered_model, recipe, overrides, mode, min_improvement, given, validate_inputs)
    name, user = run_name_for(config.run.model_name_or_path, config.run.task_type, prefix="retrain"), current_user()
    flow_run = RETRAINING.start_tracked(config, name, experiment_path(config, user), user,
                                        {"config": config.to_recipe(), "run_name": name},
                                        lambda experiment_id: retrain_tags(user, experiment_id, registered_model),
                                        f"retraining {name} of {registered_model} created", deployment)
    with services.connected():  # its outcome is read from MLflow
        return Retraining.of(flow_run)


def get_retraining(retraining: "str | Retraining") -> Retraining:
    return Retraining.read(name_of(retraining))


def list_retrainings(registered_model: str | None = None, statuses: "builtins.list[str | RunStatus] | None" = None,
                     limit: int = 100) -> "builtins.list[Retraining]":
    """Retrainings, newest first; of one model when `registered_model` is given."""
    wanted = wanted_statuses(statuses)
    tags = [RETRAIN_TAG] + ([f"model:{registered_model}"] if registered_model else [])
    with services.connected(), prefect_client() as prefect:
        flow_runs = read_flow_runs(prefect, flow_run_filter(statuses=wanted, tags=tags), limit)
        found = [Retraining.of(r) for r in flow_runs]
    return newest_first(found, wanted, limit)


def promote(registered_model: str, version: int) -> int | None:
    """Move @champion to `version` by hand (a rollback); returns the version it marked before, if any."""
    with services.connected():  # a shared MLflow server's refusal, said as one
        before = champion(registered_model)
        mlflow_client = client()
        try:
            mlflow_client.get_model_version(registered_model, str(version))
        except MlflowException as e:
            if refused(e):
                raise
            raise InvalidInputError(f"{registered_model} has no version {version}: see its versions in the MLflow "
                                    f"UI (Models > {registered_model})") from None
        mlflow_client.set_registered_model_alias(registered_model, CHAMPION, str(version))
        mlflow_client.set_model_version_tag(registered_model, str(version), OUTCOME_TAG,
                                            f"promoted by hand by {current_user()}")
    return int(before.version) if before else None


def _configure(registered_model: str, recipe, overrides, mode, min_improvement, arguments: dict,
               validate_inputs: bool) -> RetrainConfig:
    """The checked settings; the base model, when none is given, is the one the champion was trained from."""
    given = {"retrain.registered_model": registered_model, "retrain.mode": mode,
             "retrain.min_improvement": min_improvement}
    incumbent = champion(registered_model)
    if recipe is None and arguments.get("model") is None and incumbent is not None:
        arguments = dict(arguments, model=incumbent.tags.get("tessera.base_model"))
    config = configure_retraining(recipe, shorthands=arguments,
                                  overrides=(overrides or {}) | {k: v for k, v in given.items() if v is not None})
    # The schedule runs in a worker, whose working directory is not this one.
    config = config.replace({f"run.{key}": str(Path(value).resolve()) for key in ("train_data_path", "eval_data_path")
                             if (value := getattr(config.run, key)) and Path(value).exists()})
    return check_retraining(config) if validate_inputs else config


def _deployment(prefect, registered_model: str):
    """The model's retrain/<model> deployment."""
    try:
        return prefect.read_deployment_by_name(routing.model_retrain(registered_model))
    except ObjectNotFound:
        raise RunNotFoundError(f"{registered_model} has no retraining schedule: create one with "
                               "fm.schedule_retraining() or `tessera retrain schedule`") from None


def _schedule_of(deployment) -> RetrainingSchedule:
    config = configure_retraining(deployment.parameters["config"], called=None)
    (schedule,) = deployment.schedules
    return RetrainingSchedule(config.retrain.registered_model, schedule.schedule.cron, schedule.schedule.timezone,
                              schedule.active, config)
