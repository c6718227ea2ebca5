"""Preference pairs (task_type DPO) in the formats users have, checked one record at a time like formats.py's records,
and each turned into one canonical Pair:

  - OpenAI / Together / Fireworks: {"input": {"messages": [...], "tools": [...]}, "preferred_output": [assistant],
    "non_preferred_output": [assistant]}, one assistant message per answer;
  - TRL, explicit: {"prompt", "chosen", "rejected"}, all three strings (tokenized as they are, like
    INSTRUCTION_FINETUNE) or a conversation and one assistant message each; implicit: {"chosen", "rejected"}, two
    whole conversations that share every message but the last, which is each one's answer;
  - Amazon Nova: a Converse conversation whose last turn is the assistant's with two `candidates`, one labelled
    "preferred", the other "non-preferred".

Answers are one assistant message each, as OpenAI, Together and Nova define a pair: the prompt is everything before
it and ends with the user's message (or a tool result)."""

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.config import TaskType
from tasks.data.formats import (
    ONE_PER_LINE,
    ROLES,
    At,
    UnreadableLine,
    bedrock_problems,
    blocks_content_problems,
    describe,
    joined,
    key_problems,
    messages_problems,
    normalize,
    text_problems,
)
from tasks.data.report import Problem
from tasks.data.template import TemplateSupport

OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
TRL_KEYS = ("prompt", "chosen", "rejected")
TOOLS_FIELD = "input.tools"  # where a pair's tool definitions are written (OpenAI's format only has them)
LABELS = ("preferred", "non-preferred")  # Nova's preferenceLabel values
ANSWER_EXAMPLE = '[{"role": "assistant", "content": "..."}]'
CANDIDATE_EXAMPLE = '{"content": [{"text": "..."}], "preferenceLabel": "preferred"}'
FORMS = ('{"prompt": ..., "chosen": ..., "rejected": ...}, {"input": {"messages": [...]}, "preferred_output": [...], '
         '"non_preferred_output": [...]}, or a Converse conversation whose last assistant turn has candidates')


@dataclass(frozen=True)
class Pair:
    """One preference pair, whatever format it came in. `where` names the prompt, chosen and rejected fields as the
    record wrote them, for problems found once the pair is tokenized."""

    prompt: list[dict] | str  # the conversation before the answers (rendered by the chat template), or plain text
    chosen: str  # the preferred answer's text
    rejected: str
    tools: list[dict] | None  # tool definitions the chat template renders with the prompt
    where: tuple[str, str, str]

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class _Format:
    problems: Callable[[dict, At, TemplateSupport | None], Iterator[Problem]]
    pair: Callable[[dict], Pair]  # of a record without problems


def pair_problems(record: Any, at: At, template: TemplateSupport | None = None) -> list[Problem]:
    """Everything wrong with one record as a preference pair; `template` as formats.record_problems takes it."""
    if isinstance(record, UnreadableLine):
        return [at("", record.error, record.fix)]
    if not isinstance(record, dict):
        return [at("", describe(record), f"{ONE_PER_LINE}, like {FORMS}")]
    form = _format_of(record)
    if form is None:
        keys = ", ".join(map(str, record)) or "none"
        return [at("", f"no preference pair (keys: {keys})", f"write a pair as {FORMS}")]
    problems = list(form.problems(record, at, template))
    if not problems:
        pair = form.pair(record)
        if pair.chosen.strip() == pair.rejected.strip():
            problems.append(at(pair.where[2], f"the same answer as {pair.where[1]}",
                               "give two different answers: a pair teaches by the difference between them"))
    return problems


def canonical_pair(record: dict) -> Pair:
    """A record without problems as its Pair."""
    return _format_of(record).pair(record)


def _format_of(record: dict) -> _Format | None:
    if any(key in record for key in OPENAI_KEYS):
        return _OPENAI
    if "chosen" in record or "rejected" in record:
        return _TRL
    if "messages" in record:
        return _NOVA
    return _TRL if "prompt" in record else None


def _allowed(template: TemplateSupport | None) -> tuple[str, ...]:
    return (*ROLES, "tool") if template and template.tool else ROLES


def _moved(at: At, to: str) -> At:
    """`at` for a conversation checked as if it were under "messages" but written under `to`."""
    return lambda field, found, fix: at(to + field.removeprefix("messages"), found, fix)


def _sides_problems(record: dict, sides: tuple[str, str], at: At) -> Iterator[Problem]:
    """A missing answer, named with what it is."""
    for key, what in zip(sides, ("the better answer", "the worse answer")):
        if key not in record:
            yield at(key, "nothing", f"add {key!r}, {what}: a pair needs both answers")


