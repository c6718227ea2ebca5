"""A run's own MLflow tracking server (run.mlflow_tracking_uri, Nova's key), logged to as Nova's trainer (Lightning's
MLFlowLogger) logs to one: the run's parameters as it starts, its metrics as they come, its end. Tessera's store keeps
the run of record (checkpoints, registered model) that the API, serving, sweeps and retraining read.

Tessera's own MLflow login (MLFLOW_TRACKING_USERNAME, ...) is never sent to this server: a URL named in a recipe is
no place for it. A server that asks for one gets the login ~/.netrc holds for its host (requests reads it)."""

import logging
import time
from functools import cache, partial

import requests
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils import chunk_list
from mlflow.utils.rest_utils import MlflowHostCreds, http_request
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from tasks.errors import InvalidInputError

SETTING = "run.mlflow_tracking_uri"
URI_TAG, RUN_ID_TAG = "tessera.mirror.uri", "tessera.mirror.run_id"  # on the run of record: where its twin is
log = logging.getLogger(__name__)


@cache
def _store(url: str) -> RestStore:
    return RestStore(partial(MlflowHostCreds, url))  # host only: no login of Tessera's


def open_run(url: str, params: dict, run_name: str, display_name: str | None, experiment: str, user: str,
             parent_tags: dict[str, str]) -> dict[str, str]:
    """Start the run's twin on `url` with its parameters (nested under the parent's twin, if the parent has one);
    returns the tags that find it from the run of record. A server that does not answer or refuses is a typed
    error, before anything is spent."""
    store = _store(url)
    try:
        # Once, without MLflow's retries (minutes of back-off): a wrong URL is said at once.
        http_request(store.get_host_creds(), "/health", "GET", max_retries=0, timeout=10).raise_for_status()
        tags = {"mlflow.user": user, "tessera.run_name": run_name}
        if parent := parent_tags.get(RUN_ID_TAG):
            tags["mlflow.parentRunId"] = parent
        run = store.create_run(_experiment(store, experiment), user, int(time.time() * 1000),
                               [RunTag(k, v) for k, v in tags.items()], display_name or run_name)
        for batch in chunk_list([Param(k, str(v)[:6000]) for k, v in params.items() if v is not None],
                                MAX_PARAMS_TAGS_PER_BATCH):
            store.log_batch(run.info.run_id, [], batch, [])
    except (MlflowException, requests.RequestException) as e:
        reason = e.message if isinstance(e, MlflowException) else str(e)
        raise InvalidInputError(f"{SETTING} {url}: the MLflow server there did not take the run ({reason[:300]}): "
                                "start it, correct the URL, or remove the key") from None
    return {URI_TAG: url, RUN_ID_TAG: run.info.run_id}


def _experiment(store: RestStore, name: str) -> str:
    if (experiment := store.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return store.create_experiment(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return store.get_experiment_by_name(name).experiment_id  # another run created it meanwhile


def log_metrics(tags: dict[str, str], metrics: list) -> None:
    """Metrics of the run whose tags these are, to its twin, in the background: a slow or stopped server never
    holds training up (MLflow's async queue logs what it could not send)."""
    if URI_TAG in tags:
        _store(tags[URI_TAG]).log_batch_async(tags[RUN_ID_TAG], metrics, [], [])


def end_run(tags: dict[str, str], status: str) -> None:
    """End the twin of the run whose tags these are (its metrics sent first), if it has one. A server gone by
    then is logged, not raised: the run of record has ended, and holds everything."""
    if URI_TAG not in tags:
        return
    store = _store(tags[URI_TAG])
    try:
        store.flush_async_logging()
        store.update_run_info(tags[RUN_ID_TAG], RunStatus.from_string(status), int(time.time() * 1000), None)
    except (MlflowException, requests.RequestException) as e:
        log.warning("%s %s: could not end run %s there as %s: %s", SETTING, tags[URI_TAG], tags[RUN_ID_TAG], status, e)
