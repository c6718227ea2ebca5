"""The databricks-genai SDK's GraphQL API (`POST /api/2.0/genai-mapi/graphql`) over flows.foundation_model.

The SDK reads errors from the body, not the HTTP status: `errors[].extensions.code` must be an HTTP status as an
integer, and 429/502/503/504 make it retry (createFinetune too), so a refusal that retrying cannot fix is never one
of those. It waits 10 s for each answer.
"""

from datetime import datetime
from pathlib import Path

from ariadne import MutationType, QueryType, ScalarType, load_schema_from_path, make_executable_schema
from ariadne.asgi import GraphQL
from graphql import GraphQLError
from starlette.concurrency import run_in_threadpool

from flows import foundation_model as fm
from flows.foundation_model.runs import events_of
from tasks.custom_weights import DATABRICKS_SAVE_FOLDER
from tasks.errors import InvalidInputError, RunNotFoundError, TesseraError, TooManyActiveRunsError
from tasks.run_record import current_user

PATH = "/api/2.0/genai-mapi/graphql"

query, mutation, json_scalar = QueryType(), MutationType(), ScalarType("JSON")


def _time(value: datetime | None) -> str | None:
    """ISO 8601 with its offset: the SDK compares estimatedEndTime with an aware now()."""
    return value.isoformat() if value else None


def _event(event: fm.FineTuningEvent) -> dict:
    return {"eventType": event.type, "eventTime": _time(event.time), "eventMessage": event.message}


def _finetune(run: fm.TrainingRun, events: list[fm.FineTuningEvent] | None = None) -> dict:
    """A run as the SDK's TrainingRun parser reads it: its details hold exactly the keys it knows, none null that
    it reads as an object."""
    times = [t for t in (run.created_at, run.started_at, run.completed_at) if t]
    return {
        "id": run.flow_run_id, "name": run.name, "status": run.status.value, "createdById": run.created_by,
        "createdByEmail": run.created_by, "createdAt": _time(run.created_at), "updatedAt": _time(max(times)),
        "startedAt": _time(run.started_at), "completedAt": _time(run.completed_at), "reason": run.details,
        "estimatedEndTime": _time(run.estimated_end_time), "isDeleted": False,
        "details": {
            "model": run.model, "taskType": run.task_type, "trainDataPath": run.train_data_path,
            "saveFolder": DATABRICKS_SAVE_FOLDER, "evalDataPath": run.eval_data_path, "evalPrompts": run.eval_prompts,
            "trainingDuration": run.training_duration, "learningRate": run.learning_rate,
            "contextLength": run.context_length, "customWeightsPath": run.custom_weights_path,
            "experimentTracker": {"mlflow": {
                "experimentPath": run.experiment_path, "modelRegistryPath": run.register_to,
                "mlflowExperimentId": run.experiment_id, "mlflowRunId": run.run_id}},
            "dataPrepConfig": {},
            "formattedFinetuningEvents": [_event(e) for e in events or []],
        },
    }


def _selects(info, *path: str) -> bool:
    """Whether the query selects the field at `path` below the one being resolved."""
    nodes = info.field_nodes
    for name in path:
        nodes = [s for n in nodes if n.selection_set for s in n.selection_set.selections if s.name.value == name]
    return bool(nodes)


def _names(filters: dict | None) -> list[str] | None:
    return ((filters or {}).get("name") or {}).get("in")


@query.field("getFinetuneConstants")
async def resolve_constants(*_) -> dict:
    models = await run_in_threadpool(fm.get_models)
    return {"models": [{"name": m.name, "displayName": m.display_name, "maxContextLength": m.max_context_length}
                       for m in models]}


@query.field("getFinetunesPaginated")
async def resolve_finetunes(_, info, getFinetunesPaginatedData: dict) -> dict:
    """A page of runs, newest first; the cursor is the number of runs before the next page."""
    data = getFinetunesPaginatedData
    filters, start = data.get("filters") or {}, int(data.get("cursor") or 0)
    limit = data.get("limit") or 100
    details = _selects(info, "finetunes", "details")
    created = filters.get("createdAt") or {}

    def page() -> tuple[list, bool]:
        runs = fm.list(_names(filters), (filters.get("mlflowExperimentId") or {}).get("equals"),
                       statuses=(filters.get("status") or {}).get("in"),
                       user_emails=(data.get("entity") or {}).get("emails"),
                       before=_datetime(created.get("lt"), "createdAt.lt"),
                       after=_datetime(created.get("gte"), "createdAt.gte"),
                       include_details=details, limit=start + limit + 1)
        shown = runs[start:start + limit]
        events = events_of(shown) if _selects(info, "finetunes", "details", "formattedFinetuningEvents") \
            else [None] * len(shown)
        return [_finetune(r, e) for r, e in zip(shown, events)], len(runs) > start + limit

    finetunes, more = await run_in_threadpool(page)
    return {"cursor": str(start + limit) if more else None, "hasNextPage": more, "finetunes": finetunes}


