"""Step 5: put the run's checkpoints in its MLflow artifact store (S3, a server, or a folder of this machine, where
they are hard-linked) and verify them."""

import os
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import TesseraError
from tasks.run_record import RunRecord
from tasks.tracking import client, local_path
from tasks.training.checkpoint_names import LATEST, complete_checkpoints


def artifact_dir(run_name: str) -> str:
    return f"{run_name}/checkpoints"


def checkpoints_uri(mlflow_run_id: str, run_name: str) -> str:
    """Where the run's checkpoints are uploaded: under artifact_dir in its MLflow run's artifacts."""
    return f"{client().get_run(mlflow_run_id).info.artifact_uri.rstrip('/')}/{artifact_dir(run_name)}"


@task(name="upload-checkpoints", retries=3, retry_delay_seconds=10, cache_policy=NO_CACHE)
def upload_checkpoints(record: RunRecord) -> list[str]:
    """Upload every checkpoint folder; the latest symlink travels as a text file naming its target."""
    mlflow_client, run_id = client(), record.mlflow_run_id
    root = record.checkpoints
    dest = artifact_dir(record.name)
    local = local_path(mlflow_client.get_run(run_id).info.artifact_uri)  # a folder of this machine (the default's)
    for child in sorted(root.iterdir()):
        if child.name == LATEST:
            # Object stores have no symlinks; like Composer, store the target's name in a file.
            marker = record.logs / LATEST
            marker.write_text(child.resolve().name)
            mlflow_client.log_artifact(run_id, str(marker), dest)
        elif child.is_dir() and local is not None:  # the layout MLflow's local store writes, without a second copy
            shutil.copytree(child, local / dest / child.name, copy_function=_link, dirs_exist_ok=True)
        elif child.is_dir():
            mlflow_client.log_artifacts(run_id, str(child), f"{dest}/{child.name}")
    _verify(mlflow_client, run_id, root, dest)
    uploaded = checkpoints_uri(run_id, record.name)
    return [f"{uploaded}/{p.name}" for p in complete_checkpoints(root)]


def _link(source: str, target: str) -> None:
    """A hard link: a checkpoint's files never change once written, and a store on the same disk (the embedded
    default's) would otherwise hold every run's GBs twice. A copy where links cannot be made (another disk)."""
    if os.path.exists(target):
        if os.path.samefile(source, target):  # linked by an earlier attempt of this task
            return
        os.unlink(target)  # an earlier attempt's copy, perhaps partial
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _verify(mlflow_client, run_id: str, root: Path, dest: str) -> None:
    """Every local file is in the store with the same size."""
    local = {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and LATEST not in p.parts
    }
    remote: dict[str, int] = {}
    pending = [dest]
    while pending:
        for info in mlflow_client.list_artifacts(run_id, pending.pop()):
            if info.is_dir:
                pending.append(info.path)
            else:
                remote[info.path.removeprefix(dest + "/")] = info.file_size
    missing = {name for name, size in local.items() if remote.get(name) != size}
    if missing:
        raise TesseraError(f"{len(missing)} checkpoint files did not reach the artifact store intact, e.g. {sorted(missing)[:3]}")
