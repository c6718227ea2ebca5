"""Scheduled retraining as a Prefect flow: keep a registered model's @champion current as its data grows.

Each run looks at what the training source holds now against what the last retraining saw; with nothing new it
ends at once (RETRAIN_SKIPPED). Otherwise it trains a challenger as a finetune run (a subflow, its MLflow run nested
under the retraining's), judges champion and challenger on the same frozen eval set, and moves @champion only when
the challenger's eval loss beats the champion's by min_improvement (RETRAIN_PROMOTED; else RETRAIN_REJECTED, and the
challenger's version is tagged rejected); a DPO model's, when its preference accuracy on the eval pairs does (its DPO
loss breaking a tie). What it saw is recorded only once it has judged, so a retraining that
fails leaves the new data new for the next one.

Each scheduled model has its own deployment, `retrain/<model>`, whose parameters are its settings
(client/retraining.py); `retrain/default` runs the settings it is given.
"""

import time

import mlflow
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from flows.lifecycle import (
    FlowKind,
    begin,
    child_run,
    end_hooks,
    start_child,
    stop_children,
)
from tasks.config import RunConfig
from tasks.data.increments import Inventory, gather, take_inventory
from tasks.errors import InvalidInputError, TesseraError
from tasks.events import RunEvent, emit, flush
from tasks.flow_runs import RunStatus, under_way
from tasks.judge import Verdict, judge
from tasks.prefect_api import prefect_client
from tasks.process_group import exit_with_parent
from tasks.retraining import (
    CHALLENGER_TAG,
    CHAMPION,
    OUTCOME_TAG,
    RetrainConfig,
    champion,
    configure_retraining,
    experiment_path,
)
from tasks.retries import retryable
from tasks.run_record import (
    RETRAIN_TAG,
    RunRecord,
    cancelled_while_starting,
    challenger_tag,
    retrain_tags,
)
from tasks.tracking import check_owner_may_register, client, end_run
from tasks.training.checkpoint_names import LATEST
from tasks.upload_checkpoints import checkpoints_uri

POLL_S = 1.0  # how often the challenger's run is looked at
SEEN = "tessera.retrain.seen"  # registered-model tag: the MLflow run of the last retraining that judged
INVENTORY = "retrain/inventory.json"  # that run's artifact: what the source held when it looked


class ChallengerFailed(TesseraError):
    """The challenger's run did not complete: nothing to judge, the champion stays."""

    retryable = False


def _stop_challenger(record: RunRecord, cancelled: bool) -> str:
    """However it ends early, stop the challenger's run. The champion is unchanged, and what was new stays new for
    the next retraining."""
    stopped = "; its challenger run was stopped" if stop_children(RETRAINING, record) else ""
    return stopped + ("; the champion is unchanged" if cancelled else "")


RETRAINING = FlowKind(
    "retraining", "retrain", stop=_stop_challenger, children=challenger_tag,
    tags=lambda user, experiment_id, config: retrain_tags(user, experiment_id, config.retrain.registered_model),
    experiment=lambda config, name, user: experiment_path(config, user))


