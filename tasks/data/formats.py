"""The record format of each task type, as the anchor defines it, plus Amazon Bedrock's Converse format (what the
Nova SFT recipes read), and validation against it one record at a time: `record_problems` and `normalize` run in
worker processes on millions of records, so they stay cheap and import nothing heavy.

How a JSON Lines line becomes a record (`parse_line`), where Python's json module is lenient and we are not:
  - a UTF-8 byte order mark at the start of a line is dropped (editors on Windows write one; it carries no data);
  - NaN, Infinity and -Infinity are refused: they are not JSON, and other readers (Spark, Bedrock) reject them;
  - a key given twice in one object is refused: json keeps the last silently, other readers differ, and it is
    almost always a bug in the script that wrote the file;
  - nesting too deep for the parser is refused rather than raised;
  - CRLF line endings are accepted (JSON treats the CR as whitespace), and blank lines are skipped.
"""

import codecs
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.config import TaskType
from tasks.data.report import Problem
from tasks.data.template import TemplateSupport
from tasks.errors import InvalidInputError

ROLES = ("system", "user", "assistant")
BEDROCK_ROLES = ("user", "assistant")  # Bedrock gives the system prompt in the record's top-level "system" list
BEDROCK_SCHEMA = "bedrock-conversation-2024"
# Converse content blocks that carry something other than text; Tessera trains on text only.
NON_TEXT_BLOCKS = ("image", "video", "document", "toolUse", "toolResult", "reasoningContent", "cachePoint",
                   "guardContent", "citationsContent")
ONE_PER_LINE = "write one JSON object per line"
BLOCK_EXAMPLE = '{"text": "..."}'
_ABSENT = object()  # the role of a message that has none, or is not an object
# (previous turn's role, this one's) that may follow each other; None: no turn yet, after an optional system message.
_FOLLOWS = {(None, "user"), ("user", "assistant"), ("assistant", "user"), ("assistant", "tool"), ("tool", "tool"),
            ("tool", "assistant")}

# A checker gets the record and a Problem factory bound to its file and line: at(field, found, fix).
At = Callable[[str, str, str], Problem]


@dataclass(frozen=True)
class UnreadableLine:
    """A line parse_line could not turn into a JSON value, with the fix for that particular failure; it stays in
    the stream so validation can name where it is."""

    error: str
    fix: str = ONE_PER_LINE


class _NotJson(ValueError):
    """Raised from inside the JSON parser for what json accepts but JSON does not allow."""

    def __init__(self, found: str, fix: str):
        super().__init__(found)
        self.found, self.fix = found, fix


def parse_task_type(value: str) -> TaskType:
    """The TaskType named `value`, or an error listing them."""
    try:
        return TaskType(value)
    except ValueError:
        raise InvalidInputError(f"unknown task type {value!r}: use one of {', '.join(TaskType)}") from None


def parse_line(raw: bytes) -> Any:
    """One line of a JSON Lines file as a JSON value, or an UnreadableLine saying why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return UnreadableLine("a UTF-16 byte order mark", "save the file as UTF-8")
        return UnreadableLine(f"bytes that are not UTF-8 (0x{raw[e.start]:02x} at column {e.start + 1})",
                              "save the file as UTF-8")
    text = text.removeprefix("\ufeff")
    try:
        return _DECODER.decode(text)
    except _NotJson as e:
        return UnreadableLine(e.found, e.fix)
    except RecursionError:
        return UnreadableLine("JSON nested too deeply to read", "flatten the record: a record needs a few levels")
    except json.JSONDecodeError as e:
        if "\x00" in text:
            return UnreadableLine("NUL bytes, as in UTF-16 or binary files", "save the file as UTF-8 text")
        if _split_record(text, e):
            return UnreadableLine(f"part of a record ({e.msg} at column {e.colno})",
                                  "write each record whole on one line; a pretty-printed or cut-off file splits it")
        return UnreadableLine(f"invalid JSON ({e.msg} at column {e.colno})", ONE_PER_LINE)


def record_problems(record: Any, task_type: TaskType, at: At, template: TemplateSupport | None = None) -> list[Problem]:
    """Everything wrong with one record (a parsed line, or a document's text for CONTINUED_PRETRAIN); `template`
    says which optional roles the model's chat template renders (None: the anchor's roles, system/user/assistant)."""
    if isinstance(record, UnreadableLine):
        return [at("", record.error, record.fix)]
    if task_type is TaskType.CHAT_COMPLETION:
        check = bedrock_problems if is_bedrock(record) else _chat_problems
        return list(check(record, at, template))
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        return list(_instruction_problems(record, at))
    if not record.lstrip("\ufeff").strip():  # a UTF-8 byte order mark is no text
        return [at("", "an empty document", "write the document's text, or remove the file")]
    return []


def normalize(record: dict, task_type: TaskType) -> dict:
    """A valid record in the canonical shape: a Bedrock conversation becomes {"messages": [...]}, text blocks
    joined by newlines as vLLM joins text parts; every other record comes back as it is."""
    if task_type is not TaskType.CHAT_COMPLETION or not is_bedrock(record):
        return record
    system = joined(record.get("system", []))
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": m["role"], "content": joined(m["content"])} for m in record["messages"]]}


def describe(value: Any) -> str:
    """A JSON value as its writer would name it, kept short."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "NaN"  # pandas' missing value, in records from tables
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else "an object"


