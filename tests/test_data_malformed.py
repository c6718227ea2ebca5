"""A corpus of malformed training files (tests/data/malformed/, one case per file) through the pipeline a run uses
(storage.fetch, prepare.prepare_dataset, the shard workers, formats.record_problems), by way of validate_data as
`tessera validate` calls it: each gets its own message, naming file, line and field, and none gets a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from tasks.data.shard import slices as shard_slices
from tasks.data.validation import DataValidation, validate_data
from tasks.errors import InvalidInputError

CORPUS = Path(__file__).parent / "data" / "malformed"
CHAT = "CHAT_COMPLETION"
IFT = "INSTRUCTION_FINETUNE"
CPT = "CONTINUED_PRETRAIN"
CONTEXT = 256
NO_TOOL_TEMPLATE = {"tool_role.jsonl"}  # cases checked with a model whose chat template renders no tool messages
CASES = [
    # JSON Lines that do not hold one JSON object per line
    ("not_object_array.jsonl", CHAT,
     'not_object_array.jsonl line 2: found a list; write one JSON object per line, like {"messages": [...]}'),
    ("not_object_string.jsonl", CHAT, "not_object_string.jsonl line 2: found 'What is 2 + 2?'; write one JSON object"),
    ("not_object_number.jsonl", CHAT, "not_object_number.jsonl line 2: found the number 42; write one JSON object"),
    ("not_object_null.jsonl", CHAT, "not_object_null.jsonl line 2: found null; write one JSON object"),
    ("invalid_json.jsonl", CHAT,
     "invalid_json.jsonl line 2: found invalid JSON (Expecting value at column 15); write one JSON object per line"),
    ("trailing_garbage.jsonl", CHAT, "trailing_garbage.jsonl line 2: found invalid JSON (Extra data at column 103)"),
    ("truncated_last_line.jsonl", CHAT,
     "truncated_last_line.jsonl line 2: found part of a record (Expecting ':' delimiter at column 41); "
     "write each record whole on one line"),
    ("pretty_printed.jsonl", CHAT,
     "pretty_printed.jsonl line 1: found part of a record (Expecting property name enclosed in double quotes at "
     "column 2); write each record whole on one line; a pretty-printed or cut-off file splits it"),
    ("not_utf8.jsonl", CHAT,
     "not_utf8.jsonl line 2: found bytes that are not UTF-8 (0xe9 at column 47); save the file as UTF-8"),
    ("utf16.jsonl", CHAT, "utf16.jsonl line 1: found a UTF-16 byte order mark; save the file as UTF-8"),
    ("utf16_no_bom.jsonl", CHAT,
     "utf16_no_bom.jsonl line 2: found NUL bytes, as in UTF-16 or binary files; save the file as UTF-8 text"),
    ("nan.jsonl", CHAT, "nan.jsonl line 2: found NaN, which is not JSON; write a string or null in its place"),
    ("infinity.jsonl", CHAT, "infinity.jsonl line 2: found -Infinity, which is not JSON"),
    ("deep_nesting.jsonl", CHAT, "deep_nesting.jsonl line 2: found JSON nested too deeply to read; flatten the record"),
    ("duplicate_keys.jsonl", CHAT,
     "duplicate_keys.jsonl line 2: found the key 'role' twice in one object; keep one of them"),
    ("empty.jsonl", CHAT, "empty.jsonl: found no records; write one JSON object per line"),
    # chat records of the wrong shape
    ("messages_missing.jsonl", CHAT, "messages_missing.jsonl line 2, field messages: found nothing; add 'messages'"),
    ("messages_not_list.jsonl", CHAT,
     "messages_not_list.jsonl line 2, field messages: found 'Hi'; use a list of {role, content} messages"),
    ("chat_prompt_record.jsonl", CHAT,
     "chat_prompt_record.jsonl line 2: found a prompt/response record; use task_type INSTRUCTION_FINETUNE"),
    ("single_message.jsonl", CHAT,
     "single_message.jsonl line 2, field messages: found 1 message(s); give at least a user message and the "
     "assistant's reply"),
    ("extra_top_key.jsonl", CHAT,
     "extra_top_key.jsonl line 2, field id: found an unexpected key; remove it; the keys allowed here are messages"),
    ("extra_message_key.jsonl", CHAT,
     "extra_message_key.jsonl line 2, field messages[0].name: found an unexpected key; remove it"),
    ("message_not_object.jsonl", CHAT,
     "message_not_object.jsonl line 2, field messages[0]: found 'Hi'; use an object with role and content"),
    ("missing_content.jsonl", CHAT,
     "missing_content.jsonl line 2, field messages[1].content: found nothing; add 'content'"),
    ("content_null.jsonl", CHAT, "content_null.jsonl line 2, field messages[0].content: found null; use a string"),
    ("content_list.jsonl", CHAT,
     "content_list.jsonl line 2, field messages[0].content: found a list; use a string: join the text parts into one"),
    ("whitespace_content.jsonl", CHAT,
     "whitespace_content.jsonl line 2, field messages[1].content: found '   '; write the message's text"),
    # chat roles and turns
    ("role_uppercase.jsonl", CHAT,
     "role_uppercase.jsonl line 2, field messages[0].role: found 'User'; use lowercase 'user'"),
    ("role_unknown.jsonl", CHAT,
     "role_unknown.jsonl line 2, field messages[1].role: found 'bot'; use one of system, user, assistant"),
    ("role_number.jsonl", CHAT, "role_number.jsonl line 2, field messages[0].role: found the number 1; use one of"),
    ("tool_role.jsonl", CHAT,  # checked with a model whose template has no tool role (SmolLM2's renders any role)
     "tool_role.jsonl line 2, field messages[2].role: found 'tool'; remove tool messages: the chat template of "),
    ("system_not_first.jsonl", CHAT,
     "system_not_first.jsonl line 2, field messages[1].role: found 'system'; only the first message may be a system"),
    ("starts_with_assistant.jsonl", CHAT,
     "starts_with_assistant.jsonl line 2, field messages[1].role: found 'assistant'; expected 'user'"),
    ("consecutive_user.jsonl", CHAT,
     "consecutive_user.jsonl line 2, field messages[1].role: found 'user'; expected 'assistant'"),
    ("ends_with_user.jsonl", CHAT,
     "ends_with_user.jsonl line 2, field messages[2].role: found 'user'; end with an assistant message"),
    # instruction fine-tuning
    ("ift_missing_response.jsonl", IFT,
     "ift_missing_response.jsonl line 2, field response: found nothing; add 'response' (or 'completion')"),
    ("ift_both_answers.jsonl", IFT,
     "ift_both_answers.jsonl line 2, field completion: found both 'response' and 'completion'; keep only one"),
    ("ift_prompt_list.jsonl", IFT, "ift_prompt_list.jsonl line 2, field prompt: found a list; use a string"),
    ("ift_extra_key.jsonl", IFT,
     "ift_extra_key.jsonl line 2, field source: found an unexpected key; remove it; the keys allowed here are "
     "prompt, response, completion"),
    ("ift_chat_record.jsonl", IFT,
     "ift_chat_record.jsonl line 2: found a conversation; use task_type CHAT_COMPLETION"),
    # Amazon Bedrock Converse (the Nova recipes' format)
    ("bedrock_schema_version.jsonl", CHAT,
     "bedrock_schema_version.jsonl line 2, field schemaVersion: found 'bedrock-conversion-2024'; "
     "write 'bedrock-conversation-2024', or leave schemaVersion out"),
    ("bedrock_image_block.jsonl", CHAT,
     "bedrock_image_block.jsonl line 2, field messages[0].content[1]: found a non-text block (image); remove it, "
     'or give its text as {"text": "..."}: Tessera trains on text only'),
    ("bedrock_tool_use.jsonl", CHAT,
     "bedrock_tool_use.jsonl line 2, field messages[1].content[0]: found a non-text block (toolUse)"),
    ("bedrock_reasoning.jsonl", CHAT,
     "bedrock_reasoning.jsonl line 2, field messages[1].content[0]: found a non-text block (reasoningContent)"),
    ("bedrock_text_not_string.jsonl", CHAT,
     "bedrock_text_not_string.jsonl line 2, field messages[1].content[0].text: found the number 4; use a string"),
    ("bedrock_system_role.jsonl", CHAT,
     "bedrock_system_role.jsonl line 2, field messages[0].role: found 'system'; put the system prompt in the "
     "record's \"system\" list"),
    ("bedrock_system_string.jsonl", CHAT,
     "bedrock_system_string.jsonl line 2, field system: found 'Be brief.'; use a list of text blocks"),
    ("bedrock_system_block_key.jsonl", CHAT,
     "bedrock_system_block_key.jsonl line 2, field system[0].text: found nothing; add 'text'"),
    ("bedrock_content_string.jsonl", CHAT,
     "bedrock_content_string.jsonl line 2, field messages[0].content: found 'Hi'; use a list of content blocks"),
    ("bedrock_empty_content.jsonl", CHAT,
     "bedrock_empty_content.jsonl line 2, field messages[1].content: found an empty list; add a text block"),
    ("bedrock_blank_text.jsonl", CHAT,
     "bedrock_blank_text.jsonl line 2, field messages[1].content: found ' \\n'; write the message's text"),
    ("bedrock_role_case.jsonl", CHAT,
     "bedrock_role_case.jsonl line 2, field messages[1].role: found 'Assistant'; use lowercase 'assistant'"),
    ("bedrock_tool_config.jsonl", CHAT,
     "bedrock_tool_config.jsonl line 2, field toolConfig: found an unexpected key; remove it; the keys allowed here "
     "are messages, schemaVersion, system"),
    ("bedrock_no_schema_version.jsonl", CHAT,
     "bedrock_no_schema_version.jsonl line 2, field messages[1].role: found 'user'; expected 'assistant'"),
    # continued pretraining
    ("cpt_not_utf8.txt", CPT,
     "cpt_not_utf8.txt line 2: found bytes that are not UTF-8 (0xe9); save the file as UTF-8 text"),
    ("cpt_empty.txt", CPT, "cpt_empty.txt: found an empty document; write the document's text, or remove the file"),
    ("cpt_markdown.md", CPT, "cpt_markdown.md: found a .md file; use a .txt file"),
]
VALID = [  # files that look odd and are fine
    ("valid_bom_crlf_blank.jsonl", CHAT),  # a BOM, CRLF line endings and a blank line
    ("valid_bedrock.jsonl", CHAT),  # Converse records with and without schemaVersion, several blocks
    ("valid_bom.txt", CPT),
]


@pytest.fixture(scope="module")
def check(tiny_model_dir, tmp_path_factory):
    """validate_data on the tiny model (SmolLM2's tokenizer and chat template), with this module's own prepared-data
    cache; `tools=False`: on a model whose template renders system, user and assistant messages only."""
    no_tool = tmp_path_factory.mktemp("no-tool-template")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, no_tool / name)
    (no_tool / "chat_template.jinja").write_text(
        "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}<|im_start|>"
        "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TESSERA_CACHE", str(tmp_path_factory.mktemp("cache")))

        def run(path: Path | str, task: str, tools: bool = True, **settings) -> DataValidation:
            model = tiny_model_dir if tools else no_tool
            return validate_data(str(path), task, model=str(model), context_length=CONTEXT, **settings)

        yield run


@pytest.mark.parametrize("name, task, expected", [pytest.param(*case, id=case[0]) for case in CASES])
def test_each_malformed_file_gets_its_own_message(check, name, task, expected):
    result = check(CORPUS / name, task, tools=name not in NO_TOOL_TEMPLATE)
    assert not result.ok
    assert expected in result.report
    assert result.report == (result.evidence / "report.txt").read_text().rstrip()  # what the run logs, too
    assert "Traceback" not in result.report


@pytest.mark.parametrize("name, task", VALID)
def test_odd_but_valid_files_pass(check, name, task):
    result = check(CORPUS / name, task)
    assert result.ok, result.report
    assert result.prepared.num_examples == result.prepared.num_records


def test_every_corpus_file_is_a_case():
    cases = {name: task for name, task, _ in CASES} | dict(VALID)
    assert sorted(cases) == sorted(path.name for path in CORPUS.iterdir())


def test_skipping_invalid_records_never_crashes_on_the_corpus(check):
    """With every invalid record allowed, files that keep a valid record train on it; the rest say why not."""
    for name, task, _ in CASES:
        result = check(CORPUS / name, task, tools=name not in NO_TOOL_TEMPLATE, allow_percentage_invalid_samples=100)
        assert "Traceback" not in result.report, name
        if result.ok:
            assert result.report.startswith(f"{CORPUS / name}: skipped "), name


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = chat(("user", "What is 2 + 2?"), ("assistant", "4."))
BAD = chat(("user", "Hi"), ("bot", "Hello"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_repeated_problems_show_a_few_and_blank_lines_keep_their_numbers(check, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", *[BAD] * 10, GOOD])
    report = check(path, CHAT).report
    assert report.startswith(f"{path}: 10 of 12 records are not valid CHAT_COMPLETION")
    assert "train.jsonl line 3, field messages[1].role: found 'bot'" in report
    assert report.count("found 'bot'") == 3 and "... and 7 more like this" in report


def test_some_invalid_records_are_skipped_when_allowed(check, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD] * 18 + [BAD] * 2)
    allowed = check(path, CHAT, allow_percentage_invalid_samples=10)
    assert allowed.ok and allowed.prepared.num_invalid == 2 and allowed.prepared.num_examples == 18
    assert allowed.report.startswith(f"{path}: skipped 2 of 20 records (10%) that are not valid CHAT_COMPLETION, "
                                     "as allow_percentage_invalid=10 allows")
    assert "t.jsonl line 19, field messages[1].role: found 'bot'" in allowed.report
    refused = check(path, CHAT, allow_percentage_invalid_samples=5)
    assert not refused.ok and "(10%, more than allow_percentage_invalid=5 allows)" in refused.report


def test_empty_files_are_refused(check, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    result = check(tmp_path / "empty.jsonl", CHAT, allow_percentage_invalid_samples=100)
    assert not result.ok and "empty.jsonl: found no records; write one JSON object per line" in result.report


def test_folders_of_documents(check, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("One document.")
    (docs / "sub" / "b.txt").write_bytes(b"fine\nnot \xff fine")
    (docs / "notes.md").write_text("ignored")
    report = check(docs, CPT).report
    assert report.startswith(f"{docs}: 1 of 2 records are not valid CONTINUED_PRETRAIN")
    assert "sub/b.txt line 2: found bytes that are not UTF-8 (0xff); save the file as UTF-8 text" in report
    assert check(docs / "a.txt", CPT).ok
    assert "notes.md: found a .md file; use a .txt file" in check(docs / "notes.md", CPT).report
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no .txt files"):
        check(tmp_path / "empty", CPT)


@pytest.mark.parametrize("path, task, expected", [
    ("missing.jsonl", CHAT, "data_path missing.jsonl does not exist: check the path"),
    (".", CHAT, "data_path . is a folder: CHAT_COMPLETION takes one .jsonl file"),
    (".", "SUMMARIZE", "unknown task type 'SUMMARIZE': use one of CHAT_COMPLETION"),
])
def test_bad_arguments_raise_invalid_input(check, tmp_path, monkeypatch, path, task, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match=expected):
        check(path, task)


def test_a_line_too_long_to_be_a_record_is_refused_without_reading_it_whole(check, tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.data.shard.MAX_LINE_BYTES", 1000)
    monkeypatch.setattr("tasks.data.prepare.slices", lambda *a, **k: shard_slices(*a, **k, size=100))
    good = json.dumps(chat(("user", "Hi"), ("assistant", "Hello")))
    (tmp_path / "long.jsonl").write_text(good + "\n" + '{"messages": "' + "x" * 5000 + '"}\n' + good + "\n")
    result = check(tmp_path / "long.jsonl", CHAT)
    assert not result.ok and "long.jsonl: found a line of more than" in result.report
    (tmp_path / "doc.txt").write_text("word " * 2000)  # one long line of text is fine for documents: cut anywhere
    assert check(tmp_path / "doc.txt", CPT).ok