# Parameters arrive as JSON and are checked by configure_retraining, as fm.schedule_retraining() checks them.
@flow(name="retrain", validate_parameters=False, **end_hooks(RETRAINING))
def retrain(config: RetrainConfig, run_name: str | None = None, mlflow_run_id: str | None = None) -> dict:
    """Train a challenger on what is new, judge it against the champion on the frozen eval set, promote the better.

    Args:
        config: The recipe each challenger is trained with, and its `retrain` section.
        run_name: Set by fm.retrain_now(); empty, the retraining names itself.
        mlflow_run_id: Set by fm.retrain_now(); empty, the retraining starts its own MLflow run.
    """
    if cancelled_while_starting():
        return Cancelled(message="cancelled before it started")
    config = configure_retraining(config, called=None)
    record = begin(RETRAINING, config, run_name, mlflow_run_id)
    exit_with_parent(lambda: None)  # its runs have watchdogs of their own
    settings, source = config.retrain, config.run.train_data_path
    model = settings.registered_model
    emit(record.name, RunEvent.STARTED, f"retraining {record.name} of {model} started ({settings.mode})")
    check_owner_may_register(model, record.mlflow_run_id, config.name_of("retrain.registered_model"))
    if other := _another_retraining(record, model):
        emit(record.name, RunEvent.RETRAIN_SKIPPED, f"retraining {other} of {model} is still running: this one "
             "trains nothing, and what is new stays new for the next", registered_model=model)
        return _completed(record, None, model, "skipped")

    now, new = find_new(config)
    if not new:
        emit(record.name, RunEvent.RETRAIN_SKIPPED, f"nothing new in {source} since the last retraining "
             f"({len(now.files)} file(s) seen): nothing trained, {model}@{CHAMPION} unchanged", registered_model=model)
        return _completed(record, now, model, "skipped")

    incumbent = champion(model)
    continuing = settings.mode == "continue" and incumbent is not None
    files = new if continuing else sorted(now.files)
    train_file = gather(source, files, record.dir / "train.jsonl", config.name_of("run.train_data_path"))
    weights = champion_checkpoint(incumbent) if continuing else None
    start = f"the champion (version {incumbent.version})" if continuing else config.run.model_name_or_path
    challenger_run, version = train_challenger(record, config.challenger(str(train_file), weights),
                                               f"{len(files)} file(s) from {start}")

    verdict = judge(record, config, version, int(incumbent.version) if incumbent else None)
    outcome = decide(record, config, incumbent, challenger_run, version, verdict)
    return _completed(record, now, model, outcome, version=version)


@task(name="find-new-data", retries=2, retry_delay_seconds=10, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def find_new(config: RetrainConfig) -> tuple[Inventory, list[str]]:
    """What the training source holds now, and which of its files the last retraining did not see."""
    now = take_inventory(config.run.train_data_path, config.name_of("run.train_data_path"))
    return now, now.new_since(last_inventory(config.retrain.registered_model))


@task(name="decide", cache_policy=NO_CACHE)
def decide(record: RunRecord, config: RetrainConfig, incumbent, challenger_run: str, version: int,
           verdict: Verdict) -> str:
    """Promote the challenger if it beats the champion by more than min_improvement (or there is none), else tag
    it rejected; say which with both sides' figures. Returns "promoted" or "rejected"."""
    model, margin = config.retrain.registered_model, config.retrain.min_improvement
    figures = {**verdict.figures(), "registered_model": model, "version": version,
               "champion_version": int(incumbent.version) if incumbent else None}
    current = champion(model)
    moved = (current and current.version) != (incumbent and incumbent.version)  # by hand, while this one ran
    won, on = verdict.beats(margin) if incumbent else (True, "")
    promoted = not moved and won
    _tag_version(model, version, record.name, "promoted" if promoted else "rejected", verdict)
    against = (f"the champion's {verdict.said('champion')} (version {incumbent.version}){f' on {on}' if on else ''}"
               f" by more than {margin:g}" if incumbent else "")
    if promoted:
        client().set_registered_model_alias(model, CHAMPION, str(version))
        emit(record.name, RunEvent.RETRAIN_PROMOTED, f"{model} version {version} ({challenger_run}) promoted to "
             f"@{CHAMPION}: {verdict.said('challenger')} " + (f"beats {against}" if incumbent else
                                                               "the first champion"), **figures)
        return "promoted"
    why = (f"@{CHAMPION} moved to version {current.version if current else None} while it trained" if moved else
           f"{verdict.said('challenger')} does not beat {against}")
    emit(record.name, RunEvent.RETRAIN_REJECTED, f"{model} version {version} ({challenger_run}) rejected: {why}; "
         "the champion stays", **figures)
    return "rejected"


def _tag_version(model: str, version: int, retraining: str, outcome: str, verdict: Verdict) -> None:
    """The outcome on the challenger's version, with both sides' figures: tessera.eval_loss and
    tessera.champion_eval_loss (and, judged on pairs, tessera.eval_accuracy and tessera.champion_eval_accuracy)."""
    tags = {OUTCOME_TAG: outcome, "tessera.retraining": retraining}
    for name, value in verdict.challenger.items():
        tags |= {f"tessera.{name}": str(value), f"tessera.champion_{name}": str((verdict.champion or {}).get(name))}
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model, str(version), key, value)


