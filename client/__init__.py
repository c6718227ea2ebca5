"""The public face, mirroring `databricks.model_training.foundation_model`, plus sweeps and scheduled retraining.

    from flows import foundation_model as fm
    run = fm.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path="train.jsonl",
                    register_to="main.demo", training_duration="2ep")
    for event in fm.get_events(run, follow=True): print(event.message)

    sweep = fm.sweep(space={"learning_rate": {"loguniform": [1e-5, 1e-3]}}, recipe="examples/recipes/full.yaml")
    sweep.refresh().best

    fm.schedule_retraining("main.demo.assistant", train_data_path="dbfs:/Volumes/main/demo/incoming/",
                           eval_data_path="examples/data/tessera_chat_eval.jsonl", cron="0 3 * * *")

`fm.validate_data(path, task_type=...)` checks a data set before any run, as `tessera validate` does.
"""

import builtins

from client import runs as _runs
from client.jobs import FineTuningEvent  # noqa: F401  (the public API, with the ones below)
from client.retraining import (  # noqa: F401
    Retraining,
    RetrainingSchedule,
    get_retraining,
    get_retraining_schedule,
    list_retraining_schedules,
    list_retrainings,
    pause_retraining,
    promote,
    retrain_now,
    schedule_retraining,
    unschedule_retraining,
)
from client.runs import (  # noqa: F401
    TrainingRun,
    create,
    get,
    get_checkpoints,
    get_models,
    list,
)
from client.sweeps import (  # noqa: F401
    Sweep,
    get_sweep,
    list_sweeps,
    resume_sweep,
    sweep,
)
from tasks.data.validation import DataValidation, validate_data  # noqa: F401
from tasks.errors import RunNotFoundError
from tasks.flow_runs import ACTIVE, RunStatus  # noqa: F401


def cancel(runs: "str | TrainingRun | Sweep | Retraining | builtins.list[str | TrainingRun] | None" = None,
           experiment_id: str | None = None) -> int:
    """Stop runs (by name, run or list; or every run of an experiment), or a sweep and all its trials, or a
    retraining and its challenger (by name or object); returns how many runs were cancelled."""
    if isinstance(runs, str):
        runs = _named(runs)
    if isinstance(runs, Sweep | Retraining):
        return runs.cancel()
    return _runs.cancel(runs, experiment_id)


def get_events(training_run: "str | TrainingRun | Sweep | Retraining", follow: bool = False):
    """A run's, sweep's or retraining's events, oldest first; with follow=True an iterator that ends at a terminal
    event."""
    if isinstance(training_run, str):
        training_run = _named(training_run)
    if isinstance(training_run, Sweep | Retraining):
        return training_run.get_events(follow=follow)
    return _runs.get_events(training_run, follow=follow)


def _named(name: str) -> "TrainingRun | Sweep | Retraining":
    """The run, sweep or retraining of that name."""
    for read in (get, get_sweep, get_retraining):
        try:
            return read(name)
        except RunNotFoundError:
            continue
    raise RunNotFoundError(f"no run, sweep or retraining named {name!r}: see fm.list(), fm.list_sweeps() and "
                           "fm.list_retrainings()")
