"""Who may see and touch what through `tessera serve`: the one rule every route and protocol asks.

With API keys, a request acts as the user its key names, and that user
- sees, follows and stops the runs they created, and no other (their events, checkpoints, MLflow runs, artifacts);
- reads and deletes the files they uploaded;
- sees the MLflow experiments in their folder `/Users/<user>/`, those holding a run of theirs, and the `/Shared/` ones,
  and makes experiments anywhere but in another user's folder;
- uses (lists, chats with, fine-tunes from) a registered model they own, the creator of the run of its first version,
  or one its owner has shared with them: the model's tag `tessera.shared_with`, emails separated by commas or `*` for
  every user. Only the owner adds versions to a model or changes it;
- names as a path only what is theirs, their uploaded files and their runs' folders and artifacts, or what is the
  team's: volumes (`dbfs:/Volumes/...`), tables, Hugging Face datasets, S3 outside the files root; and as a base
  model a catalog name or a folder under TESSERA_MODELS_ROOT.
What a user may not see is answered as absent, so an answer tells nothing of what exists.
Without keys the server answers this machine only, as its one user, and the rule lets everything through.
"""

import re
from pathlib import Path

from mlflow.exceptions import MlflowException

from api.openai import files
from client import runs
from tasks.custom_weights import DATABRICKS_ARTIFACT, store_uri
from tasks.data.sources import local_path
from tasks.errors import InvalidInputError
from tasks.home import files_root, models_root, runs_dir
from tasks.models import CATALOG
from tasks.run_record import ACTING_USER, RunRecord, current_user
from tasks.tracking import client

SHARED_WITH = "tessera.shared_with"  # registered-model tag: who else may use it ("a@x.com,b@y.com" or "*")
SHARED_FOLDER = "/Shared/"
# An MLflow run's artifacts in any store: .../<experiment id>/<run id>/artifacts/<path>, or runs:/<run id>/<path>.
_ARTIFACT = re.compile(r"(?:^runs:/([0-9a-f]{32})(?:/|$))|(?:/([0-9a-f]{32})/artifacts(?:/|$))")
_PLACES = ("a file you uploaded (/v1/files), a checkpoint or folder of one of your runs, a volume "
           "(dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>), a table, a Hugging Face dataset or s3://bucket/key")


def keyed() -> bool:
    """Whether the request acts as a key's user (else this machine's one user, to whom everything is open)."""
    return ACTING_USER.get() is not None


def owns(created_by: str | None) -> bool:
    return not keyed() or created_by == current_user()


def _quoted(value: str) -> bool:
    """Whether `value` could break out of an MLflow filter's quotes."""
    return "'" in value or "\\" in value


# --- runs --------------------------------------------------------------------------------------------------------


def run_owners(emails: list[str] | None) -> list[str] | None:
    """The creators whose runs a listing may show: the ones asked for (None: all), narrowed to the caller under keys;
    [] when the caller asked for other users' runs only."""
    if not keyed():
        return emails
    return [current_user()] if emails is None or current_user() in emails else []


def visible_run(name: str) -> runs.TrainingRun:
    """The run `name`, if the caller may see it; another user's is as absent as one that never was."""
    run = runs.get(name)
    if not owns(run.created_by):
        raise runs.RUN.not_found(name)
    return run


def owns_mlflow_run(run_id: str) -> bool:
    """Whether the MLflow run is the caller's (its creator, tag mlflow.user); a missing run is nobody's."""
    if not keyed():
        return True
    try:
        return client().get_run(run_id).data.tags.get("mlflow.user") == current_user()
    except MlflowException:
        return False


# --- MLflow experiments and registered models ----------------------------------------------------------------------


def sees_experiment(name: str, experiment_id: str) -> bool:
    me = current_user()
    if not keyed() or name.startswith((f"/Users/{me}/", SHARED_FOLDER)):
        return True
    if _quoted(me):
        return False
    return bool(client().search_runs([experiment_id], f"tags.`mlflow.user` = '{me}'", max_results=1))


def may_create_experiment(name: str) -> bool:
    """Any folder but another user's `/Users/<user>/` (the runs in it stay their creators' either way)."""
    return not keyed() or not name.startswith("/Users/") or name.startswith(f"/Users/{current_user()}/")


def model_owner(name: str) -> str | None:
    """Who created the run of the model's first version (None: no such model, or not made by a run)."""
    if _quoted(name):
        return None
    try:
        first = client().search_model_versions(f"name = '{name}'", order_by=["version_number ASC"], max_results=1)
        return client().get_run(first[0].run_id).data.tags.get("mlflow.user") if first and first[0].run_id else None
    except MlflowException:
        return None


