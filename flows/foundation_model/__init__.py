"""The public face, mirroring `databricks.model_training.foundation_model`, plus sweeps.

    from flows import foundation_model as fm
    run = fm.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path="train.jsonl",
                    register_to="main.demo", training_duration="2ep")
    for event in fm.get_events(run, follow=True): print(event.message)

    sweep = fm.sweep(space={"learning_rate": {"loguniform": [1e-5, 1e-3]}}, recipe="examples/recipes/full.yaml")
    sweep.refresh().best

`fm.validate_data(path, task_type=...)` checks a data set before any run, as `tessera validate` does.
"""

import builtins

from flows.foundation_model import runs as _runs
from flows.foundation_model.runs import (  # noqa: F401  (the public API)
    ACTIVE,
    FineTuningEvent,
    RunStatus,
    TrainingRun,
    create,
    get,
    get_checkpoints,
    get_models,
    list,
)
from flows.foundation_model.sweeps import (  # noqa: F401
    Sweep,
    get_sweep,
    list_sweeps,
    resume_sweep,
    sweep,
)
from tasks.data.validation import DataValidation, validate_data  # noqa: F401
from tasks.errors import RunNotFoundError


def cancel(runs: "str | TrainingRun | Sweep | builtins.list[str | TrainingRun] | None" = None,
           experiment_id: str | None = None) -> int:
    """Stop runs (by name, run or list; or every run of an experiment), or a sweep (by name or Sweep) and all its
    trials; returns how many runs were cancelled."""
    if isinstance(runs, str):
        runs = _run_or_sweep(runs)
    if isinstance(runs, Sweep):
        return runs.cancel()
    return _runs.cancel(runs, experiment_id)


def get_events(training_run: "str | TrainingRun | Sweep", follow: bool = False):
    """A run's or a sweep's events, oldest first; with follow=True an iterator that ends at a terminal event."""
    if isinstance(training_run, str):
        training_run = _run_or_sweep(training_run)
    if isinstance(training_run, Sweep):
        return training_run.get_events(follow=follow)
    return _runs.get_events(training_run, follow=follow)


def _run_or_sweep(name: str) -> "TrainingRun | Sweep":
    try:
        return get(name)
    except RunNotFoundError:
        try:
            return get_sweep(name)
        except RunNotFoundError:
            raise RunNotFoundError(f"no run or sweep named {name!r}: see fm.list() and fm.list_sweeps()") from None
