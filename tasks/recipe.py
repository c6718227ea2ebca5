"""Recipes: a run's settings in one YAML file, laid out like Amazon Nova's SFT recipes.

    run:              {model_name_or_path, train_data_path, eval_data_path, register_to, task_type, ...}
    training_config:  {max_length, global_batch_size, micro_batch_size, save_steps, save_top_k, seed,
                       early_stopping: {monitor: val_loss, patience, min_delta},
                       deepspeed: {zero_stage, offload_optimizer, processes},
                       trainer: {max_epochs | max_steps, val_check_interval, gradient_clip_val, log_every_n_steps},
                       model: {attention_dropout, hidden_dropout, ffn_dropout,
                               optim: {lr, name, adam_w_mode, eps, weight_decay, betas,
                                       sched: {name, warmup_steps, constant_steps, min_lr}},
                               peft: {peft_scheme: null | lora, lora_tuning: {alpha, adapter_dropout,
                                                                              loraplus_lr_ratio, rank, target_modules}}}}

Every key maps to one RunConfig field, which checks the value; a key that is not in the layout is an error that
names it and lists the keys allowed there."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.errors import InvalidInputError

MAX_EPOCHS = 5  # Nova's limit on trainer.max_epochs


# Where each recipe key goes: a RunConfig field name, a nested section, or a special handler below.
LAYOUT: dict[str, Any] = {
    "run": {
        "name": "description", "model_name_or_path": "model", "model": "model",
        "train_data_path": "train_data_path", "data_s3_path": "train_data_path",
        "eval_data_path": "eval_data_path", "validation_data_s3_path": "eval_data_path",
        "register_to": "register_to", "task_type": "task_type", "experiment_path": "experiment_path",
        "eval_prompts": "eval_prompts", "custom_weights_path": "custom_weights_path",
        "allow_percentage_invalid_samples": "allow_percentage_invalid_samples",
    },
    "training_config": {
        "max_length": "context_length", "global_batch_size": "global_batch_size",
        "micro_batch_size": "micro_batch_size", "save_steps": "save_every_n_steps", "seed": "seed",
        "save_top_k": "save_top_k",
        # Tessera's own: how the DeepSpeed engine runs (not in Nova's recipes, where the service decides).
        "deepspeed": {"zero_stage": "zero_stage", "offload_optimizer": "offload_optimizer", "processes": "processes"},
        "trainer": {
            "max_epochs": "max_epochs", "max_steps": "max_steps", "val_check_interval": "eval_every_n_steps",
            "gradient_clip_val": "gradient_clip", "log_every_n_steps": "log_every_n_steps",
        },
        "early_stopping": {"monitor": "early_stopping_monitor", "patience": "early_stopping_patience",
                           "min_delta": "early_stopping_min_delta"},
        "model": {
            "attention_dropout": "attention_dropout",
            "hidden_dropout": "hidden_dropout", "ffn_dropout": "ffn_dropout",
            "optim": {
                "lr": "learning_rate", "name": "optimizer", "adam_w_mode": "adam_w_mode", "eps": "adam_eps",
                "weight_decay": "weight_decay", "betas": "adam_betas",
                "sched": {"name": "lr_schedule", "warmup_steps": "warmup_steps", "constant_steps": "constant_steps",
                          "min_lr": "min_lr"},
            },
            "peft": {
                "peft_scheme": "peft_scheme",
                "lora_tuning": {"alpha": "lora_alpha", "adapter_dropout": "lora_dropout",
                                "loraplus_lr_ratio": "loraplus_lr_ratio", "rank": "lora_rank",
                                "target_modules": "lora_target_modules"},
            },
        },
    },
}
OPTIMIZERS = ("adamw", "distributed_fused_adam", "fused_adam")  # Nova's names; all are AdamW here


@dataclass(frozen=True)
class Recipe:
    values: dict[str, Any]  # RunConfig fields; RunConfig checks them
    keys: dict[str, str]  # field -> the recipe key that set it, to name it in errors
    source: str  # the file, or "recipe" for a dict


def load_recipe(recipe: str | Path | dict) -> Recipe:
    """The RunConfig fields a recipe file (or an already-parsed dict) sets."""
    source = "recipe"
    if not isinstance(recipe, dict):
        path = Path(recipe).expanduser()
        source = str(path)
        try:
            recipe = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"recipe {path} does not exist: check the path") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise InvalidInputError(f"recipe {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(recipe, dict):
        raise InvalidInputError(f"{source} must be a mapping with the sections run and training_config")
    fields: dict[str, tuple[Any, str]] = {}
    _walk(recipe, LAYOUT, "", source, fields)
    keys = {name: key for name, (_, key) in fields.items()}
    keys["training_duration"] = keys.get("max_epochs") or keys.get("max_steps") or ""
    return Recipe(_resolve(fields, source), keys, source)


def _walk(section: dict, layout: dict, prefix: str, source: str, out: dict[str, Any]) -> None:
    for key, value in section.items():
        where = f"{prefix}{key}"
        if key not in layout:
            raise InvalidInputError(
                f"{source}: {where} is not a recipe key; the keys allowed {f'under {prefix[:-1]}' if prefix else 'at the top'} "
                f"are {', '.join(layout)}"
            )
        target = layout[key]
        if isinstance(target, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InvalidInputError(f"{source}: {where} must be a mapping with the keys {', '.join(target)}")
            _walk(value, target, f"{where}.", source, out)
        else:
            out[target] = (value, where)


def _resolve(fields: dict[str, tuple[Any, str]], source: str) -> dict[str, Any]:
    """Recipe-only keys turned into RunConfig fields: durations, the optimizer and PEFT checks."""
    values = {name: value for name, (value, _) in fields.items()}
    where = {name: key for name, (_, key) in fields.items()}
    epochs, steps = values.pop("max_epochs", None), values.pop("max_steps", None)
    if epochs is not None and steps is not None:
        raise InvalidInputError(f"{source}: give {where['max_epochs']} or {where['max_steps']}, not both")
    if epochs is not None:
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= MAX_EPOCHS:
            raise InvalidInputError(f"{source}: {where['max_epochs']} {epochs!r} must be an integer from 1 to {MAX_EPOCHS}")
        values["training_duration"] = f"{epochs}ep"
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InvalidInputError(f"{source}: {where['max_steps']} {steps!r} must be a positive integer")
        values["training_duration"] = f"{steps}ba"
    optimizer = values.pop("optimizer", "adamw")
    if optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"{source}: {where['optimizer']} {optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    if values.pop("adam_w_mode", True) is not True:
        raise InvalidInputError(f"{source}: {where['adam_w_mode']} must be true: Tessera trains with AdamW")
    monitor = values.pop("early_stopping_monitor", "val_loss")
    if monitor != "val_loss":
        raise InvalidInputError(f"{source}: {where['early_stopping_monitor']} {monitor!r}: only val_loss can be monitored")
    values.pop("description", None)  # Nova's run.name describes the job; Tessera names runs itself
    return values


def config_error(error: InvalidInputError, recipe: Recipe) -> InvalidInputError:
    """RunConfig's message about a field the recipe set, saying which recipe key set it."""
    field_name = str(error).split(" ", 1)[0]
    key = recipe.keys.get(field_name)
    return InvalidInputError(f"{recipe.source}: {key}: {error}") if key else error