def may_use_model(name: str, tags: dict[str, str] | None = None) -> bool:
    """Whether the caller may list, serve or fine-tune from the registered model `name` (`tags`: its tags, if read
    already)."""
    if not keyed():
        return True
    if tags is None:
        try:
            tags = client().get_registered_model(name).tags
        except MlflowException:
            return False
    shared = {who.strip() for who in tags.get(SHARED_WITH, "").split(",")}
    return current_user() in shared or "*" in shared or model_owner(name) == current_user()


def may_change_model(name: str) -> bool:
    """Whether the caller may add versions to the registered model `name`, or change it: a model that does not
    exist yet is anybody's to make."""
    if not keyed():
        return True
    owner = model_owner(name)
    if owner is None:
        try:
            client().get_registered_model(name)
        except MlflowException:
            return True  # nothing there yet: a run of the caller's makes it
    return owner == current_user()


# --- paths a user names ---------------------------------------------------------------------------------------------


def check_data_path(uri: str | None, setting: str) -> None:
    """Refuse a data path that is not the caller's or the team's (see the module's rule)."""
    if not keyed() or uri is None:
        return
    if not _yours(uri, setting, shared_ok=True):
        raise _not_yours(setting, uri)


def check_custom_weights(uri: str | None, setting: str = "custom_weights_path") -> None:
    """Refuse a checkpoint that is not one of the caller's runs'."""
    if not keyed() or uri is None:
        return
    if not _yours(store_uri(uri), setting, shared_ok=False):
        raise _not_yours(setting, uri)


def check_model(model: str, setting: str = "model") -> None:
    """Refuse a base model that is neither a catalog name nor a folder under TESSERA_MODELS_ROOT or of a run of the
    caller's."""
    if not keyed() or model in CATALOG:
        return
    path = Path(model).expanduser().resolve()
    root = models_root()
    if not ((root and path.is_relative_to(root)) or _owned_local(path)):
        raise InvalidInputError(f"{setting} {model!r} is not a model this server offers you: name a catalog model "
                                "(GET /v1/models, fm.get_models())" + (
                                    f" or a folder under the server's models root {root}" if root else ""))


def check_register_to(name: str | None, setting: str = "register_to") -> None:
    """Refuse registering to another user's model: only its owner adds versions."""
    if name and name.count(".") == 2 and not may_change_model(name):
        raise InvalidInputError(f"{setting} {name} is another user's registered model: register to a model of your "
                                "own (a new name), or ask its owner to register for you")


def _yours(uri: str, setting: str, shared_ok: bool) -> bool:
    if match := _ARTIFACT.search(uri):
        return owns_mlflow_run(match[1] or match[2])
    root = files_root()
    if uri.startswith("s3://"):
        if root.startswith("s3://") and uri.startswith(root + "/"):
            return _owns_file(uri.removeprefix(root + "/").split("/", 1)[0])
        return shared_ok
    if DATABRICKS_ARTIFACT.match(uri) or "://" in uri.removeprefix("file://"):
        return False  # another store's URI that names no run of the caller's
    path = local_path(uri, setting)
    return _owned_local(path) if path is not None else shared_ok


def _owned_local(path: Path) -> bool:
    """Whether a local path lies in one of the caller's uploaded files or run folders."""
    uploads = files_root()  # both roots are resolved; on S3 the files root holds no local path (_yours asks of s3://)
    roots = [(runs_dir(), _owns_run_folder)] + ([] if uploads.startswith("s3://") else [(Path(uploads), _owns_file)])
    for root, owner in roots:
        if path.is_relative_to(root) and path != root:
            return owner(path.relative_to(root).parts[0])
    return False


def _owns_file(file_id: str) -> bool:
    meta = files.store().meta(file_id) if files.FILE_ID.match(file_id) else None
    return meta is not None and owns(meta["created_by"])


def _owns_run_folder(name: str) -> bool:
    record = RunRecord.load(name)
    return record is not None and owns_mlflow_run(record.mlflow_run_id)


def _not_yours(setting: str, uri: str) -> InvalidInputError:
    shown = uri if len(uri) <= 200 else f"{uri[:200]}... ({len(uri)} characters)"
    return InvalidInputError(f"{setting} {shown!r} is not yours to read through tessera serve: name {_PLACES}")

