"""Runs: create, get, list, cancel, their events and checkpoints, as the anchor's foundation_model has them.

A run is a flow run of the `finetune/default` deployment tagged `tessera` (a job of the kind RUN: jobs.py); its
status is the flow run's Prefect state, its events Prefect events on the resource `tessera.run.<name>`. What is a
run's own: its anchor arguments and checkpoints, the active-run limit and the lock that keeps it.
"""

import builtins
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency

from client.jobs import (
    Job,
    Kind,
    common_fields,
    creator,
    job_events,
    name_of,
    newest_first,
    read_events,
    tracked,
    tracking_ids,
    wanted_statuses,
)
from deployments import services
from flows.lifecycle import launch_run
from tasks import routing
from tasks.arguments import ARGUMENTS, SHORTHANDS
from tasks.config import RunConfig, run_name_for
from tasks.data.validation import DataValidation, validate_data  # noqa: F401  (public API)
from tasks.errors import (
    InvalidInputError,
    ServiceError,
    TooManyActiveRunsError,
)
from tasks.events import RunEvent, emit, flush
from tasks.flow_runs import (
    RunStatus,
    flow_run_filter,
    read_flow_runs,
    stop_flow_run,
    under_way,
)
from tasks.models import ModelInfo
from tasks.models import get_models as _catalog
from tasks.nova import warn_amazon_only
from tasks.prefect_api import prefect_client
from tasks.recipe import configure
from tasks.run_record import RUN_TAG, RunRecord, current_user, run_tags
from tasks.tracking import client as mlflow_client
from tasks.tracking import experiment_for
from tasks.training.checkpoint_names import complete_checkpoints
from tasks.training.protocol import seconds_left
from tasks.upload_checkpoints import artifact_dir
from tasks.validate_paths import check_paths

RUN = Kind(RUN_TAG, "run", "fm.list()", routing.RUN)


@dataclass
class TrainingRun(Job):
    KIND: ClassVar[Kind] = RUN
    name: str
    status: RunStatus
    created_by: str
    model: str
    train_data_path: str
    register_to: str
    task_type: str
    experiment_path: str
    eval_data_path: str | None
    eval_prompts: list[str] | None
    custom_weights_path: str | None
    training_duration: str
    learning_rate: float
    context_length: int | None
    allow_percentage_invalid_samples: float | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    estimated_end_time: datetime | None
    experiment_id: str | None
    run_id: str | None
    details: str | None
    flow_run_id: str
    config: RunConfig | None = field(default=None, repr=False)  # the whole configuration (None: unreadable)

    @classmethod
    def of(cls, flow_run, include_details: bool = True) -> "TrainingRun":
        """The run a flow run is, its anchor arguments read from its config (`include_details`: with the estimated
        end, which reads its events)."""
        p, common, by = flow_run.parameters, common_fields(flow_run), creator(flow_run)
        try:  # create() passes the config; `prefect deployment run` may pass the anchor's arguments instead
            config = configure(p.get("config"), shorthands={k: p.get(k) for k in SHORTHANDS})
        except InvalidInputError:  # refused by the run itself, which says why in its FAILED state; shown as given
            config = None
        arguments = {a.name: a.read(config) if config else p.get(a.name) for a in ARGUMENTS}
        arguments["experiment_path"] = experiment_for(config, flow_run.name, by) if config else ""  # its default named
        running = include_details and common["status"] == RunStatus.RUNNING
        experiment_id, run_id = tracking_ids(flow_run)
        return cls(
            **common, created_by=by, **arguments,
            estimated_end_time=_estimated_end(flow_run.name) if running else None,
            experiment_id=experiment_id, run_id=run_id, config=config,
        )