def _answer_problems(value: Any, field: str, at: At) -> Iterator[Problem]:
    """An answer given as a list holding exactly one assistant message with text."""
    if not isinstance(value, list):
        yield at(field, describe(value), f"use a list holding the one assistant message, like {ANSWER_EXAMPLE}")
        return
    if len(value) != 1:
        yield at(field, f"{len(value)} messages", "give exactly one assistant message: a pair compares two answers "
                 "to the same prompt")
        return
    message, where = value[0], f"{field}[0]"
    if not isinstance(message, dict):
        yield at(where, describe(message), "use an object with role and content")
        return
    yield from key_problems(message, ("role", "content"), at, prefix=f"{where}.")
    if "role" in message and message["role"] != "assistant":
        yield at(f"{where}.role", describe(message["role"]), "use 'assistant': the answers are the assistant's")
    if "content" in message:
        yield from text_problems(message["content"], f"{where}.content", at)


def _tools_problems(tools: Any, field: str, at: At) -> Iterator[Problem]:
    """Tool definitions as OpenAI's chat API takes them: [{"type": "function", "function": {"name": ...}}]."""
    if not isinstance(tools, list):
        yield at(field, describe(tools), 'use a list of {"type": "function", "function": {...}} definitions')
        return
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]):
            yield at(f"{field}[{i}]", describe(tool),
                     'use {"type": "function", "function": {"name": "...", "parameters": {...}}}')


# OpenAI / Together / Fireworks

def _openai_problems(record: dict, at: At, template: TemplateSupport | None) -> Iterator[Problem]:
    yield from key_problems(record, ("input",), at, optional=OPENAI_KEYS[1:])
    yield from _sides_problems(record, OPENAI_KEYS[1:], at)
    source = record.get("input")
    if isinstance(source, dict):
        yield from key_problems(source, ("messages",), at, prefix="input.", optional=("tools", "parallel_tool_calls"))
        yield from messages_problems(source, text_problems, _allowed(template), _moved(at, "input.messages"),
                                     template, prompt=True)
        if "tools" in source:
            yield from _tools_problems(source["tools"], TOOLS_FIELD, at)
        if not isinstance(source.get("parallel_tool_calls", True), bool):
            yield at("input.parallel_tool_calls", describe(source["parallel_tool_calls"]), "use true or false")
    elif "input" in record:
        yield at("input", describe(source), 'use an object holding the prompt, like {"messages": [...]}')
    for key in OPENAI_KEYS[1:]:
        if key in record:
            yield from _answer_problems(record[key], key, at)


def _openai_pair(record: dict) -> Pair:
    source = record["input"]
    return Pair(source["messages"], record["preferred_output"][0]["content"],
                record["non_preferred_output"][0]["content"], source.get("tools") or None,
                ("input.messages", "preferred_output[0].content", "non_preferred_output[0].content"))


# TRL: explicit prompt, or implicit in two conversations

def _trl_problems(record: dict, at: At, template: TemplateSupport | None) -> Iterator[Problem]:
    yield from key_problems(record, (), at, optional=TRL_KEYS)
    yield from _sides_problems(record, TRL_KEYS[1:], at)
    given = [key for key in TRL_KEYS if key in record]
    for key in given:
        if not isinstance(record[key], str | list):
            yield at(key, describe(record[key]), "use a string, or a list of {role, content} messages")
    if "prompt" not in record:
        yield from _implicit_problems(record, at, template)
        return
    kinds = {key: type(record[key]) for key in given if isinstance(record[key], str | list)}
    if kinds.get("prompt") is str:
        for key in given:
            if kinds.get(key) is list:
                yield at(key, "a list while prompt is a string", "give prompt, chosen and rejected all as strings "
                         "or all as lists of {role, content} messages")
            elif kinds.get(key) is str:
                yield from text_problems(record[key], key, at)
    elif kinds.get("prompt") is list:
        yield from messages_problems({"messages": record["prompt"]}, text_problems, _allowed(template),
                                     _moved(at, "prompt"), template, prompt=True)
        for key in given[1:]:
            if kinds.get(key) is str:
                yield at(key, "a string while prompt is a list of messages", "give chosen and rejected as "
                         f"lists holding the assistant's answer, like {ANSWER_EXAMPLE}")
            elif kinds.get(key) is list:
                yield from _answer_problems(record[key], key, at)


def _implicit_problems(record: dict, at: At, template: TemplateSupport | None) -> Iterator[Problem]:
    """Two whole conversations, identical but for their last message, the answer."""
    sides = [record.get(key) for key in TRL_KEYS[1:]]
    if any(isinstance(side, str) for side in sides):
        yield at("prompt", "nothing", "add 'prompt', the text both answers follow: with chosen and rejected as "
                 "strings, nothing says where the prompt ends (or give both as conversations that share it)")
        return
    if not all(isinstance(side, list) for side in sides):
        return
    problems = [problem for key, side in zip(TRL_KEYS[1:], sides)
                for problem in messages_problems({"messages": side}, text_problems, _allowed(template),
                                                 _moved(at, key), template)]
    yield from problems
    chosen, rejected = sides
    if problems or chosen[:-1] == rejected[:-1]:
        return
    differ = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                  min(len(chosen), len(rejected)) - 1)
    yield at(f"rejected[{differ}]", f"a message that is not chosen[{differ}]",
             "make both conversations the same up to their last message: the messages they share are the prompt "
             "and each one's last message its answer (or give prompt, chosen and rejected apart)")


