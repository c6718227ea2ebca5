"""Validation of training files: every problem named by file, line and field, with a fix, never a traceback."""

import json
from pathlib import Path

import pytest

from tasks.data.formats import raise_if_invalid, validate_data_file
from tasks.errors import InvalidInputError

CHAT = "CHAT_COMPLETION"
IFT = "INSTRUCTION_FINETUNE"
CPT = "CONTINUED_PRETRAIN"


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = chat(("user", "Hi"), ("assistant", "Hello!"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


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
def test_each_problem_names_file_line_and_field(tmp_path, task, record, expected):
    good = GOOD_CHAT if task == CHAT else {"prompt": "Q", "response": "A"}
    path = write_jsonl(tmp_path / "train.jsonl", [good] * 6 + [record, good])
    report = validate_data_file(path, task)
    assert not report.ok
    assert (report.num_records, report.num_invalid) == (8, 1)
    assert expected in report.render()


def test_a_record_reports_all_its_problems(tmp_path):
    record = {"messages": [{"role": "bot", "content": ""}, {"role": "assistant", "content": 1}], "x": 1}
    report = validate_data_file(write_jsonl(tmp_path / "t.jsonl", [record]), CHAT)
    fields = [p.field for shown in report.shown.values() for p in shown]
    assert sorted(fields) == ["messages[0].content", "messages[0].role", "messages[1].content", "x"]
    assert report.num_invalid == 1


def test_repeated_problems_show_a_few_and_count_the_rest(tmp_path):
    bad = chat(("user", "Hi"), ("bot", "Hello"))
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT, "", *[bad] * 10, GOOD_CHAT])
    message = validate_data_file(path, CHAT).render()
    assert message.startswith(f"{path}: 10 of 12 records are not valid CHAT_COMPLETION")
    assert "train.jsonl line 3, field messages[1].role: found 'bot'" in message  # blank lines keep their numbers
    assert message.count("found 'bot'") == 3
    assert "... and 7 more like this" in message


def test_valid_files_pass(tmp_path):
    system = chat(("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye"))
    report = validate_data_file(write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT, system]), CHAT)
    assert report.ok and report.num_records == 2
    ift = [{"prompt": "Q", "response": "A"}, {"prompt": "", "completion": "A"}]
    uri = f"file://{write_jsonl(tmp_path / 'i.jsonl', ift)}"
    assert validate_data_file(uri, IFT).ok
    raise_if_invalid(validate_data_file(uri, IFT))


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(json.dumps(GOOD_CHAT).encode() + b'\n{"messages": "\xff"}\n')
    message = validate_data_file(tmp_path / "train.jsonl", CHAT).render()
    assert "train.jsonl line 2: found bytes that are not UTF-8 (0xff at column 15)" in message


def test_an_empty_file_is_invalid(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n  \n")
    report = validate_data_file(tmp_path / "train.jsonl", CHAT)
    with pytest.raises(InvalidInputError) as raised:
        raise_if_invalid(report)
    assert "train.jsonl: found no records; write one JSON object per line" in str(raised.value)


def test_text_documents(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("One document.")
    (docs / "sub" / "b.txt").write_bytes(b"fine\nnot \xff fine")
    (docs / "notes.md").write_text("ignored")
    report = validate_data_file(docs, CPT)
    assert (report.num_records, report.num_invalid) == (2, 1)
    assert "sub/b.txt: found bytes that are not UTF-8 (0xff on line 2); save the file as UTF-8 text" in report.render()
    assert validate_data_file(docs / "a.txt", CPT).ok
    assert "notes.md: found a .md file; use a .txt file" in validate_data_file(docs / "notes.md", CPT).render()
    (tmp_path / "empty").mkdir()
    assert "empty: found no .txt files" in validate_data_file(tmp_path / "empty", CPT).render()


@pytest.mark.parametrize("path, task, expected", [
    ("missing.jsonl", CHAT, "does not exist"),
    ("s3://bucket/train.jsonl", CHAT, "s3:// data is not supported yet"),
    (".", CHAT, "is a folder"),
    (".", "SUMMARIZE", "unknown task type 'SUMMARIZE': use one of CHAT_COMPLETION"),
])
def test_bad_arguments_raise_invalid_input(tmp_path, monkeypatch, path, task, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match=expected):
        validate_data_file(path, task)
