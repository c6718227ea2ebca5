"""The format checks, one record at a time, as the pipeline's workers run them: parse_line turns a line into a
record, record_problems names every problem by file, line and field with a fix, DataReport counts and renders them.
What a whole file gets through the real pipeline is in test_data_malformed.py."""

import copy
import json
from functools import partial
from typing import Any

import pytest

from tasks.config import TaskType
from tasks.data.formats import UnreadableLine, normalize, parse_line, record_problems
from tasks.data.report import DataReport, Problem
from tasks.data.template import TemplateSupport, probe
from tasks.errors import InvalidInputError

CHAT = "CHAT_COMPLETION"
IFT = "INSTRUCTION_FINETUNE"
CPT = "CONTINUED_PRETRAIN"


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = chat(("user", "Hi"), ("assistant", "Hello!"))


def line_of(record: Any) -> bytes:
    """A JSON Lines line holding `record`; a string or bytes is the line as it is."""
    if isinstance(record, bytes):
        return record
    return (record if isinstance(record, str) else json.dumps(record)).encode()


def problems(task: str, record: Any, template: TemplateSupport | None = None, name: str = "train.jsonl",
             line: int | None = 7, unit: str = "line") -> list[Problem]:
    """What the pipeline's worker finds in `record` written on line `line` of `name` (for CONTINUED_PRETRAIN,
    `record` is a document's text)."""
    record = record if task == CPT else parse_line(line_of(record))
    return record_problems(record, TaskType(task), partial(Problem, name, line, unit=unit), template)


def report_of(name: str, records: list, task: str = CHAT) -> DataReport:
    """A worker's report on a file holding `records`, one per line."""
    report = DataReport(name, task)
    for number, record in enumerate(records, 1):
        report.add_record(problems(task, record, name=name, line=number))
    return report


