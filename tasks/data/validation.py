"""Checking a data set before any run: the same preparation a run does, so a passing check warms its cache."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.arguments import BY_NAME, setting_default
from tasks.config import Duration
from tasks.data.formats import parse_task_type
from tasks.data.prepare import PreparedDataset, prepare_dataset
from tasks.data.sources import check_data_path
from tasks.errors import InvalidDataError, InvalidInputError
from tasks.models import context_length_for, tokenizer_folder
from tasks.training.schedule import plan_duration

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # bundled, so a check works offline with no model named


@dataclass(frozen=True)
class DataValidation:
    """What a check found: the verdict, the report, the token statistics and what a run would cost."""

    ok: bool
    report: str
    stats: dict  # stats.json: lengths, counts, histogram summary, warnings
    quality: dict  # quality.json: the great-expectations verdict, its failed expectations and raw result
    evidence: Path  # the folder holding report.txt, stats.json, quality.json and lengths.png
    prepared: PreparedDataset | None  # the packed rows, when ok
    training_duration: str
    training_steps: int | None  # optimizer steps the training_duration makes, when ok
    training_tokens: int | None  # token positions those steps train on (rows x context_length), when ok

    @property
    def warnings(self) -> list[str]:
        return self.stats.get("warnings", [])


def validate_data(  # the settings' defaults are a run's
    data_path: str,
    task_type: str = BY_NAME["task_type"].default,
    model: str = DEFAULT_MODEL,
    context_length: int | None = BY_NAME["context_length"].default,
    training_duration: str = BY_NAME["training_duration"].default,
    global_batch_size: int = setting_default("training_config.global_batch_size"),
    allow_percentage_invalid_samples: float = BY_NAME["allow_percentage_invalid_samples"].default,
) -> DataValidation:
    """Validate, tokenize and pack a data set as a run would; report what is wrong and what a run would cost.

    Bad arguments (a missing path, an unknown model or task type) raise InvalidInputError; bad data does not
    raise: it comes back with ok=False and the report."""
    task = parse_task_type(task_type)
    duration = Duration.parse(training_duration)
    context_length = context_length_for(model, context_length)
    check_data_path(data_path, "data_path", task)
    try:
        prepared = prepare_dataset(data_path, tokenizer_folder(model), task, context_length,
                                   allow_percentage_invalid_samples)
    except InvalidDataError as e:
        if e.evidence is None:
            raise
        return _read(e.evidence, ok=False, report=str(e), training_duration=training_duration)
    validation = _read(prepared.path, ok=True, prepared=prepared, training_duration=training_duration)
    try:
        plan = plan_duration(duration, prepared.num_rows, prepared.row_length, global_batch_size)
    except InvalidInputError as e:  # valid data, too little of it for one optimizer step: say so, don't fail
        validation.stats["warnings"] = [*validation.warnings, str(e)]
        return validation
    return replace(validation, training_steps=plan.total_batches, training_tokens=plan.total_tokens)


def _read(folder: Path, ok: bool, training_duration: str, report: str | None = None,
          prepared: PreparedDataset | None = None) -> DataValidation:
    return DataValidation(
        ok=ok, report=report or (folder / "report.txt").read_text().rstrip(),
        stats=json.loads((folder / "stats.json").read_text()),
        quality=json.loads((folder / "quality.json").read_text()),
        evidence=folder, prepared=prepared, training_duration=training_duration, training_steps=None,
        training_tokens=None,
    )