def _chat_problems(record: Any, at: At, template: TemplateSupport | None) -> Iterator[Problem]:
    """{"messages": [...]}: optional system first, then user and assistant alternate, ending with assistant;
    tool messages answer an assistant message where the template renders them."""
    if problem := _shape_problem(record, at, "messages", '{"messages": [...]}',
                                 other=("prompt", "a prompt/response record", "INSTRUCTION_FINETUNE")):
        yield problem
        return
    yield from key_problems(record, ("messages",), at)
    allowed = (*ROLES, "tool") if template and template.tool else ROLES
    yield from messages_problems(record, text_problems, allowed, at, template)


def _shape_problem(record: Any, at: At, key: str, example: str, other: tuple[str, str, str]) -> Problem | None:
    """A record that is no JSON object, or is one of the other task type's shape: `other` is that shape's key, what
    such a record is called, and its task type."""
    if not isinstance(record, dict):
        return at("", describe(record), f"{ONE_PER_LINE}, like {example}")
    other_key, called, task_type = other
    if key not in record and other_key in record:
        return at("", called, f"use task_type {task_type}, or write {example}")
    return None


def text_problems(content: Any, where: str, at: At) -> Iterator[Problem]:
    """A chat message's content: a string with some text in it."""
    if isinstance(content, list):
        yield at(where, "a list", "use a string: join the text parts into one")
    elif not isinstance(content, str):
        yield at(where, describe(content), "use a string")
    elif not content.strip():
        yield at(where, describe(content), "write the message's text")


def bedrock_problems(record: dict, at: At, template: TemplateSupport | None, prompt: bool = False
                     ) -> Iterator[Problem]:
    """Bedrock's Converse format: {"schemaVersion": ..., "system": [blocks], "messages": [{role, content: [blocks]}]},
    roles user and assistant, text blocks only. `prompt`: the messages are a prompt, as messages_problems says."""
    yield from key_problems(record, ("messages",), at, optional=("schemaVersion", "system"))
    if "schemaVersion" in record and record["schemaVersion"] != BEDROCK_SCHEMA:
        yield at("schemaVersion", describe(record["schemaVersion"]),
                 f"write {BEDROCK_SCHEMA!r}, or leave schemaVersion out")
    if "system" in record:
        system = record["system"]
        if not isinstance(system, list):
            yield at("system", describe(system), f"use a list of text blocks, like [{BLOCK_EXAMPLE}]")
        elif system:
            problems = _blocks_problems(system, "system", at)
            yield from problems
            if not problems and not joined(system).strip():
                yield at("system", describe(joined(system)), "write the system prompt's text, or leave system out")
            elif not problems and template and not template.system:
                yield at("system", "a system prompt", _no_system_fix(template))
    yield from messages_problems(record, blocks_content_problems, BEDROCK_ROLES, at, template, prompt)


