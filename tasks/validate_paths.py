"""Step 1: every path and name the run refers to exists, before any compute is spent."""

from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig, TaskType
from tasks.custom_weights import check_custom_weights
from tasks.errors import InvalidInputError
from tasks.models import check_model
from tasks.storage import check_data_path

DEFAULT_MAX_CONTEXT = 8192


def check_paths(config: RunConfig) -> RunConfig:
    """The config with its context length resolved, or an InvalidInputError saying what to fix."""
    max_context = check_model(config.model)
    task_type = TaskType(config.task_type)
    check_data_path(config.train_data_path, "train_data_path", task_type)
    if config.eval_data_path:
        check_data_path(config.eval_data_path, "eval_data_path", task_type)
    if config.custom_weights_path:
        check_custom_weights(config.custom_weights_path)
    if config.context_length is None:
        return replace(config, context_length=min(DEFAULT_MAX_CONTEXT, max_context))
    if config.context_length > max_context:
        raise InvalidInputError(
            f"context_length {config.context_length} exceeds the maximum of {config.model} ({max_context}): "
            f"pass context_length={max_context} or less"
        )
    return config


@task(name="validate-paths", cache_policy=NO_CACHE)
def validate_paths(config: RunConfig) -> RunConfig:
    """Check the model, data and checkpoint paths; resolve the context length."""
    return check_paths(config)
