"""Step 1: every path and name the run refers to exists, before any compute is spent."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.custom_weights import check_custom_weights
from tasks.data.sources import check_data_path
from tasks.models import context_length_for
from tasks.run_record import RunRecord
from tasks.tracking import check_owner_may_register, client


def check_paths(config: RunConfig) -> RunConfig:
    """The config with its context length resolved, or an InvalidInputError naming the setting to fix."""
    run = config.run
    for path in ("run.train_data_path", "run.eval_data_path"):
        if uri := getattr(run, path.split(".")[1]):
            check_data_path(uri, config.name_of(path), run.task_type)
    if run.custom_weights_path:
        check_custom_weights(run.custom_weights_path, config.name_of("run.custom_weights_path"))
    length = context_length_for(run.model_name_or_path, config.training_config.max_length,
                                config.name_of("training_config.max_length"))
    return config.replace({"training_config.max_length": length})


@task(name="validate-paths", cache_policy=NO_CACHE)
def validate_paths(record: RunRecord, config: RunConfig) -> RunConfig:
    """Check the model, data and checkpoint paths, and that the run's owner may register to its model; resolve the
    context length; keep the resolved config."""
    config = check_paths(config)
    check_owner_may_register(config.registered_model_name(record.name), record.mlflow_run_id,
                             config.name_of("run.register_to"))
    client().log_dict(record.mlflow_run_id, config.to_recipe(), "config/resolved.yaml")  # a recipe that reruns it
    return config