def create(
    model: str | None = None,
    train_data_path: str | None = None,
    register_to: str | None = None,
    *,
    experiment_path: str | None = None,
    task_type: str | None = None,
    eval_data_path: str | None = None,
    eval_prompts: list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | None = None,
    context_length: int | None = None,
    validate_inputs: bool = True,
    data_prep_cluster_id: str | None = None,
    allow_percentage_invalid_samples: float | None = None,
    recipe: "str | os.PathLike | dict | RunConfig | None" = None,
    overrides: "dict[str, Any] | None" = None,
) -> TrainingRun:
    """Submit a fine-tuning run and return at once; it goes on after this process exits.

    `recipe` (a YAML file, a dict or a RunConfig, laid out like Nova's SFT recipes: tasks/config.py) sets any
    setting; `overrides` sets settings by their path (`{"training_config.trainer.max_steps": 40}`); the anchor's
    arguments set theirs (tasks/arguments.py: what each means and sets). Arguments and overrides win over the recipe. The config is checked here, before any run
    exists: an error names the setting as it was given."""
    if data_prep_cluster_id is not None:
        warnings.warn("data_prep_cluster_id is ignored: Tessera prepares data inside the run, no cluster needed",
                      stacklevel=2)
    arguments = locals()
    given = {k: arguments[k] for k in SHORTHANDS if arguments[k] is not None}
    config = configure(recipe, shorthands=given, overrides=overrides)
    if config.training_config.deepspeed.nodes > 1 and services.embedded():
        raise InvalidInputError(
            f"training_config.deepspeed.nodes {config.training_config.deepspeed.nodes}: the embedded default trains "
            "on this machine only; a run over several needs the shared server and a worker on each machine (README "
            "'When one machine is not enough')")
    if validate_inputs:
        config = check_paths(config)
    name = run_name_for(config.run.model_name_or_path, config.run.task_type)
    with services.connected():
        with _create_lock():  # count and submit as one step: racing creates cannot pass the limit
            with prefect_client() as prefect:
                active = len(under_way(prefect, [RUN_TAG]))
            if active >= services.max_active_runs():
                raise TooManyActiveRunsError(
                    f"{active} runs are active, the limit is {services.max_active_runs()}: cancel one "
                    "(fm.cancel(name)) or wait for one to finish, then create again"
                )
            user = current_user()
            with tracked(config, name, experiment_for(config, name, user), user) as (experiment_id, mlflow_run_id):
                # The arguments beside the config they are in: the run names a setting as it was given.
                flow_run = launch_run(config, name, mlflow_run_id, run_tags(user, experiment_id), given)
        if ignored := warn_amazon_only(config.amazon_only):  # said once: here, and in the run's events
            emit(name, RunEvent.WARNING, ignored, flow_run_id=str(flow_run.id), keys=", ".join(config.amazon_only))
            flush()
        return TrainingRun.of(flow_run, include_details=False)


# One create() at a time from this process. Prefect serves a process's slot requests one after another, so creates
# racing in its threads (the HTTP API's) queued behind each other's waits there, and past a minute timed out.
_CREATING_HERE = threading.Lock()


@contextmanager
def _create_lock() -> Iterator[None]:
    """Hold the server's one CREATE_LOCK slot (waiting for it, at most a minute): for every client on any machine.

    Prefect raises ConcurrencySlotAcquisitionError whatever went wrong; only one without a cause is the limit
    missing. Otherwise its cause is raised: the server's refusal (a 401 or 403, which connected() says is one, and
    what to set), another answer, or no answer at all."""
    with _CREATING_HERE, ExitStack() as held:
        try:
            held.enter_context(concurrency(services.CREATE_LOCK, strict=True, lease_duration=60, timeout_seconds=60))
        except ConcurrencySlotAcquisitionError as e:
            if e.__cause__ is not None:
                raise e.__cause__ from None
            raise ServiceError(f"the Prefect server at {services.prefect_api_url()} has no concurrency limit "
                               f"{services.CREATE_LOCK}: register Tessera's deployments there "
                               "(python -m deployments.deploy --pool <pool>), which creates it") from None
        except TimeoutError:
            raise ServiceError(f"creates elsewhere held the Prefect server's {services.CREATE_LOCK} slot for over a "
                               "minute: create again") from None
        yield


def get(training_run: "str | TrainingRun") -> TrainingRun:
    """The run by name, with its current status."""
    return TrainingRun.read(name_of(training_run))


