"""The data-quality suite: great-expectations judges values the pipeline derives per record, and the run keeps its
result as an artifact. formats.py checks structure and explains each problem by file, line and field; this suite
counts each kind of problem over the whole data set, names a few lines of each, and records it in GX's own form.

Truncation and examples left without loss tokens are expectations of severity "warning": the anchor trains on such
data and says so, so they are reported (here and in GX's result) but do not fail the suite. `mostly` would instead
invent a share beyond which the run fails, a threshold the anchor does not have."""

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import TaskType
from tasks.data.report import SHOWN_PER_KIND

# What the pipeline records per record (valid or not), in its workers; numpy dtypes, "object" for strings.
QUALITY_COLUMNS: dict[str, str] = {
    "line": "int32",  # 1-based line in the JSONL file; for CONTINUED_PRETRAIN the document's 1-based number
    "num_messages": "int16",  # chat records; 0 otherwise
    "role_pattern": "object",  # the roles in order, e.g. "system,user,assistant"; "" if not a chat record
    "last_role": "object",  # "" if not a chat record
    "num_empty_content": "int16",  # messages whose content is empty or blank
    "num_chars": "int32",
    "num_tokens": "int32",  # the example as trained: cut to context_length (chat, instructions); whole documents
    "num_loss_tokens": "int32",  # tokens the loss is computed on, after the cut
    "truncated": "bool",  # cut to context_length
    "valid": "bool",  # passed formats.py's checks; the token columns are 0 where it did not (nothing to tokenize)
}

# A conversation: an optional system message, then user and assistant turns; an assistant may call tools, whose
# results come back as tool messages and are answered by the assistant again.
# Groups do not capture: GX matches with pandas' str.contains, which warns about capturing groups.
_TURN = r"user,assistant(?:,(?:tool,)+assistant)*"
ROLE_PATTERN = rf"^(?:system,)?{_TURN}(?:,{_TURN})*$"
_INT_COLUMNS = [name for name, dtype in QUALITY_COLUMNS.items() if dtype.startswith("int") and name != "line"]


@dataclass(frozen=True)
class SuiteResult:
    success: bool  # no critical expectation failed; warnings do not fail a run
    failed: list[str]  # one line per failed critical expectation: the count and a few example lines
    result: dict  # GX's validation result, JSON-able: the run's artifact
    warnings: list[str]  # one line per failed warning expectation (truncation, examples left out)


def run_suite(frame: pd.DataFrame, task_type: TaskType, context_length: int) -> SuiteResult:
    """Validate the per-record frame (QUALITY_COLUMNS) with the expectations of `task_type`."""
    if frame.empty:  # no records to derive columns from (the format report says why): nothing fails here
        frame = pd.DataFrame({name: np.empty(0, dtype=dtype) for name, dtype in QUALITY_COLUMNS.items()})
    missing = QUALITY_COLUMNS.keys() - set(frame.columns)
    if missing:
        raise ValueError(f"the quality frame lacks the columns {', '.join(sorted(missing))}")
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Line numbers as an unnamed index: GX lists an unnamed index of unexpected rows as is, while naming the line
    # column (unexpected_index_column_names) makes it read each unexpected row with .at, seconds for 100k rows.
    # GX compares numbers vectorized only in int64 or float64 columns, one Python call per value otherwise.
    data = frame.set_axis(frame["line"].to_numpy(), axis=0).astype(dict.fromkeys(_INT_COLUMNS, "int64"))
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),  # nothing written to disk
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    ))
    batches = context.data_sources.add_pandas("records").add_dataframe_asset("records")
    suite = context.suites.add(gx.ExpectationSuite(
        name=f"tessera-{task_type.lower()}",
        expectations=_expectations(task_type, context_length),
        meta={"task_type": str(task_type), "context_length": context_length},
    ))
    validation = context.validation_definitions.add(gx.ValidationDefinition(
        name="training-data", data=batches.add_batch_definition_whole_dataframe("all"), suite=suite,
    ))
    # SUMMARY keeps the artifact small: counts and the first 20 unexpected lines, not every one.
    result = validation.run(batch_parameters={"dataframe": data}, result_format="SUMMARY").to_json_dict()
    noun = "documents" if task_type is TaskType.CONTINUED_PRETRAIN else "records"
    failed = [r for r in result["results"] if not r["success"]]
    critical = [_describe(r, noun) for r in failed if r["expectation_config"]["severity"] == "critical"]
    return SuiteResult(
        success=not critical,
        failed=critical,
        result=result,
        warnings=[_describe(r, noun) for r in failed if r["expectation_config"]["severity"] != "critical"],
    )


