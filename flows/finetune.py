"""One fine-tuning run as a Prefect flow: the six steps in plain order, and hooks for the ways it can end."""

from prefect import flow
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled

from flows.lifecycle import STOPPED_UNDER, FlowKind, begin, end_hooks
from tasks.arguments import takes_arguments
from tasks.config import RunConfig
from tasks.events import RunEvent, emit
from tasks.init_model import init_model
from tasks.process_group import exit_with_parent
from tasks.recipe import configure
from tasks.register_model import register_model
from tasks.run_record import RunRecord, cancelled_while_starting, run_tags
from tasks.tracking import end_run, experiment_for
from tasks.train import kill_worker, train
from tasks.training.checkpoint_names import complete_checkpoints
from tasks.upload_checkpoints import upload_checkpoints
from tasks.validate_data import validate_data
from tasks.validate_paths import validate_paths


def _stop_worker(record: RunRecord, cancelled: bool) -> str:
    if kill_worker(record):
        return "; the training worker was stopped, checkpoints and logs are kept in " + str(record.dir)
    return ""


RUN = FlowKind("run", None, tags=lambda user, experiment_id, config: run_tags(user, experiment_id),
               experiment=experiment_for, stop=_stop_worker)


# Parameters arrive as JSON and are checked by `configure`, which words errors as the user wrote the setting;
# the Prefect server and UI check them against the schema of these types before a run is created.
@flow(name="finetune", validate_parameters=False, **end_hooks(RUN))
@takes_arguments
def finetune(config: RunConfig | None = None, run_name: str | None = None, mlflow_run_id: str | None = None,
             register: bool = True, **arguments) -> dict:
    """Fine-tune a model on a data set and register the result.

    Args:
        config: The whole run, laid out as a recipe (run, training_config).
        run_name: Set by create(); empty, the run names itself.
        mlflow_run_id: Set by create(); empty, the run starts its own MLflow run.
        register: Off for a sweep's trials: the sweep registers its best.
        arguments: The anchor's create() arguments (tasks/arguments.py), named in the form: each sets its setting
            in config, or they make the whole config without one.
    """
    if cancelled_while_starting():
        return Cancelled(message="cancelled before it started")
    # Keys of `config` are named by their path in errors; the arguments by their own names.
    config = configure(config, shorthands=arguments, called=None)
    record = begin(RUN, config, run_name, mlflow_run_id)
    exit_with_parent(lambda: kill_worker(record, now=True))
    emit(record.name, RunEvent.STARTED, f"run {record.name} started")
    if current_flow_run.run_count > 1:  # scheduled again after the services stopped under it (deployments/interrupted.py)
        done = complete_checkpoints(record.checkpoints)
        emit(record.name, RunEvent.RESUMED, f"resumed after {STOPPED_UNDER}: " + (
            f"training continues from checkpoint {done[-1].name}" if done else
            "it had no checkpoint yet, so its training starts again"), checkpoint=done[-1].name if done else None)

    config = validate_paths(record, config)
    train_rows = validate_data(record, config, "train")
    eval_rows = validate_data(record, config, "eval") if config.run.eval_data_path else None
    model_dir, init_from = init_model(record, config)
    hf_dir = train(record, config, model_dir, train_rows, eval_rows, init_from)
    upload_checkpoints(record)
    if not register:
        return _completed(record, f"run {record.name} completed (not registered: a sweep registers its best)")
    version = register_model(record, config, hf_dir)

    registered = config.registered_model_name(record.name)
    return _completed(record, f"run {record.name} completed: registered {registered} version {version}",
                      registered_model=registered, version=version)


def _completed(record: RunRecord, message: str, **payload) -> dict:
    end_run(record.mlflow_run_id, "FINISHED")
    emit(record.name, RunEvent.COMPLETED, message, **payload)
    return {"run_name": record.name, **payload}

