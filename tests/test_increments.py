"""Growing sources for retraining: what is new since an earlier look, in a folder, an S3 prefix and a Delta table,
and those files' rows gathered into one .jsonl file."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from tasks.data.increments import Inventory, gather, take_inventory
from tasks.errors import InvalidInputError


def rows(*contents: str) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": c}]})
                   + "\n" for c in contents).encode()


def said(path: Path) -> list[str]:
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _roots(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TESSERA_VOLUMES_ROOT", str(tmp_path / "volumes"))
    monkeypatch.setenv("TESSERA_TABLES_ROOT", str(tmp_path / "tables"))


def test_a_folder_new_and_changed_files_and_nothing_new(tmp_path):
    folder = tmp_path / "volumes" / "main" / "demo" / "incoming"
    (folder / "week1").mkdir(parents=True)
    (folder / "week1" / "a.jsonl").write_bytes(rows("a1", "a2"))
    (folder / "notes.txt").write_text("not data")
    first = take_inventory("dbfs:/Volumes/main/demo/incoming/")
    assert list(first.files) == ["week1/a.jsonl"] and first.new_since(None) == ["week1/a.jsonl"]
    assert take_inventory(str(folder)).new_since(first) == []  # the same files, however the folder is named
    (folder / "b.jsonl").write_bytes(rows("b1").rstrip(b"\n"))  # no newline at the end
    (folder / "week1" / "a.jsonl").write_bytes(rows("a1", "a2", "a3"))
    now = take_inventory(str(folder))
    assert now.new_since(Inventory.from_json(first.to_json())) == ["b.jsonl", "week1/a.jsonl"]
    gathered = gather(str(folder), now.new_since(first), tmp_path / "out" / "train.jsonl")
    assert said(gathered) == ["b1", "a1", "a2", "a3"]


def test_an_s3_prefix_by_etag(s3, tmp_path):
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="incoming/a.jsonl", Body=rows("a1"))
    s3.put_object(Bucket="data", Key="incoming/README.md", Body=b"# not data")
    first = take_inventory("s3://data/incoming")
    assert list(first.files) == ["a.jsonl"]
    s3.put_object(Bucket="data", Key="incoming/b.jsonl", Body=rows("b1", "b2"))
    now = take_inventory("s3://data/incoming/")
    assert now.new_since(first) == ["b.jsonl"]
    assert said(gather("s3://data/incoming/", now.new_since(first), tmp_path / "train.jsonl")) == ["b1", "b2"]
    assert said(gather("s3://data/incoming", sorted(now.files), tmp_path / "all.jsonl")) == ["a1", "b1", "b2"]
    with pytest.raises(InvalidInputError, match="is one object: retraining watches a source that grows"):
        take_inventory("s3://data/incoming/a.jsonl")


def test_a_delta_table_by_its_files(tmp_path):
    location = tmp_path / "tables" / "main" / "demo" / "chats"
    table = pa.table({"messages": [json.loads(line)["messages"] for line in rows("t1", "t2").splitlines()]})
    write_deltalake(str(location), table)
    first = take_inventory("main.demo.chats")
    assert first.version == 0 and len(first.files) == 1
    write_deltalake(str(location), table.slice(1, 1), mode="append")
    now = take_inventory("main.demo.chats")
    assert now.version == 1 and len(now.new_since(first)) == 1
    assert said(gather("main.demo.chats", now.new_since(first), tmp_path / "train.jsonl")) == ["t2"]


def test_what_does_not_grow_is_refused_in_words(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_bytes(rows("x"))
    for uri, message in ((str(file), "is one file: retraining watches a source that grows"),
                         (str(tmp_path / "nope"), "does not exist")):
        with pytest.raises(InvalidInputError, match=message):
            take_inventory(uri)