@pytest.mark.parametrize("task, record, expected", [
    (CHAT, chat(("user", "Hi"), ("assistant", "Hello"), ("bot", "x")),
     "train.jsonl line 7, field messages[2].role: found 'bot'; use one of system, user, assistant"),
    (CHAT, '{"messages": [}',
     "train.jsonl line 7: found invalid JSON (Expecting value at column 15); write one JSON object per line"),
    (CHAT, [GOOD_CHAT],
     'train.jsonl line 7: found a list; write one JSON object per line, like {"messages": [...]}'),
    (CHAT, {**GOOD_CHAT, "id": 3},
     "train.jsonl line 7, field id: found an unexpected key; remove it; the keys allowed here are messages"),
    (CHAT, {"conversation": []},
     "train.jsonl line 7, field messages: found nothing; add 'messages'"),
    (CHAT, {"messages": "Hi"},
     "train.jsonl line 7, field messages: found 'Hi'; use a list of {role, content} messages"),
    (CHAT, chat(("user", "Hi")),
     "train.jsonl line 7, field messages: found 1 message(s); give at least a user message and the assistant's reply"),
    (CHAT, chat(("user", "Hi"), ("system", "Be brief"), ("assistant", "Hello")),
     "train.jsonl line 7, field messages[1].role: found 'system'; only the first message may be a system message"),
    (CHAT, chat(("system", "Be brief"), ("assistant", "Hello")),
     "train.jsonl line 7, field messages[1].role: found 'assistant'; expected 'user': after an optional system "
     "message, turns go user, assistant, user, ..."),
    (CHAT, chat(("user", "Hi"), ("user", "Hello?"), ("assistant", "Hello")),
     "train.jsonl line 7, field messages[1].role: found 'user'; expected 'assistant'"),
    (CHAT, chat(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
     "train.jsonl line 7, field messages[2].role: found 'user'; end with an assistant message"),
    (CHAT, chat(("user", "Hi"), ("assistant", "  ")),
     "train.jsonl line 7, field messages[1].content: found '  '; write the message's text"),
    (CHAT, {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Hi"}]},
     "train.jsonl line 7, field messages[0].content: found the number 42; use a string"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hi"}]},
     "train.jsonl line 7, field messages[0].name: found an unexpected key; remove it; the keys allowed here are "
     "role, content"),
    (CHAT, {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hi"}]},
     "train.jsonl line 7, field messages[0].role: found nothing; add 'role'"),
    (IFT, {"prompt": "Q"},
     "train.jsonl line 7, field response: found nothing; add 'response' (or 'completion')"),
    (IFT, {"prompt": "Q", "response": "A", "completion": "A"},
     "train.jsonl line 7, field completion: found both 'response' and 'completion'; keep only one of them"),
    (IFT, {"prompt": None, "completion": "A"},
     "train.jsonl line 7, field prompt: found null; use a string"),
    (IFT, {"prompt": "Q", "response": "A", "source": "wiki"},
     "train.jsonl line 7, field source: found an unexpected key; remove it; the keys allowed here are prompt, "
     "response, completion"),
])
def test_each_problem_names_file_line_and_field(task, record, expected):
    assert expected in "\n".join(map(str, problems(task, record)))


def test_a_record_reports_all_its_problems():
    record = {"messages": [{"role": "bot", "content": ""}, {"role": "assistant", "content": 1}], "x": 1}
    fields = [p.field for p in problems(CHAT, record)]
    assert sorted(fields) == ["messages[0].content", "messages[0].role", "messages[1].content", "x"]


def test_repeated_problems_show_a_few_and_count_the_rest():
    bad = chat(("user", "Hi"), ("bot", "Hello"))
    message = report_of("train.jsonl", [GOOD_CHAT, *[bad] * 10, GOOD_CHAT]).render()
    assert message.startswith("train.jsonl: 10 of 12 records are not valid CHAT_COMPLETION")
    assert "train.jsonl line 2, field messages[1].role: found 'bot'" in message
    assert message.count("found 'bot'") == 3
    assert "... and 7 more like this" in message


def test_valid_records_pass():
    system = chat(("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye"))
    assert problems(CHAT, GOOD_CHAT) == problems(CHAT, system) == []
    assert problems(IFT, {"prompt": "Q", "response": "A"}) == problems(IFT, {"prompt": "", "completion": "A"}) == []
    assert problems(CPT, "One document.") == []


def test_how_a_line_becomes_a_record():
    assert parse_line(b'\xef\xbb\xbf{"a": 1}\r\n') == {"a": 1}  # a byte order mark and CRLF carry no data
    assert parse_line(b'{"a": NaN}') == UnreadableLine(
        "NaN, which is not JSON", "write a string or null in its place (pandas writes NaN for missing values)")
    assert parse_line(b'{"a": 1, "a": 2}').error == "the key 'a' twice in one object"


def test_a_line_that_is_not_utf8_is_named():
    assert [str(p) for p in problems(CHAT, b'{"messages": "\xff"}', line=2)] == [
        "train.jsonl line 2: found bytes that are not UTF-8 (0xff at column 15); save the file as UTF-8"]


def test_an_empty_document_is_invalid():
    for text in ("", "  \n", "\ufeff"):
        assert [str(p) for p in problems(CPT, text, name="a.txt", line=None)] == [
            "a.txt: found an empty document; write the document's text, or remove the file"]

def bedrock(*turns: tuple[str, str], system: list[str] | None = None) -> dict:
    record: dict = {"schemaVersion": "bedrock-conversation-2024"}
    if system is not None:
        record["system"] = [{"text": text} for text in system]
    record["messages"] = [{"role": role, "content": [{"text": text}]} for role, text in turns]
    return record


def at_line_1(field: str, found: str, fix: str) -> Problem:
    return Problem("t.jsonl", 1, field, found, fix)


def test_bedrock_records_become_messages():
    record = bedrock(("user", "Hi"), ("assistant", "Hello"), system=["Be brief.", "Be kind."])
    record["messages"][1]["content"].append({"text": "How can I help?"})
    assert record_problems(record, TaskType.CHAT_COMPLETION, at_line_1) == []
    assert normalize(record, TaskType.CHAT_COMPLETION) == chat(
        ("system", "Be brief.\nBe kind."), ("user", "Hi"), ("assistant", "Hello\nHow can I help?"))
    # No schemaVersion and no system: still Converse, told apart by its content blocks.
    plain = {"messages": bedrock(("user", "Hi"), ("assistant", "Hello!"))["messages"]}
    assert normalize(plain, TaskType.CHAT_COMPLETION) == GOOD_CHAT
    assert normalize(GOOD_CHAT, TaskType.CHAT_COMPLETION) is GOOD_CHAT
    ift = {"prompt": "Q", "response": "A"}
    assert normalize(ift, TaskType.INSTRUCTION_FINETUNE) is ift


def test_some_invalid_records_are_skipped_when_allowed():
    bad = chat(("user", "Hi"), ("bot", "Hello"))
    report = report_of("t.jsonl", [GOOD_CHAT] * 18 + [bad] * 2)
    assert not report.acceptable(0) and not report.acceptable(9.99)
    assert report.acceptable(10) and report.acceptable(100)
    assert report.render(10).startswith("t.jsonl: skipped 2 of 20 records (10%) that are not valid CHAT_COMPLETION, "
                                        "as allow_percentage_invalid=10 allows")
    assert "t.jsonl line 19, field messages[1].role: found 'bot'" in report.render(10)
    assert "(10%, more than allow_percentage_invalid=5 allows)" in report.render(5)


def test_no_allowance_forgives_a_file_without_valid_records():
    empty = DataReport("empty.jsonl", CHAT)
    empty.add_problem(Problem("empty.jsonl", None, "", "an empty file", "write one JSON object per line"))
    assert not empty.acceptable(100)
    assert not report_of("bad.jsonl", [{"messages": []}]).acceptable(100)


def test_rows_of_tables_are_cited_as_rows():
    found = problems(IFT, {"prompt": "Q", "answer": "A"}, name="catalog.schema.table", line=2, unit="row")
    assert "catalog.schema.table row 2, field answer: found an unexpected key" in "\n".join(map(str, found))


NO_SYSTEM = TemplateSupport("mistralai/Mistral-7B-Instruct-v0.2", system=False, tool=False)
WITH_TOOL = TemplateSupport("Qwen/Qwen2.5-7B-Instruct", system=True, tool=True)


@pytest.mark.parametrize("record, template, expected", [
    (chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")), NO_SYSTEM,
     "field messages[0].role: found 'system'; fold the system text into the first user message, or drop it: the "
     "chat template of mistralai/Mistral-7B-Instruct-v0.2 takes no system message"),
    (bedrock(("user", "Hi"), ("assistant", "Hello"), system=["Be brief."]), NO_SYSTEM,
     "field system: found a system prompt; fold the system text into the first user message"),
    (chat(("user", "Hi"), ("assistant", "call()"), ("tool", "42"), ("assistant", "42.")), NO_SYSTEM,
     "field messages[2].role: found 'tool'; remove tool messages: the chat template of "
     "mistralai/Mistral-7B-Instruct-v0.2 does not render them"),
    (chat(("user", "Hi"), ("tool", "42"), ("assistant", "42.")), WITH_TOOL,
     "field messages[1].role: found 'tool'; put tool messages right after the assistant message whose tool call"),
    (chat(("user", "Hi"), ("assistant", "call()"), ("tool", "42"), ("user", "So?"), ("assistant", "42.")), WITH_TOOL,
     "field messages[3].role: found 'user'; follow tool messages with the assistant's answer"),
    (chat(("user", "Hi"), ("assistant", "call()"), ("tool", "42")), WITH_TOOL,
     "field messages[2].role: found 'tool'; end with an assistant message"),
    (chat(("user", "Hi"), ("assistant", "call()"), ("Tool", "42"), ("assistant", "42.")), WITH_TOOL,
     "field messages[2].role: found 'Tool'; use lowercase 'tool'"),
])
def test_the_models_template_decides_system_and_tool(record, template, expected):
    problems = record_problems(record, TaskType.CHAT_COMPLETION, at_line_1, template)
    assert expected in "\n".join(map(str, problems))


def test_tool_messages_pass_where_the_template_renders_them():
    record = chat(("system", "Use tools."), ("user", "Hi"), ("assistant", "call()"), ("tool", "4"), ("tool", "2"),
                  ("assistant", "42."), ("user", "Thanks"), ("assistant", "You're welcome."))
    assert record_problems(record, TaskType.CHAT_COMPLETION, at_line_1, WITH_TOOL) == []


# Hand-written templates in the style of real ones, set on a copy of SmolLM2's tokenizer.
MISTRAL_LIKE = (  # Mistral-7B-Instruct-v0.2's: raises on a system message
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
DROPS_SYSTEM = (  # renders what it knows and silently skips the rest
    "{% for message in messages %}{% if message['role'] in ['user', 'assistant'] %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)
QWEN_LIKE = (  # Qwen2.5's way with tool results: inside a user turn
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def with_template(tokenizer, template: str | None):
    clone = copy.copy(tokenizer)
    clone.chat_template = template
    return clone


@pytest.mark.parametrize("template, system, tool", [
    (None, True, True),  # SmolLM2's own: generic ChatML, which renders any role, tool included
    (MISTRAL_LIKE, False, False),
    (DROPS_SYSTEM, False, False),
    (QWEN_LIKE, True, True),
])
def test_the_probe_renders_the_templates_own_way(smollm2_tokenizer, template, system, tool):
    tokenizer = smollm2_tokenizer if template is None else with_template(smollm2_tokenizer, template)
    assert probe(tokenizer) == TemplateSupport(smollm2_tokenizer.name_or_path, system=system, tool=tool)


def test_a_system_message_for_a_template_without_one_names_the_model(smollm2_tokenizer):
    support = probe(with_template(smollm2_tokenizer, MISTRAL_LIKE))
    record = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    assert [str(p) for p in problems(CHAT, record, support, name="t.jsonl", line=2)] == [
        f"t.jsonl line 2, field messages[0].role: found 'system'; fold the system text into the first user "
        f"message, or drop it: the chat template of {smollm2_tokenizer.name_or_path} takes no system message"]


def test_a_tokenizer_without_a_working_template_is_refused(smollm2_tokenizer):
    with pytest.raises(InvalidInputError, match="has no chat template"):
        probe(with_template(smollm2_tokenizer, None))
    with pytest.raises(InvalidInputError, match="fails on a plain user/assistant conversation"):
        probe(with_template(smollm2_tokenizer, "{{ raise_exception('no') }}"))


def test_reports_of_slices_merge_in_order():
    bad = chat(("user", "Hi"), ("bot", "Hello"))
    first = report_of("a.jsonl", [bad, bad, GOOD_CHAT])
    second = report_of("b.jsonl", [bad, bad, {"messages": "Hi"}])
    first.merge(second)
    assert (first.num_records, first.num_invalid, first.num_file_problems) == (6, 5, 0)
    assert [p.file for p in first.shown[("messages[].role", "use one of system, user, assistant")]] == \
        ["a.jsonl", "a.jsonl", "b.jsonl"]
    assert "... and 1 more like this" in first.render()
    assert "b.jsonl line 3, field messages: found 'Hi'" in first.render()
