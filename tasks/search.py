"""A hyperparameter sweep: its settings (the recipe's `sweep` section) and the Optuna study that searches them.

    sweep:
      space:                                           # a create() argument's name, or any config path
        learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
        training_config.model.peft.lora_tuning.alpha: [32, 64, 96]
        beta: [0.01, 0.1]                              # DPO's beta (task_type DPO only)
        training_duration: [1ep, 2ep]
      strategy: tpe                                    # grid | random | tpe
      metric: eval_loss
      mode: min
      max_trials: 8
      max_parallel: 2
      prune: true

Each trial is a run of the recipe with one point of the space set (`trial_config`), checked by the config's own
rules. Optuna samples (a grid's points are enqueued) and prunes, through ask/tell: the sweep's flow drives the
trials. The study lives in a database
(Optuna's RDB storage: SQLite under TESSERA_HOME unless TESSERA_SWEEP_STORAGE names another), so a sweep whose
flow crashed continues where it was.
"""

import math
import os
from itertools import product
from typing import Annotated, Any, Literal, Self

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import Field, model_validator

from tasks.arguments import SHORTHANDS
from tasks.config import Rule, RunConfig, Section, TaskType
from tasks.errors import InvalidInputError
from tasks.home import tessera_home
from tasks.recipe import configure, is_setting

Scalar = str | int | float | bool | None  # what Optuna can choose among

BEST_RUN_TAG = "tessera.best_run"  # on the sweep's MLflow run: its best completed trial's run so far
# Names the space takes beside create()'s arguments and config paths: a short name for a setting that is no argument.
SPACE_NAMES = {"beta": "training_config.model.dpo_cfg.beta"}
DPO_SECTION = "training_config.model.dpo_cfg."  # settings a DPO run alone reads


class Uniform(Section):
    """A number drawn evenly between the two bounds."""

    uniform: Annotated[list[float], Field(min_length=2, max_length=2)]


class LogUniform(Section):
    """A positive number drawn evenly on a log scale between the two bounds (learning rates)."""

    loguniform: Annotated[list[float], Field(min_length=2, max_length=2)]


class IntRange(Section):
    """A whole number between the two bounds, both included."""

    int_range: Annotated[list[int], Field(min_length=2, max_length=2, alias="int")]


Dimension = Annotated[list[Scalar], Field(min_length=1)] | Uniform | LogUniform | IntRange


class Sweep(Section):
    """Which settings to search, how, and how many trials: each trial is a finetune run of the recipe."""

    space: dict[str, Dimension] = Field(min_length=1, examples=[{"learning_rate": {"loguniform": [1e-5, 1e-3]}}])
    """Each searched setting (a create() argument's name, beta, or a config path) and its values: a list (choose one),
    {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {int: [lo, hi]}."""
    strategy: Literal["grid", "random", "tpe"] = "tpe"
    """grid: every combination of the lists; random; tpe: Optuna's Tree-structured Parzen Estimator."""
    metric: Literal["eval_loss"] = "eval_loss"
    """What ranks the trials: the final eval loss (needs run.eval_data_path)."""
    mode: Literal["min", "max"] = "min"
    """Whether the best trial has the lowest or the highest metric."""
    max_trials: int = Field(8, ge=1)
    """Trials in all (a grid stops sooner when it has fewer combinations)."""
    max_parallel: int = Field(2, ge=1)
    """Trials running at once."""
    prune: bool = False
    """Stop a trial whose eval loss falls behind the others' at the same step."""
    pruner: Literal["median", "successive_halving"] = "median"
    """Optuna's pruner when prune is on: behind the median of the others, or successive halving."""

    @model_validator(mode="after")
    def _grid_takes_lists(self) -> Self:
        for key, dimension in self.space.items():
            if self.strategy == "grid" and not isinstance(dimension, list):
                raise Rule("{}: a grid takes lists of values only, e.g. [1.0e-5, 1.0e-4]", f"space.{key}")
            bounds = None if isinstance(dimension, list) else _bounds(dimension)
            if bounds and not bounds[0] < bounds[1]:
                raise Rule(f"{{}}: the bounds {list(bounds)} must go from low to high", f"space.{key}")
            if isinstance(dimension, LogUniform) and bounds[0] <= 0:
                raise Rule(f"{{}}: loguniform bounds must be above 0, got {list(bounds)}", f"space.{key}")
        return self

    @property
    def trials(self) -> int:
        """The number of trials: max_trials, or fewer when a grid has fewer combinations."""
        if self.strategy != "grid":
            return self.max_trials
        return min(self.max_trials, math.prod(len(values) for values in self.space.values()))


