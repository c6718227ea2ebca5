"""Step 2: validate the data against the task type's format and turn it into packed training rows."""

import json
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import warm_start
from tasks.config import RunConfig
from tasks.data.prepare import EVIDENCE, prepare_dataset
from tasks.errors import InvalidDataError
from tasks.events import RunEvent, emit
from tasks.models import tokenizer_folder
from tasks.run_record import RunRecord
from tasks.tracking import client
from tasks.training.schedule import plan_duration


# No Prefect cache: prepare_dataset keeps its own cache keyed by content hash, tokenizer, template,
# context length and task type, which stays sound when a file changes under the same path.
@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(record: RunRecord, config: RunConfig, split: str = "train") -> str:
    """Refuse bad records with file, line, field and fix; otherwise return the prepared rows' folder."""
    run, training = config.run, config.training_config
    field = f"run.{split}_data_path"
    try:
        # In a warm child: tokenizing needs transformers, and so torch, which this process never imports.
        prepared = warm_start.run(prepare_dataset, getattr(run, f"{split}_data_path"),
                                  tokenizer_folder(run.model_name_or_path), run.task_type, training.max_length,
                                  run.allow_percentage_invalid_samples, field=config.name_of(field))
    except InvalidDataError as e:
        if e.evidence is not None:  # why the data was refused stays with the run
            _log_evidence(record.mlflow_run_id, e.evidence, split)
        raise
    _log_evidence(record.mlflow_run_id, prepared.path, split)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(prepared).items()}
    client().log_dict(record.mlflow_run_id, meta, f"data/{split}/meta.json")
    if split == "train":
        stats = json.loads((prepared.path / "stats.json").read_text())
        # As the worker plans it: on the rows' width (a preference pair's two sides share a row twice the context long).
        plan = plan_duration(config.duration, prepared.num_rows, prepared.row_length, training.global_batch_size)
        client().log_metric(record.mlflow_run_id, "data/training_tokens", plan.total_tokens)
        warnings = "".join(f"; warning: {w}" for w in stats["warnings"])
        emit(
            record.name, RunEvent.DATA_VALIDATED,
            f"{prepared.num_examples} examples, {prepared.num_tokens:,} tokens in {prepared.num_rows} rows of "
            f"{prepared.row_length} ({prepared.packing_efficiency:.0%} packed); {prepared.num_dropped} dropped, "
            f"{prepared.num_truncated} truncated, {prepared.num_invalid} invalid skipped; {config.duration} "
            f"trains on {plan.total_tokens:,} token positions{warnings}",
            training_tokens=plan.total_tokens, warnings=stats["warnings"],
            **{k: v for k, v in meta.items() if isinstance(v, int | float)},
        )
    return str(prepared.path)


def _log_evidence(mlflow_run_id: str, folder: Path, split: str) -> None:
    for name in EVIDENCE:
        if (folder / name).is_file():
            client().log_artifact(mlflow_run_id, str(folder / name), f"data/{split}")