def last_inventory(registered_model: str) -> Inventory | None:
    """What the source held when the last retraining of the model judged (None: never, or its record is gone)."""
    try:
        seen = client().get_registered_model(registered_model).tags.get(SEEN)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):  # no such model yet
            return None
        raise
    if not seen:
        return None
    try:
        return Inventory.from_json(mlflow.artifacts.load_text(f"runs:/{seen}/{INVENTORY}"))
    except mlflow.exceptions.MlflowException:
        get_run_logger().warning(f"the record of what the last retraining saw (MLflow run {seen}, {INVENTORY}) is "
                                 "gone: every file counts as new")
        return None


def _another_retraining(record: RunRecord, model: str) -> str | None:
    """The name of another retraining of the model still under way (a schedule firing while one runs, or
    retrain_now): two at once would train on the same new data and race for @champion. The runs its schedule holds
    for later are not under way (under_way leaves them out): taken for retrainings, no scheduled model would train."""
    with prefect_client() as prefect:
        active = under_way(prefect, [RETRAIN_TAG, f"model:{model}"], limit=10)
    return next((r.name for r in active if str(r.id) != record.flow_run_id), None)


def champion_checkpoint(version) -> str:
    """The latest checkpoint of the champion's run: in its run folder on this machine, else in the artifact store."""
    run_name = version.tags.get("tessera.run_name")
    if run_name is None:
        raise InvalidInputError(f"the champion, version {version.version}, was not trained by Tessera (no "
                                "tessera.run_name tag), so there is no checkpoint to continue from: set retrain.mode "
                                "to from_base")
    record = RunRecord.load(run_name)
    if record is not None and (record.checkpoints / LATEST).exists():
        return str(record.checkpoints / LATEST)
    return f"{checkpoints_uri(version.run_id, run_name)}/{LATEST}"


def train_challenger(record: RunRecord, config: RunConfig, what: str) -> tuple[str, int]:
    """The challenger as a finetune run (a subflow, its MLflow run nested under the retraining's), waited for;
    returns its name and its registered version."""
    name = f"{record.name}-challenger"
    mlflow_run_id = start_child(RETRAINING, record, config, name)
    client().set_tag(record.mlflow_run_id, CHALLENGER_TAG, name)
    emit(record.name, RunEvent.TRAIN_UPDATED, f"challenger run {name} started on {what}", run=name)
    while not (status := RunStatus.of(run := child_run(name))).is_terminal():
        time.sleep(POLL_S)
    if status != RunStatus.COMPLETED:
        raise ChallengerFailed(f"challenger run {name} ended {status.value}: {run.state.message or 'see its events'}; "
                               f"the champion is unchanged and the new data stays new for the next retraining")
    versions = client().search_model_versions(f"name='{config.run.register_to}' and run_id='{mlflow_run_id}'")
    return name, int(versions[0].version)


def _completed(record: RunRecord, now: Inventory | None, model: str, outcome: str, **payload) -> dict:
    """Record what the source held (once judged, or found with nothing new) and end the run."""
    mlflow_client = client()
    if now is not None:
        mlflow_client.log_text(record.mlflow_run_id, now.to_json(), INVENTORY)
    mlflow_client.set_tag(record.mlflow_run_id, OUTCOME_TAG, outcome)
    if outcome != "skipped":  # a skip saw nothing the last record lacks, or did not look
        mlflow_client.set_registered_model_tag(model, SEEN, record.mlflow_run_id)
    end_run(record.mlflow_run_id, "FINISHED")
    emit(record.name, RunEvent.COMPLETED, f"retraining {record.name} completed: {outcome}", outcome=outcome,
         registered_model=model, **payload)
    flush()  # on the server before the flow run's state says COMPLETED
    return {"run_name": record.name, "outcome": outcome, "registered_model": model, **payload}

