"""Step 2: validate the data against the task type's format and turn it into packed training rows."""

from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.data.prepare import prepare_dataset
from tasks.events import RunEvent, emit
from tasks.tracking import client


# No Prefect cache: prepare_dataset keeps its own cache keyed by content hash, tokenizer, template,
# context length and task type, which stays sound when a file changes under the same path.
@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(
    run_name: str, data_path: str, model_dir: str, task_type: str, context_length: int, mlflow_run_id: str,
    split: str = "train",
) -> str:
    """Refuse bad records with file, line, field and fix; otherwise return the prepared rows' folder."""
    prepared = prepare_dataset(data_path, Path(model_dir), task_type, context_length)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(prepared).items()}
    client().log_dict(mlflow_run_id, meta, f"data/{split}_stats.json")
    if split == "train":
        emit(
            run_name, RunEvent.DATA_VALIDATED,
            f"{meta['num_examples']} examples, {meta['num_tokens']} tokens in {meta['num_rows']} rows of "
            f"{context_length} ({meta['packing_efficiency']:.0%} packed); {meta['num_dropped']} dropped, "
            f"{meta['num_truncated']} truncated",
            **{k: v for k, v in meta.items() if isinstance(v, int | float)},
        )
    return str(prepared.path)
