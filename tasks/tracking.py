"""The MLflow store: SQLite + local artifacts under TESSERA_HOME unless MLFLOW_TRACKING_URI says otherwise."""

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from tasks import tracking_mirror
from tasks.config import RunConfig
from tasks.errors import InvalidInputError
from tasks.home import tessera_home

OWNER_TAG = "tessera.mlflow_account"


def _embedded_uri() -> str:
    return f"sqlite:///{tessera_home() / 'mlflow' / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _embedded_uri()


def is_the_store(uri: str) -> bool:
    """Whether `uri` names the store Tessera tracks every run in (a trailing / or not)."""
    return uri.rstrip("/") == tracking_uri().rstrip("/")


def embedded() -> bool:
    """True for the default store. (mlflow.set_tracking_uri exports the variable, so compare, don't test.)"""
    return tracking_uri() == _embedded_uri()


def default_artifact_root() -> str | None:
    """Local artifacts beside the default SQLite store; a configured server decides its own."""
    return (tessera_home() / "mlflow" / "artifacts").as_uri() if embedded() else None


def client() -> MlflowClient:
    if embedded():
        (tessera_home() / "mlflow").mkdir(exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    return MlflowClient(tracking_uri(), registry_uri=tracking_uri())


def local_path(uri: str) -> Path | None:
    """The path of this machine a file: URI or a plain path names (an artifact store's folder, a checkpoint); None
    for a store elsewhere (s3:, runs:, mlflow-artifacts:, ...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri).expanduser() if not parsed.scheme else None


def load_components(model_uri: str) -> dict:
    """A logged model's model and tokenizer (MLflow's transformers components). The default store's artifacts are
    read where they lie; any other store's (S3, an MLflow server) are downloaded to a folder removed once they are in
    memory: MLflow's own download folder is never removed, and would keep a model's GBs for each load."""
    if embedded():
        return mlflow.transformers.load_model(model_uri, return_type="components")
    with tempfile.TemporaryDirectory(prefix="tessera-model-") as folder:
        return mlflow.transformers.load_model(model_uri, dst_path=folder, return_type="components")


def ensure_experiment(path: str) -> str:
    """The experiment's id, creating it (with our artifact root) on first use."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(path)
    if experiment is not None:
        return experiment.experiment_id
    root = default_artifact_root()
    location = f"{root}/{path.strip('/').replace('/', '_')}" if root else None
    try:
        return mlflow_client.create_experiment(path, artifact_location=location)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE):
            raise InvalidInputError(f"experiment_path {path!r}: MLflow refuses it ({e.message})") from None
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow_client.get_experiment_by_name(path).experiment_id  # a concurrent create() won the race


def experiment_for(config: RunConfig, run_name: str, user: str) -> str:
    """The run's MLflow experiment: run.experiment_path, else the anchor's `/Users/<user>/<run name>`."""
    return config.run.experiment_path or f"/Users/{user}/{run_name}"


def start_run(params: dict, run_name: str, experiment_path: str, user: str, parent_run_id: str | None = None,
              display_name: str | None = None, mirror: str | None = None) -> tuple[str, str]:
    """An MLflow run for a Tessera run (nested under `parent_run_id`: a sweep's), its parameters logged:
    (experiment_id, run_id). `display_name`: the MLflow run's name, if not the Tessera run's; `mirror`: the run's
    own tracking server (run.mlflow_tracking_uri), where a twin of it is started first."""
    experiment_id = ensure_experiment(experiment_path)
    tags = {"mlflow.user": user, "tessera.run_name": run_name}
    parent_tags = client().get_run(parent_run_id).data.tags if parent_run_id else {}
    owner = os.environ.get("MLFLOW_TRACKING_USERNAME")  # a shared server's account: it will own the registered model
    if parent_run_id:  # a sweep's trial or a retraining's challenger, started on a worker: the parent's owner's
        owner = parent_tags.get(OWNER_TAG, owner)
    if owner:
        tags[OWNER_TAG] = owner
    if mirror and not is_the_store(mirror):
        tags |= tracking_mirror.open_run(mirror, params, run_name, display_name, experiment_path, user, parent_tags)
    run = client().create_run(experiment_id, run_name=display_name or run_name,
                              tags=tags | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}))
    client().log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items() if v is not None
    ])
    return experiment_id, run.info.run_id


def end_run(mlflow_run_id: str, status: str) -> None:
    """End a run's MLflow run (FINISHED, FAILED, KILLED), and its twin on the run's own tracking server."""
    mlflow_client = client()
    mlflow_client.set_terminated(mlflow_run_id, status)
    tracking_mirror.end_run(mlflow_client.get_run(mlflow_run_id).data.tags, status)


def refused(error: mlflow.exceptions.MlflowException) -> bool:
    """Whether a shared server's basic-auth app refused this account (403); its refusals may come as text."""
    return error.get_http_status_code() == 403 or "error code 403" in error.message


def _other_owner(mlflow_run_id: str) -> str | None:
    """The MLflow account that owns the run, when it is not this process's own account on a tracking server."""
    owner = client().get_run(mlflow_run_id).data.tags.get(OWNER_TAG)
    serves = tracking_uri().startswith(("http://", "https://"))  # accounts exist only on a server
    return owner if serves and owner != os.environ.get("MLFLOW_TRACKING_USERNAME") else None


def check_owner_may_register(registered_name: str, mlflow_run_id: str, setting: str) -> None:
    """Refuse, before anything trains, a run whose owner may not add versions to `registered_name`, a model that
    already exists: a worker's account registers every user's models, so the shared server cannot refuse it itself."""
    if not (owner := _other_owner(mlflow_run_id)):
        return
    try:
        client().get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return  # a new model: registered, it is granted to the owner
        raise
    from mlflow.server import get_app_client
    from mlflow.server.auth.permissions import get_permission

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri())
    try:
        if auth.get_user(owner).is_admin:
            return
        # The permission the server itself would apply: the owner's grant, a role's, or the server's default.
        permission = auth.get_user_permission(owner, "registered_model", registered_name).permission
    except mlflow.exceptions.MlflowException as e:
        if e.get_http_status_code() == 404:  # a server without the basic-auth app: every account may write
            return
        raise
    if not get_permission(permission).can_update:
        raise InvalidInputError(f"{setting} {registered_name} is a registered model that the MLflow account {owner} "
                                f"may not add versions to ({permission}): register to a model of your own, or ask "
                                "its owner for EDIT on it")


def grant_owner(registered_name: str, mlflow_run_id: str) -> None:
    """Give the account that created the run MANAGE on the model registered from it: on an MLflow server with the
    basic-auth app, the model belongs to the worker's account that registered it, and nobody else may read it."""
    if not (owner := _other_owner(mlflow_run_id)):
        return
    from mlflow.server import get_app_client

    try:
        get_app_client("basic-auth", tracking_uri=tracking_uri()).grant_user_permission(
            owner, "registered_model", registered_name, "MANAGE")
    except mlflow.exceptions.MlflowException as e:
        # Granted with an earlier version; or a server without the basic-auth app, where there is nothing to grant.
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS) and e.get_http_status_code() != 404:
            raise
