"""The anchor's arguments, each declared once: its name, the type a caller gives, what it means, the recipe path
it sets.

Derived from here: the recipe's shorthands (tasks/recipe.py), the CLI's options and their help
(cli/options.py), TrainingRun's read-back of a run's config, `validate`'s defaults, and the one error for an
argument that is none of these, and the finetune flow's parameters (takes_arguments: Prefect's schema and form).
Written out for IDEs, and checked against this by tests/test_arguments.py: create()'s signature, TrainingRun's
fields, fm.validate_data's, and the README's table.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tasks.config import RunConfig, TaskType
from tasks.errors import UnknownArgumentError

DURATION = "training_duration"  # sets max_epochs, max_steps or max_tokens under its path, by its unit


@dataclass(frozen=True)
class Argument:
    name: str
    type: Any  # as the config types its setting (list[str] for a list); an enum is given by its value
    path: str  # the recipe path it sets
    help: str  # one line: the CLI's help
    positional: bool = False  # the anchor's create() takes it by position too

    @property
    def default(self) -> Any:
        """RunConfig's value when the argument is not given (None where the config has none)."""
        if self.name == DURATION:
            return str(RunConfig.model_construct().duration)
        return setting_default(self.path)

    def read(self, config: RunConfig) -> Any:
        """The argument's value in a config (an enum as its value, the duration as the anchor writes it)."""
        if self.name == DURATION:
            return str(config.duration)
        value = config
        for key in self.path.split("."):
            value = getattr(value, key)
        return value.value if isinstance(value, Enum) else value


# In the order of the anchor's create(), then Tessera's own.
ARGUMENTS: tuple[Argument, ...] = (
    Argument("model", str, "run.model_name_or_path",
             "a catalog name (`tessera models`) or a local Hugging Face model folder", positional=True),
    Argument("train_data_path", str, "run.train_data_path",
             "a .jsonl file, s3://, dbfs:/Volumes/..., an HF dataset org/name/split or a Delta table "
             "cat.schema.table (a .txt file or folder for CONTINUED_PRETRAIN)", positional=True),
    Argument("register_to", str, "run.register_to",
             "catalog.schema or catalog.schema.model_name in the model registry", positional=True),
    Argument("experiment_path", str, "run.experiment_path",
             "the MLflow experiment, an absolute workspace path; default /Users/{user}/{run name}"),
    Argument("task_type", TaskType, "run.task_type",
             "what the records are: conversations, prompt and response pairs, or plain text"),
    Argument("eval_data_path", str, "run.eval_data_path",
             "held-out data, any form train_data_path takes; its loss is reported at each checkpoint"),
    Argument("eval_prompts", list[str], "run.eval_prompts", "prompts answered before training and at each checkpoint"),
    Argument("custom_weights_path", str, "run.custom_weights_path",
             "an earlier run's checkpoint to start from, as `tessera checkpoints` names it"),
    Argument(DURATION, str, "training_config.trainer", "e.g. 3ep, 200ba, 1_000_000tok"),
    Argument("learning_rate", float, "training_config.model.optim.lr", "the peak learning rate, 1e-6 to 1e-3"),
    Argument("context_length", int, "training_config.max_length",
             "tokens per row, at most the model's; default min(8192, the model's maximum)"),
    Argument("allow_percentage_invalid_samples", float, "run.allow_percentage_invalid_samples",
             "skip invalid records up to this percentage of the data, 0-100"),
)
BY_NAME: dict[str, Argument] = {a.name: a for a in ARGUMENTS}
SHORTHANDS: dict[str, str] = {a.name: a.path for a in ARGUMENTS}


def takes_arguments(function: Callable) -> Callable:
    """Give `function`, which takes the arguments as **arguments, a signature that names each (keyword-only, its type
    or None, default None): what Prefect reads a flow's parameters, its schema and its form from."""
    own = [p for p in inspect.signature(function).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    declared = [inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a.type | None)
                for a in ARGUMENTS]
    function.__signature__ = inspect.Signature([*own, *declared], return_annotation=inspect.signature(function)
                                               .return_annotation)
    return function


def setting_default(path: str) -> Any:
    """RunConfig's default for the setting at `path` (an enum as its value; None where the setting is required)."""
    model: type[BaseModel] = RunConfig
    for key in path.split("."):
        field = model.model_fields[key]
        model = field.annotation
    default = field.get_default(call_default_factory=True)
    default = None if default is PydanticUndefined else default
    return default.value if isinstance(default, Enum) else default


def refuse_unknown(names, caller: str) -> None:
    """Refuse the names among `names` that are not an argument, as a caller passing them on to create() would."""
    unknown = sorted(set(names) - set(SHORTHANDS))
    if unknown:
        raise UnknownArgumentError(f"{caller} has no argument {', '.join(unknown)}: use create()'s "
                                   f"({', '.join(SHORTHANDS)})")
