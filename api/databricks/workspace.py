"""The Databricks workspace REST calls the SDK makes around create(): who the caller is (SCIM Me), Unity Catalog
volumes (Files API), tables, registered models and permissions, answered from Tessera's volumes root, tables root
and MLflow registry.

Tessera has no clusters, catalogs or grants. Where the SDK asks about those, the answer is the one a workspace gives
when all is well: a cluster runs a current Databricks Runtime (Tessera prepares data inside each run, so
data_prep_cluster_id is ignored), the caller holds ALL_PRIVILEGES, and the SDK's create-then-delete probe of
register_to is answered without touching the registry.
"""

import json
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api import access
from tasks.config import REGISTER_TO, TaskType
from tasks.data.sources import check_data_path
from tasks.errors import InvalidInputError
from tasks.home import volumes_root
from tasks.run_record import current_user
from tasks.tracking import client

router = APIRouter()
# The one cluster clusters/list shows: pass it as data_prep_cluster_id where the SDK insists on one (Delta tables).
CLUSTER = "tessera"


def error(status: int, code: str, message: str) -> JSONResponse:
    """Databricks' error body, which databricks-sdk maps to its exceptions (NotFound, PermissionDenied, ...)."""
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


@router.get("/api/2.0/preview/scim/v2/Me")
def me() -> dict:
    user = current_user()
    return {"id": user, "userName": user, "displayName": user, "active": True,
            "emails": [{"value": user, "primary": True, "type": "work"}]}


@router.head("/api/2.0/fs/files/Volumes/{path:path}")
def file_metadata(path: str):
    """A volume file exists (the SDK checks train and eval data this way)."""
    try:
        check_data_path(f"dbfs:/Volumes/{path}", "path", TaskType.INSTRUCTION_FINETUNE)
    except InvalidInputError as e:
        return error(404, "NOT_FOUND", str(e))
    return JSONResponse(None, status_code=200)


@router.get("/api/2.0/fs/list")
async def list_folder(request: Request):
    """A volume folder's entries: the SDK sends the path as a JSON body, even on GET, to find a .txt file."""
    body = await request.body()
    path = (json.loads(body) if body else {}).get("path") or request.query_params.get("path", "")
    parts = [p for p in path.split("/") if p]
    root = volumes_root()
    if parts[:1] != ["Volumes"] or len(parts) < 4 or ".." in parts:
        return error(400, "INVALID_PARAMETER_VALUE", f"{path!r} is not a folder in a volume: "
                                                     "/Volumes/<catalog>/<schema>/<volume>/<path>")
    if root.startswith("s3://"):
        return error(501, "NOT_IMPLEMENTED", f"listing volumes on S3 ({root}) is not served: create the run with "
                                             "validate_inputs=False; the run itself checks the folder")
    folder = Path(root, *parts[1:])
    if not folder.is_dir():
        return error(404, "NOT_FOUND", f"{path} is not a folder under the volumes root {root}")
    return {"files": [{"path": f"{path.rstrip('/')}/{entry.name}", "is_dir": entry.is_dir(),
                       "file_size": entry.stat().st_size if entry.is_file() else 0}
                      for entry in sorted(folder.iterdir())]}


@router.get("/api/2.1/unity-catalog/tables/{full_name}")
def table(full_name: str):
    try:
        check_data_path(full_name, "table", TaskType.INSTRUCTION_FINETUNE)
    except InvalidInputError as e:
        return error(404, "TABLE_DOES_NOT_EXIST", str(e))
    catalog, schema, name = full_name.split(".")
    return {"full_name": full_name, "catalog_name": catalog, "schema_name": schema, "name": name,
            "table_type": "EXTERNAL", "data_source_format": "DELTA"}


@router.get("/api/2.1/clusters/list")
def clusters() -> dict:
    return {"clusters": [_cluster(CLUSTER)]}


@router.get("/api/2.1/clusters/get")
def cluster(cluster_id: str) -> dict:
    return _cluster(cluster_id)


def _cluster(cluster_id: str) -> dict:
    return {"cluster_id": cluster_id, "cluster_name": "Tessera prepares data inside each run",
            "spark_version": "15.4.x-scala2.12", "data_security_mode": "USER_ISOLATION", "state": "RUNNING"}


@router.get("/api/2.1/unity-catalog/models/{full_name}")
def registered_model(full_name: str):
    """A registered model of Tessera's MLflow registry that the caller may use; its owner is who created the run of
    its first version (api/access.py)."""
    versions = _first_version(full_name)
    if isinstance(versions, JSONResponse):
        return versions
    if not versions or not access.may_use_model(full_name):
        return error(404, "RESOURCE_DOES_NOT_EXIST", f"registered model {full_name} does not exist")
    catalog, schema, name = full_name.split(".")
    return {"full_name": full_name, "catalog_name": catalog, "schema_name": schema, "name": name,
            "owner": access.model_owner(full_name) or current_user()}


@router.post("/api/2.1/unity-catalog/models")
async def create_registered_model(request: Request):
    """The SDK's probe that register_to can take a model: answered for any name Tessera can register to. Nothing is
    created (the SDK deletes its probe at once; a run registers its model itself)."""
    body = await request.json()
    full_name = f"{body.get('catalog_name')}.{body.get('schema_name')}.{body.get('name')}"
    try:
        _model_name(full_name)
    except ValueError as e:
        return error(400, "INVALID_PARAMETER_VALUE", str(e))
    if not access.may_change_model(full_name):
        return error(403, "PERMISSION_DENIED", f"{full_name} is another user's registered model: register to a "
                                               "model of your own")
    return {"full_name": full_name, "catalog_name": body["catalog_name"], "schema_name": body["schema_name"],
            "name": body["name"], "owner": current_user()}


@router.delete("/api/2.1/unity-catalog/models/{full_name}")
def delete_registered_model(full_name: str):
    """The end of the SDK's probe. A model that holds versions is never deleted here: use MLflow for that."""
    versions = _first_version(full_name)
    if isinstance(versions, JSONResponse):
        return versions
    if versions and not access.may_use_model(full_name):
        return error(404, "RESOURCE_DOES_NOT_EXIST", f"registered model {full_name} does not exist")
    if versions:
        return error(403, "PERMISSION_DENIED", f"{full_name} holds versions: delete it with MLflow, not here")
    return {}


@router.get("/api/2.1/unity-catalog/effective-permissions/{kind}/{full_name}")
def effective_permissions(kind: str, full_name: str, principal: str | None = None) -> dict:
    return {"privilege_assignments": [{"principal": principal or current_user(),
                                       "privileges": [{"privilege": "ALL_PRIVILEGES"}]}]}


def _first_version(full_name: str) -> list | JSONResponse:
    """The registered model's first version (none: no such model), or the refusal of a name that is not one."""
    try:
        return client().search_model_versions(f"name = '{_model_name(full_name)}'", order_by=["version_number ASC"],
                                               max_results=1)
    except ValueError as e:
        return error(400, "INVALID_PARAMETER_VALUE", str(e))


def _model_name(full_name: str) -> str:
    """A three-part model name as register_to takes it; ValueError otherwise (also keeps quotes out of filters)."""
    if full_name.count(".") != 2 or not re.match(REGISTER_TO, full_name):
        raise ValueError(f"{full_name!r} is not a model name catalog.schema.model (letters, digits, _ and -)")
    return full_name
