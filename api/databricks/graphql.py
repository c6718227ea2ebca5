"""The databricks-genai SDK's GraphQL API (`POST /api/2.0/genai-mapi/graphql`) over flows.foundation_model.

The SDK reads errors from the body, not the HTTP status: `errors[].extensions.code` must be an HTTP status as an
integer, and 429/502/503/504 make it retry (createFinetune too), so a refusal that retrying cannot fix is never one
of those. It waits 10 s for each answer.

Served over HTTP only (the schema has no subscriptions and the SDK only POSTs), without introspection, and bounded
before anything runs: the document by MAX_TOKENS, what it selects by MAX_FIELDS and MAX_DEPTH (the SDK's largest
query selects 34 fields, 5 deep); the body is bounded in api/limits.py.
"""

from datetime import datetime
from pathlib import Path

from ariadne import MutationType, QueryType, ScalarType, load_schema_from_path, make_executable_schema
from ariadne.asgi import GraphQL
from ariadne.asgi.handlers import GraphQLHTTPHandler
from ariadne.exceptions import HttpError
from graphql import FieldNode, FragmentSpreadNode, GraphQLError, SelectionSetNode, parse
from graphql.validation import ValidationRule
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from api import access
from api.failures import unexpected
import client as fm
from client.jobs import events_of
from tasks.custom_weights import DATABRICKS_SAVE_FOLDER
from tasks.errors import InvalidInputError, RunNotFoundError, TesseraError, TooManyActiveRunsError
from tasks.run_record import current_user

PATH = "/api/2.0/genai-mapi/graphql"
MAX_TOKENS, MAX_FIELDS, MAX_DEPTH = 2000, 100, 8

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
        owners = access.run_owners((data.get("entity") or {}).get("emails"))
        if owners == []:
            return [], False
        runs = fm.list(_names(filters), (filters.get("mlflowExperimentId") or {}).get("equals"),
                       statuses=(filters.get("status") or {}).get("in"), user_emails=owners,
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
    events = await run_in_threadpool(lambda: fm.get_events(access.visible_run(getFinetuneEventsData["name"])))
    return [_event(e) for e in events]


@mutation.field("createFinetune")
async def resolve_create(_, info, createFinetuneData: dict) -> dict:
    """create() with the SDK's config: its tracker names the experiment and the registry path."""
    config = createFinetuneData["config"]
    tracker = ((config.get("experimentTracker") or {}).get("mlflow")) or {}
    await run_in_threadpool(_check_access, config, tracker)
    run = await run_in_threadpool(
        fm.create, config["model"], config["trainDataPath"], tracker.get("modelRegistryPath"),
        experiment_path=_experiment_path(tracker.get("experimentPath")),
        task_type=config.get("taskType"), eval_data_path=config.get("evalDataPath"),
        eval_prompts=config.get("evalPrompts"), custom_weights_path=config.get("customWeightsPath"),
        training_duration=config.get("trainingDuration"), learning_rate=config.get("learningRate"),
        context_length=config.get("contextLength"), validate_inputs=not config.get("disableCredentialsCheck"))
    return _finetune(run)


def _check_access(config: dict, tracker: dict) -> None:
    """The paths, model and registry name of a createFinetune, as the caller may name them (api/access.py)."""
    access.check_model(config["model"])
    access.check_data_path(config["trainDataPath"], "train_data_path")
    access.check_data_path(config.get("evalDataPath"), "eval_data_path")
    access.check_custom_weights(config.get("customWeightsPath"))
    access.check_register_to(tracker.get("modelRegistryPath"))
    if (path := tracker.get("experimentPath")) and "{}" not in path and not access.may_create_experiment(path):
        raise InvalidInputError(f"experiment_path {path} is in another user's folder: use /Users/{current_user()}/"
                                "<name> or a shared folder such as /Shared/<name>")


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
        owners = access.run_owners(None)  # unknown names and other users' runs are skipped: the SDK counts stops
        if names:
            targets = fm.list(names, user_emails=owners, include_details=False, limit=len(names))
        else:
            targets = fm.list(experiment_id=experiment_id, statuses=fm.ACTIVE, user_emails=owners,
                              include_details=False, limit=10_000)
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
    """{"message", "extensions": {"code": <int>}}: Tessera's own message, the status the SDK maps to its error; for
    a failure Tessera did not mean, an error id (its text can name server paths: the log has it)."""
    cause = error.original_error
    if cause is None:  # the query itself is wrong (a field or argument the schema lacks, too large)
        return {"message": error.message, "extensions": {"code": 400}}
    message = str(cause) if isinstance(cause, TesseraError) else unexpected(cause)
    return {"message": message, "extensions": {"code": _status(cause)}}


class _Bounded(ValidationRule):
    """Each operation selects at most MAX_FIELDS fields (every alias and every use of a fragment counted) at most
    MAX_DEPTH deep: each field is a resolver run, and the SDK's largest query selects 34, 5 deep."""

    def __init__(self, context):
        super().__init__(context)
        self.fragments: dict[str, tuple[int, int]] = {}  # name -> (fields, depth): each fragment sized once

    def enter_operation_definition(self, node, *_):
        fields, depth = self._size(node.selection_set, ())
        if fields > MAX_FIELDS or depth > MAX_DEPTH:
            self.report_error(GraphQLError(
                f"the query selects {fields} fields, {depth} deep: this server answers at most {MAX_FIELDS} fields, "
                f"{MAX_DEPTH} deep, in one request; split it", node))

    def _size(self, selections: SelectionSetNode | None, within: tuple[str, ...]) -> tuple[int, int]:
        """(fields, depth) of a selection set; `within` the fragments it is inside (a cycle counts nothing: its own
        rule refuses it)."""
        fields = depth = 0
        for selection in selections.selections if selections else ():
            if isinstance(selection, FieldNode):
                below, deep = self._size(selection.selection_set, within)
                fields, depth = fields + 1 + below, max(depth, 1 + deep)
                continue
            if isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name in within or (fragment := self.context.get_fragment(name)) is None:
                    continue
                if name not in self.fragments:
                    self.fragments[name] = self._size(fragment.selection_set, (*within, name))
                below, deep = self.fragments[name]
            else:  # an inline fragment
                below, deep = self._size(selection.selection_set, within)
            fields, depth = fields + below, max(depth, deep)
        return fields, depth


def _parse(context, data: dict):
    """The document, refused past MAX_TOKENS before it is parsed further (graphql-core also refuses deep nesting)."""
    return parse(data["query"], max_tokens=MAX_TOKENS)


class _Http(GraphQLHTTPHandler):
    """ariadne's HTTP handler, with a body it cannot read refused in the errors[] the SDK reads (not as text, nor, for
    JSON nested past Python's parser, as a bare 500)."""

    async def handle_request_override(self, request):
        if request.method != "POST":
            return None
        try:
            await self.extract_data_from_request(request)  # kept on the request: read once
        except HttpError as error:
            return _refused(error.message or "the request body cannot be read")
        except RecursionError:
            return _refused("the request body nests deeper than this server parses: flatten it")
        return None


def _refused(message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": 400}}]}, status_code=400)


def app() -> GraphQL:
    """The ASGI app of the schema in schema.graphql; the caller acts as the user its API key names."""
    schema = make_executable_schema(load_schema_from_path(str(Path(__file__).with_name("schema.graphql"))),
                                    query, mutation, json_scalar)
    return GraphQL(schema, error_formatter=format_error, debug=False, introspection=False, query_parser=_parse,
                   validation_rules=[_Bounded], http_handler=_Http())