def list(
    training_runs: "builtins.list[str | TrainingRun] | None" = None,
    experiment_id: str | None = None,
    *,
    statuses: "builtins.list[str | RunStatus] | None" = None,
    user_emails: "builtins.list[str] | None" = None,
    before: "str | datetime | None" = None,
    after: "str | datetime | None" = None,
    include_details: bool = True,
    limit: int = 100,
) -> "builtins.list[TrainingRun]":
    """Runs, newest first, filtered as the anchor's list() filters them."""
    names = [name_of(r) for r in training_runs] if training_runs else None
    wanted = wanted_statuses(statuses)
    tags = [RUN_TAG] + ([f"experiment:{experiment_id}"] if experiment_id else [])
    with services.connected(), prefect_client() as prefect:
        runs = []
        for email in user_emails or [None]:
            run_filter = flow_run_filter(names, wanted, tags + ([f"created_by:{email}"] if email else []),
                                         _parse_time(before, "before"), _parse_time(after, "after"))
            runs += read_flow_runs(prefect, run_filter, limit)
        result = [TrainingRun.of(r, include_details) for r in runs]
    return newest_first(result, wanted, limit)


def cancel(runs: "str | TrainingRun | builtins.list[str | TrainingRun] | None" = None,
           experiment_id: str | None = None) -> int:
    """Stop runs (by name, run or list; or every run of an experiment); returns how many were cancelled."""
    if (runs is None) == (experiment_id is None):
        raise InvalidInputError("cancel() takes exactly one of runs= or experiment_id=")
    with services.connected():
        if runs is not None:
            targets = [RUN.newest(name_of(r)) for r in (runs if isinstance(runs, builtins.list) else [runs])]
        else:
            with prefect_client() as prefect:
                targets = under_way(prefect, [RUN_TAG, f"experiment:{experiment_id}"])
        with prefect_client() as prefect:
            cancelled = sum(stop_flow_run(prefect, flow_run, "run") for flow_run in targets)
        flush()
        return cancelled


def get_events(training_run: "str | TrainingRun", follow: bool = False):
    """The run's events, oldest first; with follow=True an iterator that ends at a terminal event."""
    return job_events(RUN, name_of(training_run), follow)


def get_checkpoints(training_run: "str | TrainingRun") -> "builtins.list[str]":
    """The run's `ep*-ba*` checkpoints as full URIs: in the MLflow artifact store once uploaded, else local."""
    run = get(training_run) if not isinstance(training_run, TrainingRun) else training_run
    record = RunRecord.load(run.name)
    if run.run_id:
        with services.connected():  # a shared MLflow server's refusal, said as one
            store = mlflow_client()
            uploaded = [a for a in store.list_artifacts(run.run_id, artifact_dir(run.name)) if a.is_dir]
            if uploaded:
                base = store.get_run(run.run_id).info.artifact_uri.rstrip("/")
                return sorted(f"{base}/{a.path}" for a in uploaded if a.path.split("/")[-1].startswith("ep"))
    if record is None:
        return []
    return [p.as_uri() for p in complete_checkpoints(record.checkpoints)]


def get_models() -> "builtins.list[ModelInfo]":
    """The catalog: name, display name, max context length, and whether the weights are on this machine."""
    return _catalog()


def _estimated_end(name: str) -> datetime | None:
    """When the run should end, at the pace its last progress event reports."""
    updates = [e for e in read_events(name) if e.type == RunEvent.TRAIN_UPDATED and "elapsed_s" in e.payload]
    left = seconds_left(updates[-1].payload) if updates else None
    return None if left is None else updates[-1].time + timedelta(seconds=left)


def _parse_time(value: "str | datetime | None", field_name: str) -> datetime | None:
    """A datetime, or the anchor's strings: %Y-%m-%d or %m-%d-%Y, optionally with %H:%M:%S."""
    if value is None or isinstance(value, datetime):
        return value.astimezone(timezone.utc) if isinstance(value, datetime) and value.tzinfo else (
            value.replace(tzinfo=timezone.utc) if value else None)
    for fmt in ("%Y-%m-%d", "%m-%d-%Y", "%Y-%m-%d %H:%M:%S", "%m-%d-%Y %H:%M:%S"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise InvalidInputError(
        f"{field_name}={value!r} is not a date: use a datetime or 'YYYY-MM-DD' / 'MM-DD-YYYY', "
        "optionally followed by ' HH:MM:SS'"
    )
