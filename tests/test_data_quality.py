"""The data-quality suite, run by real great-expectations on frames like the ones the pipeline fills."""

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from tasks.config import TaskType
from tasks.data.quality import QUALITY_COLUMNS, run_suite

CONTEXT = 64
ROWS = 40


def good_frame(rows: int = ROWS, task_type: TaskType = TaskType.CHAT_COMPLETION) -> pd.DataFrame:
    """Records that pass: chat ones with a system message and one exchange; others with no chat columns."""
    chat = task_type is TaskType.CHAT_COMPLETION
    columns = {
        "line": np.arange(1, rows + 1),
        "num_messages": 3 if chat else 0,
        "role_pattern": "system,user,assistant" if chat else "",
        "last_role": "assistant" if chat else "",
        "num_empty_content": 0,
        "num_chars": 200,
        "num_tokens": 50,
        "num_loss_tokens": 20,
        "truncated": False,
        "valid": True,
    }
    return pd.DataFrame({name: np.full(rows, value) for name, value in columns.items()}).astype(QUALITY_COLUMNS)


def with_values(frame: pd.DataFrame, lines: list[int], **values) -> pd.DataFrame:
    """The frame with `values` set on the given (1-based) lines."""
    frame, rows = frame.copy(), frame["line"].isin(lines)
    for name, value in values.items():
        frame.loc[rows, name] = value
    return frame


def test_good_data_passes_and_the_result_is_json():
    outcome = run_suite(good_frame(), TaskType.CHAT_COMPLETION, CONTEXT)
    assert outcome.success and outcome.failed == [] and outcome.warnings == []
    result = json.loads(json.dumps(outcome.result))
    assert result["success"] and result["statistics"]["evaluated_expectations"] == 8


@pytest.mark.parametrize(("values", "expected"), [
    ({"num_messages": 1, "role_pattern": "user", "last_role": "user"}, "have fewer than 2 messages"),
    ({"role_pattern": "user,user,assistant"}, "do not alternate user and assistant turns"),
    ({"role_pattern": "user,assistant,user", "last_role": "user"}, "do not end with an assistant message"),
    ({"num_empty_content": 1}, "have a message with empty content"),
])
def test_each_chat_defect_fails_with_its_count_and_lines(values, expected):
    frame = with_values(good_frame(), [7, 20, 33], valid=False, num_tokens=0, num_loss_tokens=0, **values)
    outcome = run_suite(frame, TaskType.CHAT_COMPLETION, CONTEXT)
    assert not outcome.success and outcome.warnings == []
    # The invalid records fail their own expectation and `valid`; the token ones judge valid records only.
    assert outcome.failed[0] == (f"3 of {ROWS} records are not valid CHAT_COMPLETION (the format report says why): "
                                 "lines 7, 20, 33")
    assert any(line.startswith(f"3 of {ROWS} records {expected}") and line.endswith(": lines 7, 20, 33")
               for line in outcome.failed[1:]), outcome.failed


def test_more_failures_than_shown_are_counted():
    frame = with_values(good_frame(), [2, 3, 5, 8, 13], valid=False)
    [line] = run_suite(frame, TaskType.CHAT_COMPLETION, CONTEXT).failed
    assert line == (f"5 of {ROWS} records are not valid CHAT_COMPLETION (the format report says why): "
                    "lines 2, 3, 5 and 2 more")


def test_tool_turns_after_an_assistant_turn_are_allowed():
    frame = with_values(good_frame(), [4], num_messages=6, role_pattern="user,assistant,tool,tool,assistant,user,"
                        "assistant")
    assert run_suite(frame, TaskType.CHAT_COMPLETION, CONTEXT).success
    frame = with_values(good_frame(), [4], num_messages=3, role_pattern="user,assistant,tool", last_role="tool")
    assert len(run_suite(frame, TaskType.CHAT_COMPLETION, CONTEXT).failed) == 2


