"""Step 2: validate the data against the task type's format and turn it into packed training rows."""

import json
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import Duration
from tasks.data.prepare import EVIDENCE, prepare_dataset
from tasks.errors import InvalidDataError
from tasks.events import RunEvent, emit
from tasks.tracking import client
from tasks.training.schedule import plan_duration


# No Prefect cache: prepare_dataset keeps its own cache keyed by content hash, tokenizer, template,
# context length and task type, which stays sound when a file changes under the same path.
@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(
    run_name: str, data_path: str, model_dir: str, task_type: str, context_length: int, mlflow_run_id: str,
    allow_percentage_invalid: float = 0.0, training_duration: str = "1ep", global_batch_size: int = 8,
    split: str = "train",
) -> str:
    """Refuse bad records with file, line, field and fix; otherwise return the prepared rows' folder."""
    try:
        prepared = prepare_dataset(data_path, Path(model_dir), task_type, context_length, allow_percentage_invalid,
                                   field=f"{split}_data_path")
    except InvalidDataError as e:
        if e.evidence is not None:  # why the data was refused stays with the run
            _log_evidence(mlflow_run_id, e.evidence, split)
        raise
    _log_evidence(mlflow_run_id, prepared.path, split)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(prepared).items()}
    client().log_dict(mlflow_run_id, meta, f"data/{split}/meta.json")
    if split == "train":
        stats = json.loads((prepared.path / "stats.json").read_text())
        duration = Duration.parse(training_duration)
        plan = plan_duration(duration.value, duration.unit, prepared.num_rows, context_length, global_batch_size)
        client().log_metric(mlflow_run_id, "data/training_tokens", plan.total_tokens)
        warnings = "".join(f"; warning: {w}" for w in stats["warnings"])
        emit(
            run_name, RunEvent.DATA_VALIDATED,
            f"{prepared.num_examples} examples, {prepared.num_tokens:,} tokens in {prepared.num_rows} rows of "
            f"{context_length} ({prepared.packing_efficiency:.0%} packed); {prepared.num_dropped} dropped, "
            f"{prepared.num_truncated} truncated, {prepared.num_invalid} invalid skipped; {training_duration} "
            f"trains on {plan.total_tokens:,} token positions{warnings}",
            training_tokens=plan.total_tokens, warnings=stats["warnings"],
            **{k: v for k, v in meta.items() if isinstance(v, int | float)},
        )
    return str(prepared.path)


def _log_evidence(mlflow_run_id: str, folder: Path, split: str) -> None:
    for name in EVIDENCE:
        if (folder / name).is_file():
            client().log_artifact(mlflow_run_id, str(folder / name), f"data/{split}")
