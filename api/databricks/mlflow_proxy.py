"""MLflow's REST API at the workspace address: the SDK's MLflow client (tracking URI `databricks`) checks the
experiment path and custom_weights_path there.

Forwarded to Tessera's MLflow server call by call, as the access rule (api/access.py) allows: only the calls in
CALLS, each on an object the caller may see (reads) or change (writes); a search answers with what the caller may
see. An object the caller may not see is answered as absent; any other call is refused: use the MLflow server itself.
"""

import json
import re

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from starlette.concurrency import run_in_threadpool

from api import access
from api.databricks.workspace import error
from deployments import services
from tasks import tracking

router = APIRouter()
HOP_BY_HOP = {"host", "authorization", "content-length", "connection", "transfer-encoding", "accept-encoding"}
PREFIX = "/api/2.0/mlflow/"
ENDPOINT = re.compile(r"^[a-z-]+/[a-z-]+$")  # nothing that could leave the prefix once a client normalises it

# The calls forwarded: (the kind of object the call names, whether it changes it). A search names none: its answer
# is filtered instead (SEARCHES).
READ, WRITE = False, True
CALLS = {
    "experiments/get": ("experiment", READ), "experiments/get-by-name": ("experiment", READ),
    "experiments/create": ("new experiment", WRITE), "experiments/search": ("search", READ),
    "runs/get": ("run", READ), "runs/search": ("search", READ), "metrics/get-history": ("run", READ),
    "artifacts/list": ("run", READ),
    **{f"runs/{call}": ("run", WRITE) for call in ("set-tag", "delete-tag", "log-metric", "log-parameter",
                                                   "log-batch", "update")},
    "registered-models/get": ("model", READ), "registered-models/get-latest-versions": ("model", READ),
    "registered-models/search": ("search", READ), "model-versions/get": ("model", READ),
    "model-versions/get-download-uri": ("model", READ), "model-versions/search": ("search", READ),
    "registered-models/alias": ("model", WRITE),  # GET reads an alias: checked as a read below
    **{f"{kind}/{call}": ("model", WRITE) for kind in ("registered-models", "model-versions")
       for call in ("set-tag", "delete-tag", "update")},
}
# A search's answer: the list it holds, and whether the caller may see one of its entries.
SEARCHES = {
    "experiments/search": ("experiments", lambda e: access.sees_experiment(e["name"], e["experiment_id"])),
    "runs/search": ("runs", lambda r: access.owns(_tags(r["data"]).get("mlflow.user"))),
    "registered-models/search": ("registered_models", lambda m: access.may_use_model(m["name"], _tags(m))),
    "model-versions/search": ("model_versions", lambda v: access.may_use_model(v["name"])),
}


def mlflow_server() -> str:
    """The MLflow server Tessera tracks runs in: MLFLOW_TRACKING_URI when it is one, else the embedded UI's."""
    uri = tracking.tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else services.mlflow_ui_url()


@router.api_route(PREFIX + "{endpoint:path}", methods=["GET", "POST", "PATCH", "DELETE"])
async def forward(endpoint: str, request: Request) -> Response:
    if not ENDPOINT.match(endpoint) or endpoint not in CALLS:
        return error(403, "PERMISSION_DENIED", f"{PREFIX}{endpoint[:200]} is not served by tessera serve: it answers "
                                               f"{', '.join(sorted(CALLS))}; use the MLflow server for the rest")
    body = await request.body()
    try:
        fields = {**request.query_params, **(json.loads(body) if body else {})}
    except (ValueError, TypeError, RecursionError):
        return error(400, "MALFORMED_REQUEST", f"the body of {PREFIX}{endpoint} is not a JSON object")
    if not isinstance(fields, dict):
        return error(400, "MALFORMED_REQUEST", f"the body of {PREFIX}{endpoint} is not a JSON object")
    kind, writes = CALLS[endpoint]
    refusal = await run_in_threadpool(_check, kind, writes and request.method != "GET", fields)
    if refusal is not None:
        return refusal
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    async with httpx.AsyncClient(timeout=60) as http:
        answer = await http.request(request.method, f"{mlflow_server()}{PREFIX}{endpoint}",
                                    params=request.query_params, content=body, headers=headers)
    if endpoint in SEARCHES and answer.status_code == 200:
        return JSONResponse(_visible(endpoint, answer.json()))
    return Response(answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))


def _check(kind: str, writes: bool, fields: dict) -> Response | None:
    """None when the caller may make the call on the object it names; else the answer (absent, or refused)."""
    if kind == "run":
        run_id = str(fields.get("run_id") or fields.get("run_uuid") or "")
        return None if access.owns_mlflow_run(run_id) else _absent("run", run_id)
    if kind == "experiment":
        return _check_experiment(str(fields.get("experiment_id") or ""), fields.get("experiment_name"))
    if kind == "new experiment":
        name = str(fields.get("name") or "")
        return None if access.may_create_experiment(name) else error(
            403, "PERMISSION_DENIED", f"experiment {name} would be in another user's folder: use /Users/<you>/<name> "
                                      "or a shared folder such as /Shared/<name>")
    if kind == "model":
        name = str(fields.get("name") or "")
        if not access.may_use_model(name):
            return _absent("registered model", name)
        if writes and not access.may_change_model(name):
            return error(403, "PERMISSION_DENIED", f"registered model {name} is shared with you to use; only its "
                                                   "owner changes it")
    return None


def _check_experiment(experiment_id: str, name: str | None) -> Response | None:
    try:
        found = (tracking.client().get_experiment_by_name(name) if name is not None else
                 tracking.client().get_experiment(experiment_id))
    except MlflowException:
        found = None
    if found is None or not access.sees_experiment(found.name, found.experiment_id):
        return _absent("experiment", name if name is not None else experiment_id)
    return None


def _absent(what: str, which: str) -> JSONResponse:
    """What MLflow answers for an object that does not exist: also the answer for one the caller may not see."""
    return error(404, "RESOURCE_DOES_NOT_EXIST", f"no {what} {which[:200]!r}")


def _visible(endpoint: str, answer: dict) -> dict:
    key, visible = SEARCHES[endpoint]
    return answer | {key: [entry for entry in answer.get(key, []) if visible(entry)]}


def _tags(entity: dict) -> dict[str, str]:
    return {tag["key"]: tag.get("value", "") for tag in entity.get("tags", [])}