class SweepConfig(RunConfig):
    """A sweep: the recipe every trial starts from, and its `sweep` section."""

    sweep: Sweep

    @model_validator(mode="after")
    def _metric_needs_eval_data(self) -> Self:
        if self.sweep.metric == "eval_loss" and self.run.eval_data_path is None:
            raise Rule("{} eval_loss needs {}: the trials are ranked by their loss on held-out data",
                       "sweep.metric", "run.eval_data_path")
        return self

    def base(self) -> dict:
        """The recipe every trial starts from."""
        return {key: value for key, value in self.to_recipe().items() if key != "sweep"}


def configure_sweep(recipe, shorthands: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                    called: str | None = "recipe") -> SweepConfig:
    """A checked sweep config; every value the space can take is checked by the config's rules too."""
    config = configure(recipe, shorthands, overrides, called, schema=SweepConfig)
    for key, dimension in config.sweep.space.items():
        _check_key(config, key)
        for value in dimension if isinstance(dimension, list) else _bounds(dimension):
            try:
                trial_config(config, {key: value})
            except InvalidInputError as e:
                raise InvalidInputError(f"sweep.space.{key} value {value!r} cannot be trained: {e}") from None
    return config


def trial_config(config: SweepConfig, values: dict[str, Any]) -> RunConfig:
    """The recipe with one trial's values set: the arguments' names as arguments, paths as overrides."""
    return configure(config.base(), shorthands={k: v for k, v in values.items() if k in SHORTHANDS},
                     overrides={SPACE_NAMES.get(k, k): v for k, v in values.items() if k not in SHORTHANDS},
                     called=None)


def _check_key(config: SweepConfig, key: str) -> None:
    """`key` names a setting, and one this sweep's runs read: DPO's only in a DPO recipe."""
    path = SPACE_NAMES.get(key, key)
    if key not in SHORTHANDS and not is_setting(path):
        raise InvalidInputError(
            f"sweep.space.{key} is not a setting: use a create() argument ({', '.join(SHORTHANDS)}), "
            f"{', '.join(SPACE_NAMES)}, or a config path, e.g. training_config.model.optim.weight_decay")
    if path.startswith(DPO_SECTION) and config.run.task_type != TaskType.DPO:
        named = key if key == path else f"{key} ({path})"
        raise InvalidInputError(
            f"sweep.space.{key}: {named} is a DPO setting, and {config.name_of('run.task_type')} is "
            f"{config.run.task_type.value}, whose runs do not read it: search it in a recipe with task_type DPO "
            "(preference pairs), or search another setting")


def distributions(sweep: Sweep) -> dict[str, BaseDistribution]:
    """Optuna's distribution for each searched setting."""
    result: dict[str, BaseDistribution] = {}
    for key, dimension in sweep.space.items():
        if isinstance(dimension, list):
            result[key] = CategoricalDistribution(dimension)
        elif isinstance(dimension, IntRange):
            result[key] = IntDistribution(*dimension.int_range)
        else:
            result[key] = FloatDistribution(*_bounds(dimension), log=isinstance(dimension, LogUniform))
    return result


def grid(sweep: Sweep) -> list[dict[str, Scalar]]:
    """Every combination of a grid's lists, in order."""
    keys = list(sweep.space)
    return [dict(zip(keys, values)) for values in product(*(sweep.space[k] for k in keys))]


def open_study(name: str, sweep: Sweep, seed: int) -> optuna.Study:
    """The sweep's study, created or, for a sweep run again, loaded with its trials so far."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A grid's combinations are enqueued, in order, when the study is made: each ask takes the next. (GridSampler
    # stops the study itself once the grid is done, which only works inside Study.optimize, not with ask/tell.)
    sampler = optuna.samplers.TPESampler(seed=seed) if sweep.strategy == "tpe" else optuna.samplers.RandomSampler(seed)
    pruner = optuna.pruners.NopPruner()
    if sweep.prune:  # judged from the first finished trial on, at every eval
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=1) if sweep.pruner == "median"
                  else optuna.pruners.SuccessiveHalvingPruner())
    study = optuna.create_study(study_name=name, storage=storage_url(), sampler=sampler, pruner=pruner,
                                direction="minimize" if sweep.mode == "min" else "maximize", load_if_exists=True)
    if sweep.strategy == "grid" and not study.trials:
        for params in grid(sweep)[: sweep.trials]:
            study.enqueue_trial(params)
    return study


def storage_url() -> str:
    """Where studies live: TESSERA_SWEEP_STORAGE (any SQLAlchemy URL), default SQLite under TESSERA_HOME."""
    return os.environ.get("TESSERA_SWEEP_STORAGE") or f"sqlite:///{tessera_home() / 'sweeps.db'}"


def _bounds(dimension: Uniform | LogUniform | IntRange) -> tuple[float, float]:
    values = {Uniform: "uniform", LogUniform: "loguniform", IntRange: "int_range"}[type(dimension)]
    low, high = getattr(dimension, values)
    return low, high