def blocks_content_problems(content: Any, where: str, at: At) -> Iterator[Problem]:
    """A Converse message's content: a list of text blocks with some text in them."""
    if not isinstance(content, list):
        yield at(where, describe(content), f"use a list of content blocks, like [{BLOCK_EXAMPLE}]")
    elif not content:
        yield at(where, "an empty list", f"add a text block, like {BLOCK_EXAMPLE}")
    else:
        problems = _blocks_problems(content, where, at)
        yield from problems
        if not problems and not joined(content).strip():
            yield at(where, describe(joined(content)), "write the message's text")


def messages_problems(record: dict, content_problems: Callable[[Any, str, At], Iterator[Problem]],
                      allowed: tuple[str, ...], at: At, template: TemplateSupport | None, prompt: bool = False
                      ) -> Iterator[Problem]:
    """The conversation under "messages": at least two messages, each exactly role and content, in turn. A `prompt`
    (a preference pair's) is the conversation before the answers: at least one message, ending with the user's."""
    if "messages" not in record:
        return
    messages = record["messages"]
    if not isinstance(messages, list):
        yield at("messages", describe(messages), "use a list of {role, content} messages")
        return
    if len(messages) < (1 if prompt else 2):
        yield at("messages", f"{len(messages)} message(s)", "give at least a user message" if prompt
                 else "give at least a user message and the assistant's reply")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            yield at(where, describe(message), "use an object with role and content")
            continue
        yield from key_problems(message, ("role", "content"), at, prefix=f"{where}.")
        if "content" in message:
            yield from content_problems(message["content"], f"{where}.content", at)
    roles = [message.get("role", _ABSENT) if isinstance(message, dict) else _ABSENT for message in messages]
    yield from _turn_problems(roles, allowed, at, template, prompt)


def _blocks_problems(blocks: list, where: str, at: At) -> list[Problem]:
    """Each content block exactly {"text": "..."}."""
    return [problem for j, block in enumerate(blocks) for problem in _block_problems(block, f"{where}[{j}]", at)]


def _block_problems(block: Any, where: str, at: At) -> Iterator[Problem]:
    """One Converse content block: exactly {"text": "..."}; other kinds are named, not called unexpected keys."""
    if not isinstance(block, dict):
        yield at(where, describe(block), f"use a text block, like {BLOCK_EXAMPLE}")
        return
    kinds = [key for key in block if key in NON_TEXT_BLOCKS]
    if kinds:
        yield at(where, f"a non-text block ({kinds[0]})",
                 f"remove it, or give its text as {BLOCK_EXAMPLE}: Tessera trains on text only")
        return
    yield from key_problems(block, ("text",), at, prefix=f"{where}.")
    if "text" in block and not isinstance(block["text"], str):
        yield at(f"{where}.text", describe(block["text"]), "use a string")


def _instruction_problems(record: Any, at: At) -> Iterator[Problem]:
    """{"prompt": ..., "response": ...} (or "completion" instead of "response"), both strings."""
    if problem := _shape_problem(record, at, "prompt", '{"prompt": "...", "response": "..."}',
                                 other=("messages", "a conversation", "CHAT_COMPLETION")):
        yield problem
        return
    yield from key_problems(record, ("prompt",), at, optional=("response", "completion"))
    answers = [key for key in ("response", "completion") if key in record]
    if not answers:
        yield at("response", "nothing", "add 'response' (or 'completion'): the text the model learns to write")
    elif len(answers) == 2:
        yield at("completion", "both 'response' and 'completion'", "keep only one of them")
    for key in ("prompt", *answers):
        if key in record and not isinstance(record[key], str):
            yield at(key, describe(record[key]), "use a string")


