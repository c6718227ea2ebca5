"""custom_weights_path: an earlier run's checkpoint, as get_checkpoints() names it, made local for the worker.

It is an `ep*-ba*` folder or the run's `latest-sharded-rank0.symlink`, given as a local path, a file:// URI, or any
URI MLflow's artifact repositories read (s3://, mlflow-artifacts:/, runs:/, ...), or as the databricks-genai SDK's
get_checkpoints() names it (`dbfs:/databricks/mlflow-tracking/<experiment id>/<run id>/artifacts/<path>`: that MLflow
run's artifact). In an artifact store the latest link is a small file naming its folder (see upload_checkpoints), so
it is followed by hand.
"""

import re
from pathlib import Path

import mlflow

from tasks.errors import InvalidInputError
from tasks.tracking import local_path
from tasks.training.checkpoint_names import LATEST, MODEL_STATES

# The Databricks form of an MLflow run's artifact root, the saveFolder the SDK sends and formats itself to name
# checkpoints (get_checkpoints), and those paths read back.
DATABRICKS_SAVE_FOLDER = "dbfs:/databricks/mlflow-tracking/{mlflow_experiment_id}/{mlflow_run_id}/artifacts"
DATABRICKS_ARTIFACT = re.compile(r"^dbfs:/databricks/mlflow-tracking/[0-9]+/([0-9a-f]+)/artifacts/(.+)$")
HOW = "pass a checkpoint as get_checkpoints() returns it (an ep*-ba* folder) or a run's " + LATEST


def check_custom_weights(uri: str, name: str = "custom_weights_path") -> None:
    """Refuse a path that is not there or not a checkpoint, before any compute; remote stores are listed, not read.
    `name`: the setting as the user wrote it."""
    uri = store_uri(uri)
    local = local_path(uri)
    if local is not None:
        if not local.exists():
            raise InvalidInputError(f"{name} {uri} does not exist: {HOW}")
        folder = _follow_local(local)
        if not any((folder / name).is_file() for name in MODEL_STATES):
            raise InvalidInputError(f"{name} {uri} is not a DeepSpeed checkpoint (no {MODEL_STATES[0]}): {HOW}")
        return
    try:
        entries = mlflow.artifacts.list_artifacts(artifact_uri=uri.rstrip("/"))
    except Exception as e:  # any store's error: missing bucket, no credentials, unknown scheme
        raise InvalidInputError(f"{name} {uri} cannot be read: {e}") from e
    if not uri.rstrip("/").endswith(LATEST) and not any(e.path.endswith(MODEL_STATES) for e in entries):
        raise InvalidInputError(f"{name} {uri} holds no DeepSpeed checkpoint (no {MODEL_STATES[0]}): {HOW}")


def fetch_custom_weights(uri: str, dest: Path) -> Path:
    """A local checkpoint folder for `uri`: the folder itself when it is local, else downloaded under `dest`."""
    uri = store_uri(uri)
    local = local_path(uri)
    if local is not None:
        return _follow_local(local)
    uri = uri.rstrip("/")
    if uri.endswith(LATEST):
        marker = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest / "latest"))
        uri = f"{uri.rsplit('/', 1)[0]}/{Path(marker).read_text().strip()}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def store_uri(uri: str) -> str:
    """The URI MLflow reads: the Databricks form becomes runs:/<run id>/<path>."""
    match = DATABRICKS_ARTIFACT.match(uri)
    return f"runs:/{match[1]}/{match[2]}" if match else uri


def _follow_local(path: Path) -> Path:
    """The folder a latest link names: a symlink in a run's folder, a text file in a local artifact store."""
    if path.name == LATEST and path.is_file() and not path.is_symlink():
        return path.parent / path.read_text().strip()
    return path.resolve()