def _datetime(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(f"filters.{field} {value!r} is not an ISO 8601 time") from None


@query.field("getFinetuneEvents")
async def resolve_events(_, info, getFinetuneEventsData: dict) -> list[dict]:
    events = await run_in_threadpool(fm.get_events, getFinetuneEventsData["name"])
    return [_event(e) for e in events]


@mutation.field("createFinetune")
async def resolve_create(_, info, createFinetuneData: dict) -> dict:
    """create() with the SDK's config: its tracker names the experiment and the registry path."""
    config = createFinetuneData["config"]
    tracker = ((config.get("experimentTracker") or {}).get("mlflow")) or {}
    run = await run_in_threadpool(
        fm.create, config["model"], config["trainDataPath"], tracker.get("modelRegistryPath"),
        experiment_path=_experiment_path(tracker.get("experimentPath")),
        task_type=config.get("taskType"), eval_data_path=config.get("evalDataPath"),
        eval_prompts=config.get("evalPrompts"), custom_weights_path=config.get("customWeightsPath"),
        training_duration=config.get("trainingDuration"), learning_rate=config.get("learningRate"),
        context_length=config.get("contextLength"), validate_inputs=not config.get("disableCredentialsCheck"))
    return _finetune(run)


def _experiment_path(path: str | None) -> str | None:
    """The SDK's default, `/Users/<me>/{}`, is the run's own name in place of {}: Tessera's default too."""
    if path and "{}" in path:
        if path == f"/Users/{current_user()}/{{}}":
            return None
        raise InvalidInputError(f"experiment_path {path!r}: {{}} stands for the run's name only in the default "
                                f"path /Users/{current_user()}/{{}}; give a whole path instead")
    return path


@mutation.field("stopFinetunes")
async def resolve_stop(_, info, getFinetunesData: dict, stopFinetunesData: dict | None = None) -> list[dict]:
    """Cancel the runs named or of an experiment; the runs that were stopped (the SDK counts them)."""
    filters = getFinetunesData.get("filters") or {}
    names, experiment_id = _names(filters), (filters.get("mlflowExperimentId") or {}).get("equals")

    def stop() -> list[dict]:
        if names:  # unknown names are skipped, as the SDK counts only what was stopped
            targets = fm.list(names, include_details=False, limit=len(names))
        else:
            targets = fm.list(experiment_id=experiment_id, statuses=fm.ACTIVE, include_details=False, limit=10_000)
        stopped = [r for r in targets if fm.cancel(r) == 1]  # 0: it had ended
        return [_finetune(fm.get(r.name)) for r in stopped]

    return await run_in_threadpool(stop)


def _status(error: Exception) -> int:
    """The HTTP status the SDK shows for a Tessera error: never one it retries on (429, 502, 503, 504)."""
    if isinstance(error, RunNotFoundError):
        return 404
    if isinstance(error, (InvalidInputError, TooManyActiveRunsError)):
        return 400
    return 500


def format_error(error: GraphQLError, debug: bool = False) -> dict:
    """{"message", "extensions": {"code": <int>}}: Tessera's own message, the status the SDK maps to its error."""
    cause = error.original_error
    if cause is None:  # the query itself is wrong (a field or argument the schema lacks)
        return {"message": error.message, "extensions": {"code": 400}}
    message = str(cause) if isinstance(cause, TesseraError) else f"{type(cause).__name__}: {cause}"
    return {"message": message, "extensions": {"code": _status(cause)}}


def app() -> GraphQL:
    """The ASGI app of the schema in schema.graphql; the caller acts as the user its API key names."""
    schema = make_executable_schema(load_schema_from_path(str(Path(__file__).with_name("schema.graphql"))),
                                    query, mutation, json_scalar)
    return GraphQL(schema, error_formatter=format_error, debug=False)
