"""A corpus of malformed training files (tests/data/malformed/, one case per file): each gets its own message,
naming file, line and field, and none gets a traceback."""

from pathlib import Path

import pytest

from tasks.data import formats
from tasks.data.formats import validate_data_file

CORPUS = Path(__file__).parent / "data" / "malformed"
CHAT = "CHAT_COMPLETION"
IFT = "INSTRUCTION_FINETUNE"
CPT = "CONTINUED_PRETRAIN"

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
     "column 1); write each record whole on one line; a pretty-printed or cut-off file splits it"),
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
    ("tool_role.jsonl", CHAT,
     "tool_role.jsonl line 2, field messages[2].role: found 'tool'; use one of system, user, assistant"),
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
     "cpt_not_utf8.txt: found bytes that are not UTF-8 (0xe9 on line 2); save the file as UTF-8 text"),
    ("cpt_empty.txt", CPT, "cpt_empty.txt: found an empty document; write the document's text, or remove the file"),
    ("cpt_markdown.md", CPT, "cpt_markdown.md: found a .md file; use a .txt file"),
]
VALID = [  # files that look odd and are fine
    ("valid_bom_crlf_blank.jsonl", CHAT),  # a BOM, CRLF line endings and a blank line
    ("valid_bedrock.jsonl", CHAT),  # Converse records with and without schemaVersion, several blocks
    ("valid_bom.txt", CPT),
]


@pytest.mark.parametrize("name, task, expected", CASES, ids=[case[0] for case in CASES])
def test_each_malformed_file_gets_its_own_message(name, task, expected):
    report = validate_data_file(CORPUS / name, task)
    assert not report.acceptable(0)
    assert expected in report.render()


@pytest.mark.parametrize("name, task", VALID)
def test_odd_but_valid_files_pass(name, task):
    assert validate_data_file(CORPUS / name, task).ok


def test_every_corpus_file_is_a_case_and_no_report_shows_a_traceback():
    cases = {name: task for name, task, _ in CASES} | dict(VALID)
    assert sorted(cases) == sorted(path.name for path in CORPUS.iterdir())
    for name, task in cases.items():
        for allowance in (0, 50, 100):
            assert "Traceback" not in validate_data_file(CORPUS / name, task).render(allowance)


def test_a_line_too_long_is_refused_and_the_next_line_read(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 100)
    good = '{"prompt": "Q", "response": "A"}\n'
    (tmp_path / "long.jsonl").write_text(good + '{"prompt": "' + "x" * 1000 + '", "response": "A"}\n' + good)
    report = validate_data_file(tmp_path / "long.jsonl", IFT)
    assert (report.num_records, report.num_invalid) == (3, 1)
    assert ("long.jsonl line 2: found a line longer than 100 bytes; end each record with a newline: "
            "one JSON object per line") in report.render()
