"""The record format of each task type, as the anchor defines it, and validation against it."""

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from tasks.data.report import DataReport, Problem
from tasks.data.sources import Unparsable, local_path, read_documents, read_jsonl, text_files
from tasks.config import TaskType
from tasks.errors import InvalidInputError

ROLES = ("system", "user", "assistant")


def parse_task_type(value: str) -> TaskType:
    try:
        return TaskType(value)
    except ValueError:
        raise InvalidInputError(f"unknown task type {value!r}: use one of {', '.join(TaskType)}") from None


# A checker gets the record and a Problem factory bound to its file and line: at(field, found, fix).
At = Callable[[str, str, str], Problem]


def chat_problems(record: Any, at: At) -> Iterator[Problem]:
    """{"messages": [...]}: optional system first, then user and assistant alternate, ending with assistant."""
    if not isinstance(record, dict):
        yield at("", describe(record), 'write one JSON object per line, like {"messages": [...]}')
        return
    yield from _key_problems(record, ("messages",), at)
    if "messages" not in record:
        return
    messages = record["messages"]
    if not isinstance(messages, list):
        yield at("messages", describe(messages), "use a list of {role, content} messages")
        return
    if len(messages) < 2:
        yield at("messages", f"{len(messages)} message(s)", "give at least a user message and the assistant's reply")
    turn = 0  # position among the non-system messages: even ones are the user's, odd ones the assistant's
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            yield at(where, describe(message), "use an object with role and content")
            turn += 1
            continue
        yield from _key_problems(message, ("role", "content"), at, prefix=f"{where}.")
        role, content = message.get("role"), message.get("content")
        if "role" in message:
            yield from _role_problems(role, i, turn, at)
        if role != "system":
            turn += 1
        if "content" in message:
            if not isinstance(content, str):
                yield at(f"{where}.content", describe(content), "use a string")
            elif not content.strip():
                yield at(f"{where}.content", describe(content), "write the message's text")
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") in ("system", "user"):
        yield at(f"messages[{len(messages) - 1}].role", describe(last["role"]),
                 "end with an assistant message: it is what the model learns to write")


def instruction_problems(record: Any, at: At) -> Iterator[Problem]:
    """{"prompt": ..., "response": ...} (or "completion" instead of "response"), both strings."""
    if not isinstance(record, dict):
        yield at("", describe(record), 'write one JSON object per line, like {"prompt": "...", "response": "..."}')
        return
    yield from _key_problems(record, ("prompt",), at, optional=("response", "completion"))
    answers = [key for key in ("response", "completion") if key in record]
    if not answers:
        yield at("response", "nothing", "add 'response' (or 'completion'): the text the model learns to write")
    elif len(answers) == 2:
        yield at("completion", "both 'response' and 'completion'", "keep only one of them")
    for key in ("prompt", *answers):
        if key in record and not isinstance(record[key], str):
            yield at(key, describe(record[key]), "use a string")


def validate_records(records: Iterable[tuple[int, Any]], task_type: TaskType, name: str, source: str) -> DataReport:
    """Check every (line, record) pair of a JSONL-like source; `name` is the file name the messages cite."""
    check = chat_problems if task_type is TaskType.CHAT_COMPLETION else instruction_problems
    report = DataReport(source, task_type)
    for line, record in records:
        at = partial(Problem, name, line)
        if isinstance(record, Unparsable):
            report.add_record([at("", record.error, "write one JSON object per line")])
        else:
            report.add_record(list(check(record, at)))
    if report.num_records == 0:
        report.add_problem(Problem(name, None, "", "no records", "write one JSON object per line"))
    return report


def validate_documents(path: Path, source: str) -> DataReport:
    """CONTINUED_PRETRAIN: a .txt file, or a folder searched recursively for .txt files, all UTF-8."""
    report = DataReport(source, TaskType.CONTINUED_PRETRAIN)
    if path.is_file() and path.suffix != ".txt":
        report.add_problem(Problem(path.name, None, "", f"a {path.suffix or 'extensionless'} file",
                                   "use a .txt file, or a folder of .txt files"))
        return report
    if not text_files(path):
        report.add_problem(Problem(path.name, None, "", "no .txt files", "put each document in a .txt file"))
        return report
    for name, text in read_documents(path):
        if isinstance(text, Unparsable):
            report.add_record([Problem(name, None, "", text.error, "save the file as UTF-8 text")])
        else:
            report.add_record([])
    return report


def validate_data_file(path: str | Path, task_type: str) -> DataReport:
    """Check a local training file (or folder, for CONTINUED_PRETRAIN) against its task type's format."""
    task = parse_task_type(task_type)
    local = local_path(path)
    if not local.exists():
        raise InvalidInputError(f"training data {path} does not exist: check the path")
    if task is TaskType.CONTINUED_PRETRAIN:
        return validate_documents(local, str(path))
    if local.is_dir():
        raise InvalidInputError(
            f"training data {path} is a folder: {task} reads one JSONL file "
            "(folders of .txt files are for CONTINUED_PRETRAIN)"
        )
    return validate_records(read_jsonl(local), task, local.name, str(path))


def raise_if_invalid(report: DataReport) -> None:
    if not report.ok:
        raise InvalidInputError(report.render())


def describe(value: Any) -> str:
    """A JSON value as its writer would name it, kept short."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else "an object"


def _role_problems(role: Any, i: int, turn: int, at: At) -> Iterator[Problem]:
    where = f"messages[{i}].role"
    expected = ("user", "assistant")[turn % 2]
    if role not in ROLES:
        yield at(where, describe(role), f"use one of {', '.join(ROLES)}")
    elif role == "system" and i > 0:
        yield at(where, "'system'", "only the first message may be a system message")
    elif role not in ("system", expected):
        yield at(where, describe(role),
                 f"expected {expected!r}: after an optional system message, turns go user, assistant, user, ...")


def _key_problems(obj: dict, required: tuple[str, ...], at: At, prefix: str = "",
                  optional: tuple[str, ...] = ()) -> Iterator[Problem]:
    allowed = required + optional
    for key in required:
        if key not in obj:
            yield at(prefix + key, "nothing", f"add {key!r}")
    for key in obj:
        if key not in allowed:
            yield at(prefix + str(key), "an unexpected key",
                     f"remove it; the keys allowed here are {', '.join(allowed)}")
