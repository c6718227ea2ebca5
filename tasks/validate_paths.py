"""Step 1: every path and name the run refers to exists, before any compute is spent."""

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig, TaskType
from tasks.data.sources import local_path
from tasks.errors import InvalidInputError
from tasks.models import check_model

DEFAULT_MAX_CONTEXT = 8192


def _local(uri: str, field: str) -> Path:
    try:
        return local_path(uri)
    except InvalidInputError as e:  # name the argument the user got wrong
        raise InvalidInputError(f"{field} {e}") from None


def check_paths(config: RunConfig) -> RunConfig:
    """The config with its context length resolved, or an InvalidInputError saying what to fix."""
    max_context = check_model(config.model)
    train = _local(config.train_data_path, "train_data_path")
    _check_data(train, "train_data_path", config.task_type)
    if config.eval_data_path:
        _check_data(_local(config.eval_data_path, "eval_data_path"), "eval_data_path", config.task_type)
    if config.custom_weights_path and not Path(config.custom_weights_path).expanduser().exists():
        raise InvalidInputError(
            f"custom_weights_path {config.custom_weights_path} does not exist: pass a checkpoint folder "
            "as get_checkpoints() returns it"
        )
    if config.context_length is None:
        return replace(config, context_length=min(DEFAULT_MAX_CONTEXT, max_context))
    if config.context_length > max_context:
        raise InvalidInputError(
            f"context_length {config.context_length} exceeds the maximum of {config.model} ({max_context}): "
            f"pass context_length={max_context} or less"
        )
    return config


def _check_data(path: Path, field: str, task_type: str) -> None:
    if not path.exists():
        raise InvalidInputError(f"{field} {path} does not exist: check the path")
    if task_type == TaskType.CONTINUED_PRETRAIN:
        return  # a .txt file or a folder of them; validate_data reads it
    if path.is_dir():
        raise InvalidInputError(f"{field} {path} is a folder: {task_type} takes one .jsonl file")


@task(name="validate-paths", cache_policy=NO_CACHE)
def validate_paths(config: RunConfig) -> RunConfig:
    """Check the model, data and checkpoint paths; resolve the context length."""
    return check_paths(config)