def _turn_problems(roles: list[Any], allowed: tuple[str, ...], at: At,
                   template: TemplateSupport | None, prompt: bool = False) -> Iterator[Problem]:
    """Each role is allowed and in its place, and the last is the assistant's (a `prompt`'s: the user's or a tool's,
    where the answers begin). After a role that is itself wrong, the next is not judged by it."""
    previous: str | None = None  # the last turn's role; None before the first; "?" after a wrong or missing one
    for i, role in enumerate(roles):
        where = f"messages[{i}].role"
        if role is _ABSENT:  # a missing role or message, reported where it is missing
            previous = "?"
        elif role not in allowed:
            yield at(where, describe(role), _role_fix(role, allowed, template))
            previous = "?"
        elif role == "system":
            if i > 0:
                yield at(where, "'system'", "only the first message may be a system message")
            elif template and not template.system:
                yield at(where, "'system'", _no_system_fix(template))
        else:
            if fix := _order_fix(previous, role):
                yield at(where, describe(role), fix)
            previous = role
    last = roles[-1] if roles else None
    if prompt and last in allowed and last not in ("user", "tool"):
        yield at(f"messages[{len(roles) - 1}].role", describe(last),
                 "end the prompt with the user's message (or a tool result): the answers begin where it ends, so "
                 "move an assistant reply into the answers or drop it")
    elif not prompt and last in allowed and last != "assistant":
        yield at(f"messages[{len(roles) - 1}].role", describe(last),
                 "end with an assistant message: it is what the model learns to write")


def _order_fix(previous: str | None, role: str) -> str | None:
    """What is wrong with `role` right after `previous`, if anything."""
    if previous == "?" or (previous, role) in _FOLLOWS:
        return None
    if role == "tool":
        return "put tool messages right after the assistant message whose tool call they answer"
    if previous == "tool":
        return "follow tool messages with the assistant's answer"
    expected = "assistant" if previous == "user" else "user"
    return f"expected {expected!r}: after an optional system message, turns go user, assistant, user, ..."


def _role_fix(role: Any, allowed: tuple[str, ...], template: TemplateSupport | None) -> str:
    """The fix for a role that is not one of `allowed`, as close to what the writer meant as can be told."""
    if isinstance(role, str) and role.lower() in allowed:
        return f"use lowercase {role.lower()!r}"
    if role == "system":  # only Bedrock has roles without system
        return f'put the system prompt in the record\'s "system" list, like "system": [{BLOCK_EXAMPLE}]'
    if role == "tool" and template:
        return f"remove tool messages: the chat template of {template.model} does not render them"
    return f"use one of {', '.join(allowed)}"


def _no_system_fix(template: TemplateSupport) -> str:
    """The fix for a system prompt the model's template cannot render."""
    return (f"fold the system text into the first user message, or drop it: the chat template of {template.model} "
            "takes no system message")


def key_problems(obj: dict, required: tuple[str, ...], at: At, prefix: str = "",
                  optional: tuple[str, ...] = ()) -> Iterator[Problem]:
    """Required keys that are missing, and keys that are neither required nor optional."""
    allowed = required + optional
    for key in required:
        if key not in obj:
            yield at(prefix + key, "nothing", f"add {key!r}")
    for key in obj:
        if key not in allowed:
            yield at(prefix + str(key), "an unexpected key",
                     f"remove it; the keys allowed here are {', '.join(allowed)}")


def is_bedrock(record: Any) -> bool:
    """A Converse record: it names its schemaVersion, or gives some message's content as Converse blocks (objects
    without the "type" of OpenAI's content parts)."""
    if not isinstance(record, dict):
        return False
    if "schemaVersion" in record:
        return True
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(c := m.get("content"), list) and c and isinstance(c[0], dict)
        and "type" not in c[0] for m in messages)


def joined(blocks: list[dict]) -> str:
    """The text of valid Converse text blocks, one block per line."""
    return "\n".join(block["text"] for block in blocks)


def _split_record(text: str, error: json.JSONDecodeError) -> bool:
    """Whether the line looks like a piece of a record written over several lines, or cut off: it ends inside
    the value, is a `"key": value` line, or closes an object or list."""
    return (error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
            or (error.msg == "Extra data" and text[error.pos] == ":") or text.lstrip().startswith(("}", "]")))


def _reject_constant(name: str) -> Any:
    """json's hook for NaN, Infinity and -Infinity."""
    raise _NotJson(f"{name}, which is not JSON",
                   "write a string or null in its place (pandas writes NaN for missing values)")


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """json's hook for each object: a dict, unless a key repeats."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        key = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _NotJson(f"the key {key!r} twice in one object",
                       "keep one of them: JSON readers disagree on which one counts")
    return obj


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_object)