def test_truncation_and_examples_without_loss_are_warnings():
    frame = with_values(good_frame(), [1, 2], truncated=True, num_tokens=CONTEXT)
    frame = with_values(frame, [9], num_loss_tokens=0)
    outcome = run_suite(frame, TaskType.INSTRUCTION_FINETUNE, CONTEXT)
    assert outcome.success and outcome.failed == []
    assert outcome.warnings == [
        f"2 of {ROWS} valid records are longer than context_length={CONTEXT} tokens and are cut to it: lines 1, 2",
        f"1 of {ROWS} valid records keep no token to learn from within context_length={CONTEXT} and are left out: "
        "line 9",
    ]
    severities = {r["expectation_config"]["kwargs"]["column"]: r["expectation_config"]["severity"]
                  for r in outcome.result["results"] if not r["success"]}
    assert severities == {"truncated": "warning", "num_loss_tokens": "warning"}


def test_examples_longer_than_the_context_fail_except_documents():
    frame = with_values(good_frame(task_type=TaskType.INSTRUCTION_FINETUNE), [5], num_tokens=CONTEXT + 1)
    [line] = run_suite(frame, TaskType.INSTRUCTION_FINETUNE, CONTEXT).failed
    assert line == f"1 of {ROWS} valid records have no tokens or more than context_length={CONTEXT}: line 5"
    # The packer splits documents across rows; an empty one is left out, with a warning.
    frame = with_values(good_frame(task_type=TaskType.CONTINUED_PRETRAIN), [6], num_loss_tokens=0)
    outcome = run_suite(with_values(frame, [5], num_tokens=10 * CONTEXT), TaskType.CONTINUED_PRETRAIN, CONTEXT)
    assert outcome.success
    assert outcome.warnings == [f"1 of {ROWS} valid documents are empty, with no token to learn from, and are left "
                                "out: document 6"]


def test_suites_differ_by_task_type():
    def judged(task_type: TaskType) -> set[str]:
        result = run_suite(good_frame(task_type=task_type), task_type, CONTEXT)
        assert result.success, result.failed
        return {r["expectation_config"]["kwargs"]["column"] for r in result.result["results"]}

    chat, instructions, documents, pairs = (judged(t) for t in TaskType)
    assert chat == {"valid", "num_messages", "role_pattern", "last_role", "num_empty_content", "num_tokens",
                    "truncated", "num_loss_tokens"}
    assert instructions == pairs == {"valid", "num_tokens", "truncated", "num_loss_tokens"}
    assert documents == {"valid", "num_tokens", "num_loss_tokens"}
    # Instruction records have no chat columns, so the chat suite would fail them.
    assert not run_suite(good_frame(task_type=TaskType.INSTRUCTION_FINETUNE), TaskType.CHAT_COMPLETION,
                         CONTEXT).success


def test_no_records_leave_nothing_to_judge():
    # A source with no records at all gives no columns either; the format report fails it.
    assert run_suite(pd.DataFrame(), TaskType.CONTINUED_PRETRAIN, CONTEXT).success


def test_missing_columns_are_refused():
    with pytest.raises(ValueError, match="num_tokens, truncated"):
        run_suite(good_frame().drop(columns=["truncated", "num_tokens"]), TaskType.CHAT_COMPLETION, CONTEXT)


def test_no_files_are_left_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_suite(with_values(good_frame(), [3], valid=False), TaskType.CHAT_COMPLETION, CONTEXT)
    assert os.listdir(tmp_path) == []


def test_a_hundred_thousand_failing_rows_take_no_per_row_path():
    frame = with_values(good_frame(100_000), list(range(1, 100_001)), valid=False, num_messages=1,
                        role_pattern="user", last_role="user", truncated=True)
    run_suite(good_frame(), TaskType.CHAT_COMPLETION, CONTEXT)  # GX imported and warmed up
    start = time.perf_counter()
    outcome = run_suite(frame, TaskType.CHAT_COMPLETION, CONTEXT)
    # About 0.3 s here; reading each unexpected row (GX's unexpected_index_column_names) takes seconds per failure.
    assert time.perf_counter() - start < 5
    assert len(outcome.failed) == 4 and len(json.dumps(outcome.result)) < 50_000
