"""From a training file to a cached folder of packed rows."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from tasks.data.prepare import EVIDENCE, PreparedDataset, prepare_dataset
from tasks.data.shard import slices as shard_slices
from tasks.data.tokenize import IGNORE
from tasks.errors import InvalidDataError, InvalidInputError


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Prepared data is cached machine-wide; each test starts with none (converted models stay where they are)."""
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))


def chat_file(path, n: int = 40):
    lines = []
    for i in range(n):
        turns = [("user", f"What is {i} + {i}?"), ("assistant", f"{i} + {i} = {2 * i}." + " Indeed." * (i % 7))]
        lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def load(prepared: PreparedDataset, name: str) -> np.ndarray:
    return np.load(prepared.path / f"{name}.npy")


def test_chat_file_becomes_packed_rows(tmp_path, tiny_model_dir):
    prepared = prepare_dataset(str(chat_file(tmp_path / "train.jsonl")), tiny_model_dir, "CHAT_COMPLETION", 128)
    ids, labels, positions = (load(prepared, name) for name in ("input_ids", "labels", "position_ids"))
    assert ids.shape == labels.shape == positions.shape == (prepared.num_rows, 128)
    assert ids.dtype == labels.dtype == positions.dtype == np.int32
    assert (prepared.num_examples, prepared.num_dropped, prepared.num_truncated) == (40, 0, 0)
    starts = positions == 0  # where each conversation starts, and each row's padding
    assert prepared.num_loss_tokens == int((labels != IGNORE).sum()) > 0
    assert not (labels[starts] != IGNORE).any()
    assert prepared.packing_efficiency == round(prepared.num_tokens / ids.size, 4) > 0.8
    assert 40 <= int(starts.sum()) <= 40 + prepared.num_rows
    meta = json.loads((prepared.path / "meta.json").read_text())
    assert meta["task_type"] == "CHAT_COMPLETION" and meta["context_length"] == 128
    assert meta["source"] == str(tmp_path / "train.jsonl") and len(meta["content_hash"]) == 64


def test_same_inputs_hit_the_cache_without_tokenizing(tmp_path, tiny_model_dir, monkeypatch):
    data = str(chat_file(tmp_path / "train.jsonl"))
    first = prepare_dataset(data, tiny_model_dir, "CHAT_COMPLETION", 128)
    written = (first.path / "input_ids.npy").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr("tasks.data.prepare.run_slice", no_tokenizing)
    again = prepare_dataset(f"file://{data}", tiny_model_dir, "CHAT_COMPLETION", 128)
    assert again == first
    assert (again.path / "input_ids.npy").stat().st_mtime_ns == written
    assert [p.name for p in first.path.parent.iterdir() if not p.name.startswith(".")] == [first.path.name]
    monkeypatch.undo()
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    other = prepare_dataset(data, tiny_model_dir, "CHAT_COMPLETION", 256)  # another key: tokenized anew
    assert other.path != first.path and other.num_rows < first.num_rows


def test_instruction_counts_truncated_and_dropped(tmp_path, tiny_model_dir):
    records = [{"prompt": "Q: a?\nA:", "response": " yes"},
               {"prompt": "Q: b?\nA:", "completion": " no" * 40},  # cut, keeps some response
               {"prompt": "word " * 40, "response": " lost"}]  # cut inside the prompt: nothing left to learn
    (tmp_path / "ift.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    prepared = prepare_dataset(str(tmp_path / "ift.jsonl"), tiny_model_dir, "INSTRUCTION_FINETUNE", 16)
    assert (prepared.num_examples, prepared.num_truncated, prepared.num_dropped) == (2, 2, 1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = len(tokenizer("Q: a?\nA:")["input_ids"]) + len(tokenizer(" yes")["input_ids"]) + 1  # + EOS
    assert prepared.num_tokens == short + 16  # and the cut one fills its row


def test_text_folder_is_cut_into_full_rows(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Tessera fine-tunes language models. " * 30)
    (docs / "b.txt").write_text("Packing puts several documents in one row. " * 20)
    prepared = prepare_dataset(str(docs), tiny_model_dir, "CONTINUED_PRETRAIN", 64)
    positions = load(prepared, "position_ids")
    assert prepared.num_examples == 2 and prepared.num_rows == -(-prepared.num_tokens // 64)
    assert prepared.num_tokens > 64 * 4 and prepared.packing_efficiency > 0.9
    assert (positions[:-1, 0] == 0).all()  # every full row starts a (piece of a) document
    (docs / "b.txt").write_text("Changed.")
    assert prepare_dataset(str(docs), tiny_model_dir, "CONTINUED_PRETRAIN", 64).path != prepared.path


def test_invalid_data_raises_with_the_report_and_keeps_only_the_evidence(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(InvalidDataError, match="train.jsonl line 1, field messages: found 1 message") as refused:
        prepare_dataset(str(tmp_path / "train.jsonl"), tiny_model_dir, "CHAT_COMPLETION", 64)
    evidence = refused.value.evidence
    assert sorted(p.name for p in evidence.iterdir()) == sorted(EVIDENCE)  # no rows, just why
    assert "line 1, field messages" in (evidence / "report.txt").read_text()
    assert not json.loads((evidence / "quality.json").read_text())["success"]
    chat_file(tmp_path / "train.jsonl", n=3)
    with pytest.raises(InvalidInputError, match="no example keeps a token to learn from within context_length=8"):
        prepare_dataset(str(tmp_path / "train.jsonl"), tiny_model_dir, "CHAT_COMPLETION", 8)
    assert not list((tmp_path / "cache" / "prepared").glob("*/meta.json"))  # nothing a run could train on


def test_worker_processes_give_exactly_what_one_process_gives(tmp_path, tiny_model_dir, monkeypatch):
    """Slices go to one worker process per core; rows, counts and the lines problems cite do not depend on it."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                      {"role": "assistant", "content": f"A{i}. " * (i % 13 + 1)}]})
             for i in range(300)]
    lines[7] = lines[250] = '{"messages": [{"role": "user", "content": "dangling"}]}'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    prepare = lambda: prepare_dataset(str(tmp_path / "train.jsonl"), tiny_model_dir, "CHAT_COMPLETION", 128,
                                      allow_percentage_invalid=1)
    monkeypatch.setattr("tasks.data.prepare.slices", lambda *a: shard_slices(*a, size=2000))  # ~20 slices
    with monkeypatch.context() as one_core:
        one_core.setattr("tasks.data.prepare.os.sched_getaffinity", lambda pid: {0})
        alone = prepare()
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr("tasks.data.prepare.os.sched_getaffinity", lambda pid: {0, 1})
    together = prepare()
    assert alone.num_invalid == together.num_invalid == 2
    for name in ("input_ids", "labels", "position_ids"):
        np.testing.assert_array_equal(load(alone, name), load(together, name))
    report = (together.path / "report.txt").read_text()
    assert report == (alone.path / "report.txt").read_text()
    assert "train.jsonl line 8, field messages" in report and "line 251" in report and "skipped 2 of 300" in report


def test_evidence_for_the_user_is_kept_with_the_rows(tmp_path, tiny_model_dir):
    prepared = prepare_dataset(str(chat_file(tmp_path / "train.jsonl")), tiny_model_dir, "CHAT_COMPLETION", 128)
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert stats["num_examples"] == 40 and stats["num_tokens"] == prepared.num_tokens
    assert stats["warnings"] == []
    quality = json.loads((prepared.path / "quality.json").read_text())
    assert quality["success"] and quality["failed"] == []
    assert (prepared.path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