def _expectations(task_type: TaskType, context_length: int) -> list[Any]:
    """The suite's expectations: the chat ones only for CHAT_COMPLETION, the token ones on valid records only."""
    gx = _import_gx()
    from great_expectations.expectations.row_conditions import Column

    gxe = gx.expectations
    valid = Column("valid") == True  # noqa: E712 (builds GX's condition object, not a Python bool)
    checks = [
        gxe.ExpectColumnValuesToBeInSet(
            column="valid", value_set=[True], description="every record has the task type's format",
            meta=_problem(f"are not valid {task_type} (the format report says why)"),
        ),
    ]
    if task_type is TaskType.CHAT_COMPLETION:
        checks += _chat_expectations(gxe)
    if task_type is TaskType.CONTINUED_PRETRAIN:
        # Documents are not cut here: the packer splits them across rows of context_length tokens.
        checks.append(gxe.ExpectColumnValuesToBeBetween(
            column="num_tokens", min_value=1, row_condition=valid, description="every document has tokens",
            meta=_problem("have no tokens"),
        ))
    else:
        checks += [
            gxe.ExpectColumnValuesToBeBetween(
                column="num_tokens", min_value=1, max_value=context_length, row_condition=valid,
                description=f"every example has 1 to context_length={context_length} tokens once cut",
                meta=_problem(f"have no tokens or more than context_length={context_length}"),
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="truncated", value_set=[False], row_condition=valid, severity="warning",
                description=f"every example fits in context_length={context_length} tokens",
                meta=_problem(f"are longer than context_length={context_length} tokens and are cut to it"),
            ),
        ]
    if task_type is TaskType.CONTINUED_PRETRAIN:
        left_out = "are empty, with no token to learn from, and are left out"
    else:
        left_out = f"keep no token to learn from within context_length={context_length} and are left out"
    checks.append(gxe.ExpectColumnValuesToBeBetween(
        column="num_loss_tokens", min_value=1, row_condition=valid, severity="warning",
        description="every example keeps a token to learn from", meta=_problem(left_out),
    ))
    return checks


def _chat_expectations(gxe) -> list[Any]:
    """A conversation's shape: a user turn and the assistant's reply at least, in alternation, each with text."""
    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="num_messages", min_value=2, description="a user message and the assistant's reply at least",
            meta=_problem("have fewer than 2 messages"),
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="role_pattern", regex=ROLE_PATTERN,
            description="an optional system message, then user and assistant turns in alternation",
            meta=_problem("do not alternate user and assistant turns after an optional system message"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="last_role", value_set=["assistant"], description="the last message is the assistant's",
            meta=_problem("do not end with an assistant message"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="num_empty_content", min_value=0, max_value=0, description="every message has text",
            meta=_problem("have a message with empty content"),
        ),
    ]


def _problem(text: str) -> dict[str, str]:
    """What a failure says about the records that fail, kept in the expectation so the artifact reads alone."""
    return {"problem": text}


def _describe(result: dict, noun: str) -> str:
    """One failed expectation as a line: '3 of 1,000 records have ...: lines 6, 9, 12 and 17 more'."""
    config, counts = result["expectation_config"], result["result"]
    if result["exception_info"].get("raised_exception"):
        error = result["exception_info"]["exception_message"]
        return f"{config['type']} on column {config['kwargs'].get('column')} could not be evaluated: {error}"
    if config["kwargs"].get("row_condition"):
        noun = f"valid {noun}"
    unexpected, total = counts["unexpected_count"], counts["element_count"]
    shown = counts["partial_unexpected_index_list"][:SHOWN_PER_KIND]
    unit = "document" if noun.endswith("documents") else "line"
    where = f"{unit}{'s' if unexpected > 1 else ''} {', '.join(map(str, shown))}"
    if unexpected > len(shown):
        where += f" and {unexpected - len(shown):,} more"
    return f"{unexpected:,} of {total:,} {noun} {config['meta']['problem']}: {where}"


def _import_gx():
    """great_expectations, imported on first use (seconds; workers that only fill the columns never pay it), with
    its import-time INFO logging and deprecation warnings kept out of the run's logs."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx
        import great_expectations.expectations  # noqa: F401 (gx.expectations)
    return gx
