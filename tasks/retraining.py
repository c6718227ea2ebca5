"""Scheduled retraining: its settings (the recipe's `retrain` section) and the registry's champion.

    retrain:
      registered_model: main.demo.assistant   # the model whose @champion this keeps current
      mode: continue                          # continue: from the champion's checkpoint, on what is new;
                                              # from_base: run.model_name_or_path, on all the data
      min_improvement: 0.0                    # how much the challenger's eval loss must beat the champion's
                                              # (task_type DPO: its preference accuracy on the eval pairs)

The recipe's run.train_data_path is a source that grows (a folder or S3 prefix of .jsonl files, or a Delta table)
and run.eval_data_path the frozen set both models are judged on. Each challenger is a version of
`registered_model`; the alias `champion` marks the one in service.
"""

from typing import Any, Literal, Self

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from pydantic import Field, model_validator

from tasks.config import REGISTERED_MODEL, Rule, RunConfig, Section, TaskType
from tasks.data.increments import take_inventory
from tasks.data.sources import check_data_path
from tasks.errors import InvalidInputError
from tasks.models import context_length_for
from tasks.recipe import configure
from tasks.tracking import client, experiment_for, refused

CHAMPION = "champion"  # the alias of the version in service
OUTCOME_TAG = "tessera.retrain"  # promoted, rejected or skipped: on the retraining's MLflow run and the version
CHALLENGER_TAG = "tessera.challenger"  # on a retraining's MLflow run: its challenger's run


class Retrain(Section):
    """Which registered model to keep current, and how each challenger is trained and judged."""

    registered_model: str = Field(pattern=REGISTERED_MODEL, examples=["main.demo.assistant"])
    """catalog.schema.model: the model whose @champion this maintains; each challenger is a new version of it."""
    mode: Literal["continue", "from_base"] = "continue"
    """continue: from the champion's latest checkpoint, on the data added or changed since the last retraining;
    from_base: from run.model_name_or_path, on all the data. Without a champion both train from the base."""
    min_improvement: float = Field(0.0, ge=0, allow_inf_nan=False)
    """How far the challenger's eval loss must fall below the champion's for it to be promoted; for task_type DPO,
    how far its preference accuracy on the eval pairs must rise above the champion's (a share of the pairs), or,
    where the accuracies tie, its DPO loss fall below the champion's."""


class RetrainConfig(RunConfig):
    """A retraining: the recipe each challenger is trained with, and its `retrain` section."""

    retrain: Retrain

    @model_validator(mode="before")
    @classmethod
    def _registers_to_its_model(cls, data: Any) -> Any:
        """run.register_to left out: the registered model (a challenger is one of its versions)."""
        if isinstance(data, dict) and isinstance(data.get("retrain"), dict) and isinstance(data.get("run"), dict):
            model = data["retrain"].get("registered_model")
            if model is not None and data["run"].get("register_to") is None:
                data = {**data, "run": {**data["run"], "register_to": model}}
        return data

    @model_validator(mode="after")
    def _judged_on_frozen_data(self) -> Self:
        if self.run.eval_data_path is None:
            raise Rule("retraining needs {}: the frozen set champion and challenger are judged on",
                       "run.eval_data_path")
        if self.run.register_to != self.retrain.registered_model:
            raise Rule("{} must be {}: each challenger is a version of the model retraining maintains; leave "
                       "register_to out", "run.register_to", "retrain.registered_model")
        if self.run.task_type == TaskType.CONTINUED_PRETRAIN:
            raise Rule(f"{{}} {TaskType.CONTINUED_PRETRAIN} cannot be retrained: retraining reads .jsonl files or a "
                       f"Delta table; use {TaskType.CHAT_COMPLETION} or {TaskType.INSTRUCTION_FINETUNE}",
                       "run.task_type")
        return self

    def challenger(self, train_data_path: str, custom_weights_path: str | None) -> RunConfig:
        """The finetune run of one retraining: the recipe on the data gathered for it, from the champion or not."""
        recipe = {key: value for key, value in self.to_recipe().items() if key != "retrain"}
        return configure(recipe, overrides={"run.train_data_path": train_data_path,
                                            "run.custom_weights_path": custom_weights_path}, called=None)


def configure_retraining(recipe, shorthands: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                         called: str | None = "recipe") -> RetrainConfig:
    """A checked retraining config, its errors worded as configure() words them."""
    return configure(recipe, shorthands, overrides, called, schema=RetrainConfig)


def champion(registered_model: str) -> ModelVersion | None:
    """The version the alias `champion` marks, or None (no such model yet, or none promoted). Any other error of the
    store is raised: taken for "no champion", it would let a challenger replace the champion unjudged.

    A shared server refuses a user's account a model nobody has registered yet as it refuses another user's model,
    so that is None too: such an account has no champion of its own, and the worker, which sees every model, refuses
    before training a retraining whose owner may not add versions to an existing one (check_owner_may_register)."""
    try:
        return client().get_model_version_by_alias(registered_model, CHAMPION)
    except MlflowException as e:
        if e.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        if refused(e):
            return None
        raise


def check_retraining(config: RetrainConfig) -> RetrainConfig:
    """The config with its context length resolved, or an InvalidInputError naming the setting to fix: the training
    source must be one that grows and hold data, the eval set and the model must exist."""
    run = config.run
    if not take_inventory(run.train_data_path, config.name_of("run.train_data_path")).files:
        raise InvalidInputError(f"{config.name_of('run.train_data_path')} {run.train_data_path} holds no .jsonl "
                                "files (or table rows) yet: add the first data, then schedule its retraining")
    check_data_path(run.eval_data_path, config.name_of("run.eval_data_path"), run.task_type)
    incumbent = champion(config.retrain.registered_model)
    if config.retrain.mode == "continue" and incumbent is not None and "tessera.run_name" not in incumbent.tags:
        raise InvalidInputError(f"retrain.mode continue: the champion of {config.retrain.registered_model}, version "
                                f"{incumbent.version}, was not trained by Tessera (no tessera.run_name tag), so there "
                                "is no checkpoint to continue from: use mode from_base")
    length = context_length_for(run.model_name_or_path, config.training_config.max_length,
                                config.name_of("training_config.max_length"))
    return config.replace({"training_config.max_length": length})


def experiment_path(config: RetrainConfig, user: str) -> str:
    """The model's retraining experiment: run.experiment_path, else /Users/<user>/retrain-<model>, so its
    retrainings sit together."""
    return experiment_for(config, f"retrain-{config.retrain.registered_model}", user)