def _trl_pair(record: dict) -> Pair:
    if "prompt" not in record:
        chosen, rejected = record["chosen"], record["rejected"]
        last = len(chosen) - 1
        return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], None,
                    ("chosen", f"chosen[{last}].content", f"rejected[{last}].content"))
    if isinstance(record["prompt"], str):
        return Pair(record["prompt"], record["chosen"], record["rejected"], None, TRL_KEYS)
    return Pair(record["prompt"], record["chosen"][0]["content"], record["rejected"][0]["content"], None,
                ("prompt", "chosen[0].content", "rejected[0].content"))


# Amazon Nova: Converse, the last assistant turn holding the candidates

def _nova_problems(record: dict, at: At, template: TemplateSupport | None) -> Iterator[Problem]:
    messages = record["messages"]
    if not (isinstance(messages, list) and messages):
        yield from bedrock_problems(record, at, template, prompt=True)
        return
    answers = list(_candidates_problems(messages[-1], f"messages[{len(messages) - 1}]", at))
    if answers and "candidates" not in messages[-1]:  # not a pair at all: the rest would only add noise
        yield from answers
        return
    yield from bedrock_problems({**record, "messages": messages[:-1]}, at, template, prompt=True)
    yield from answers


def _candidates_problems(turn: Any, where: str, at: At) -> Iterator[Problem]:
    if not (isinstance(turn, dict) and "candidates" in turn):
        yield at(where, "no candidates", f"give the last turn the assistant's two answers, like {{\"role\": "
                 f"\"assistant\", \"candidates\": [{CANDIDATE_EXAMPLE}, {{... \"non-preferred\"}}]}} (Nova's DPO "
                 "format), or use task_type CHAT_COMPLETION")
        return
    yield from key_problems(turn, ("role", "candidates"), at, prefix=f"{where}.")
    if turn.get("role", "assistant") != "assistant":
        yield at(f"{where}.role", describe(turn["role"]), "use 'assistant': the candidates are the assistant's")
    candidates = turn["candidates"]
    if not isinstance(candidates, list):
        yield at(f"{where}.candidates", describe(candidates), f"use a list of two candidates, like [{CANDIDATE_EXAMPLE}"
                 ", ...]")
        return
    for j, candidate in enumerate(candidates):
        field = f"{where}.candidates[{j}]"
        if not isinstance(candidate, dict):
            yield at(field, describe(candidate), f"use a candidate like {CANDIDATE_EXAMPLE}")
            continue
        yield from key_problems(candidate, ("content", "preferenceLabel"), at, prefix=f"{field}.")
        if "content" in candidate:
            yield from blocks_content_problems(candidate["content"], f"{field}.content", at)
        if candidate.get("preferenceLabel", LABELS[0]) not in LABELS:
            yield at(f"{field}.preferenceLabel", describe(candidate["preferenceLabel"]),
                     "use 'preferred' or 'non-preferred'")
    labels = Counter(c.get("preferenceLabel") for c in candidates if isinstance(c, dict))
    for label, what in zip(LABELS, ("the better answer", "the worse answer")):
        if labels[label] > 1:
            yield at(f"{where}.candidates", f"{labels[label]} candidates labelled {label!r}",
                     f"label one candidate {label!r} and the other {LABELS[label == LABELS[0]]!r}: a pair has one of "
                     "each")
        elif labels[label] == 0 and set(labels) <= set(LABELS) and max(labels.values(), default=0) <= 1:
            yield at(f"{where}.candidates", f"no candidate labelled {label!r}",
                     f"add {what}, labelled {label!r}: a pair needs both answers")


def _nova_pair(record: dict) -> Pair:
    *prompt, turn = record["messages"]
    last = len(prompt)
    labelled = {c["preferenceLabel"]: (j, joined(c["content"])) for j, c in enumerate(turn["candidates"])}
    (good, chosen), (bad, rejected) = labelled["preferred"], labelled["non-preferred"]
    messages = normalize({**record, "messages": prompt}, TaskType.CHAT_COMPLETION)["messages"]
    return Pair(messages, chosen, rejected, None,
                ("messages", f"messages[{last}].candidates[{good}]", f"messages[{last}].candidates[{bad}]"))


_OPENAI = _Format(_openai_problems, _openai_pair)
_TRL = _Format(_trl_problems, _trl_pair)
_NOVA = _Format(_nova_problems, _nova_pair)
