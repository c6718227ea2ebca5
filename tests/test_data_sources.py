"""tasks.data.sources: every kind of train_data_path resolved to local files, against real stores (a local folder,
moto's S3 server over HTTP, Delta tables written by deltalake, datasets' own on-disk formats)."""

import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from tasks.config import TaskType
from tasks.errors import InvalidInputError
from tasks.data.sources import check_data_path, fetch

CHAT = TaskType.CHAT_COMPLETION
CPT = TaskType.CONTINUED_PRETRAIN
ROWS = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Tessera."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS).encode()


@pytest.fixture(autouse=True)
def _roots(tmp_path: Path, monkeypatch) -> None:
    """A fresh download cache and local volume and table roots per test."""
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TESSERA_VOLUMES_ROOT", str(tmp_path / "volumes"))
    monkeypatch.setenv("TESSERA_TABLES_ROOT", str(tmp_path / "tables"))


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """Empty Hugging Face hub and datasets caches for this test: nothing of this machine's, nothing left behind."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hub"


def refusal(uri: str, task_type: TaskType = CHAT, field: str = "train_data_path") -> str:
    """The message check_data_path refuses `uri` with."""
    with pytest.raises(InvalidInputError) as error:
        check_data_path(uri, field, task_type)
    return str(error.value)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def delta_options(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


# Local files and volumes


def test_local_file_and_file_uri_are_read_in_place(tmp_path: Path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(JSONL)
    for uri in (str(data), f"file://{data}"):
        check_data_path(uri, "train_data_path", CHAT)
        local = fetch(uri, CHAT)
        assert (local.uri, local.path, local.name, local.unit) == (uri, data, "train.jsonl", "line")
        assert local.fingerprint == hashlib.sha256(JSONL).hexdigest()


def test_local_missing_file_and_folder_for_chat_are_refused(tmp_path: Path):
    message = refusal(str(tmp_path / "nope.jsonl"), field="eval_data_path")
    assert message == f"eval_data_path {tmp_path / 'nope.jsonl'} does not exist: check the path"
    message = refusal(str(tmp_path))
    assert message.startswith(f"train_data_path {tmp_path} is a folder: CHAT_COMPLETION takes one .jsonl file")


def test_cpt_folder_fingerprint_follows_names_and_content(tmp_path: Path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha")
    (docs / "sub" / "b.txt").write_text("beta")
    (docs / "notes.md").write_text("ignored")
    first = fetch(str(docs), CPT)
    assert (first.path, first.name, first.unit) == (docs, "docs", "line")
    (docs / "sub" / "b.txt").write_text("beta!")
    assert fetch(str(docs), CPT).fingerprint != first.fingerprint
    (tmp_path / "empty").mkdir()
    assert "holds no .txt files" in refusal(str(tmp_path / "empty"), CPT)


def test_volumes_map_under_a_local_root(tmp_path: Path):
    target = tmp_path / "volumes" / "main" / "demo" / "raw" / "chat" / "train.jsonl"
    target.parent.mkdir(parents=True)
    target.write_bytes(JSONL)
    for uri in ("dbfs:/Volumes/main/demo/raw/chat/train.jsonl", "/Volumes/main/demo/raw/chat/train.jsonl"):
        check_data_path(uri, "train_data_path", CHAT)
        assert fetch(uri, CHAT).path == target
    message = refusal("dbfs:/Volumes/main/demo/raw/chat/missing.jsonl")
    assert "does not exist: check the path; volumes are read from TESSERA_VOLUMES_ROOT" in message
    assert refusal("dbfs:/Volumes/main/demo") == (
        "train_data_path dbfs:/Volumes/main/demo does not name a volume: "
        "write dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>"
    )
    assert "only Unity Catalog volumes are supported under dbfs:/" in refusal("dbfs:/FileStore/train.jsonl")


def test_volume_on_an_s3_root(s3, monkeypatch):
    s3.create_bucket(Bucket="unity")
    s3.put_object(Bucket="unity", Key="volumes/main/demo/raw/train.jsonl", Body=JSONL)
    monkeypatch.setenv("TESSERA_VOLUMES_ROOT", "s3://unity/volumes/")
    check_data_path("/Volumes/main/demo/raw/train.jsonl", "train_data_path", CHAT)
    local = fetch("dbfs:/Volumes/main/demo/raw/train.jsonl", CHAT)
    assert local.path.read_bytes() == JSONL and local.name == "train.jsonl"
    message = refusal("/Volumes/main/demo/raw/nope.jsonl")
    assert "(s3://unity/volumes/main/demo/raw/nope.jsonl) does not exist" in message


# S3


def test_s3_object_is_downloaded_once_per_version(s3):
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="chat/train.jsonl", Body=JSONL)
    check_data_path("s3://data/chat/train.jsonl", "train_data_path", CHAT)
    first = fetch("s3://data/chat/train.jsonl", CHAT)
    assert first.path.read_bytes() == JSONL and (first.name, first.unit) == ("train.jsonl", "line")
    before = first.path.stat()
    again = fetch("s3://data/chat/train.jsonl", CHAT)
    after = again.path.stat()
    assert again == first and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    s3.put_object(Bucket="data", Key="chat/train.jsonl", Body=JSONL[:-1] + b" \n")  # a new ETag
    changed = fetch("s3://data/chat/train.jsonl", CHAT)
    assert changed.fingerprint != first.fingerprint and changed.path.read_bytes().endswith(b" \n")
    assert len([p for p in (Path(os.environ["TESSERA_CACHE"]) / "sources").iterdir() if p.is_dir()]) == 2


def test_concurrent_fetches_download_one_copy(s3):
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="train.jsonl", Body=JSONL)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fetch("s3://data/train.jsonl", CHAT), range(4)))
    assert len({r.path for r in results}) == 1 and results[0].path.read_bytes() == JSONL
    assert sorted(p.name for p in (Path(os.environ["TESSERA_CACHE"]) / "sources").iterdir()) == [
        f".{results[0].fingerprint}.lock", results[0].fingerprint]


def test_s3_prefix_for_cpt_keeps_nested_txt_files(s3):
    s3.create_bucket(Bucket="corpus")
    for key, body in (("books/a.txt", b"alpha"), ("books/deep/er/b.txt", b"beta"), ("books/meta.json", b"{}"),
                      ("books/deep/", b""), ("bookshelf.txt", b"not under books/")):
        s3.put_object(Bucket="corpus", Key=key, Body=body)
    for uri in ("s3://corpus/books", "s3://corpus/books/"):
        check_data_path(uri, "train_data_path", CPT)
        local = fetch(uri, CPT)
        files = sorted(str(p.relative_to(local.path)) for p in local.path.rglob("*") if p.is_file())
        assert files == ["a.txt", "deep/er/b.txt"] and local.name == "books"
        assert (local.path / "deep" / "er" / "b.txt").read_bytes() == b"beta"
    assert refusal("s3://corpus/books").startswith(
        "train_data_path s3://corpus/books is a folder: CHAT_COMPLETION takes one .jsonl file")
    s3.put_object(Bucket="corpus", Key="json-only/x.json", Body=b"{}")
    assert "holds no .txt files" in refusal("s3://corpus/json-only", CPT)


def test_s3_missing_bucket_and_key_name_the_field_and_fix(s3):
    s3.create_bucket(Bucket="data")
    assert refusal("s3://data/nope.jsonl", field="eval_data_path") == (
        "eval_data_path s3://data/nope.jsonl does not exist: check the path")
    assert refusal("s3://no-such-bucket/train.jsonl") == (
        "train_data_path s3://no-such-bucket/train.jsonl: bucket no-such-bucket does not exist: check the bucket "
        "name (and AWS_ENDPOINT_URL, for an S3-compatible store)")


def test_s3_without_credentials_or_endpoint(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in refusal("s3://b/k.jsonl")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    message = refusal("s3://b/k.jsonl")
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in message and "check AWS_ENDPOINT_URL" in message


# Hugging Face datasets


def test_hf_saved_dataset_dict_split(tmp_path: Path, hf_cache: Path):
    import datasets

    folder = tmp_path / "chats"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    check_data_path(f"{folder}/test", "train_data_path", CHAT)
    local = fetch(f"{folder}/train", CHAT)
    assert lines(local.path) == ROWS and (local.name, local.unit) == ("chats/train", "row")
    assert fetch(f"{folder}/train", CHAT) == local
    assert refusal(f"{folder}/validation") == (
        f"train_data_path {folder}/validation: the Hugging Face dataset {folder} has no split 'validation'; "
        f"its splits are train, test: write {folder}/train")
    assert "or name a split of this Hugging Face dataset" in refusal(str(folder))


def test_hf_folder_of_jsonl_files(tmp_path: Path, hf_cache: Path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_bytes(JSONL)
    (tmp_path / "ds" / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    monkeypatch.chdir(tmp_path)  # a relative <folder>/<split>
    local = fetch("ds/train", CHAT)
    assert lines(local.path) == ROWS and local.name == "ds/train"
    assert "its splits are train, test" in refusal("ds/dev")


def test_hf_dataset_with_two_subsets_is_refused(tmp_path: Path, hf_cache: Path):
    for config in ("en", "fr"):
        (tmp_path / "multi" / config).mkdir(parents=True)
        (tmp_path / "multi" / config / "train.jsonl").write_bytes(JSONL)
    (tmp_path / "multi" / "README.md").write_text("---\nconfigs:\n"
                                                 "- config_name: en\n  data_files: en/*.jsonl\n"
                                                 "- config_name: fr\n  data_files: fr/*.jsonl\n---\n")
    message = refusal(f"{tmp_path}/multi/train")
    assert "has several subsets (en, fr)" in message
    assert "save the subset you want as JSONL and pass that file's path" in message


def test_hf_hub_id_comes_from_the_offline_cache(hf_cache: Path):
    start = time.monotonic()
    message = refusal("tessera-test/chats/train")
    assert time.monotonic() - start < 5
    assert message.startswith("train_data_path tessera-test/chats/train: the Hugging Face dataset tessera-test/chats "
                              "is not in the local Hugging Face cache")
    repo = hf_cache / "datasets--tessera-test--chats"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40) / "data").mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "data" / "train.jsonl").write_bytes(JSONL)
    local = fetch("tessera-test/chats/train", CHAT)
    assert lines(local.path) == ROWS and local.name == "tessera-test/chats/train"


# Delta tables


def chat_table() -> pa.Table:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"messages": pa.array([row["messages"] for row in ROWS], pa.list_(message))})


def test_delta_table_on_a_local_root(tmp_path: Path):
    location = tmp_path / "tables" / "main" / "demo" / "chats"
    write_deltalake(str(location), chat_table())
    check_data_path("main.demo.chats", "train_data_path", CHAT)
    local = fetch("main.demo.chats", CHAT)
    assert lines(local.path) == ROWS and (local.name, local.unit) == ("main.demo.chats", "row")
    write_deltalake(str(location), chat_table().slice(0, 1), mode="append")
    grown = fetch("main.demo.chats", CHAT)
    assert grown.fingerprint != local.fingerprint
    assert sorted(map(json.dumps, lines(grown.path))) == sorted(map(json.dumps, [*ROWS, ROWS[0]]))


def test_delta_values_json_cannot_hold_become_strings(tmp_path: Path):
    table = pa.table({"at": pa.array([datetime(2026, 1, 2, 3, 4, 5)], pa.timestamp("us")),
                      "raw": pa.array([b"\xff\x00"]), "text": pa.array([b"hi"])})
    write_deltalake(str(tmp_path / "tables" / "main" / "demo" / "mixed"), table)
    assert lines(fetch("main.demo.mixed", CHAT).path) == [{"at": "2026-01-02T03:04:05", "raw": "/wA=", "text": "hi"}]


def test_delta_table_on_an_s3_root(s3, s3_endpoint: str, monkeypatch):
    s3.create_bucket(Bucket="lake")
    write_deltalake("s3://lake/tables/main/demo/chats", chat_table(), storage_options=delta_options(s3_endpoint))
    monkeypatch.setenv("TESSERA_TABLES_ROOT", "s3://lake/tables")
    check_data_path("main.demo.chats", "train_data_path", CHAT)
    assert lines(fetch("main.demo.chats", CHAT).path) == ROWS
    assert refusal("main.demo.missing") == (
        "train_data_path main.demo.missing: no Delta table at s3://lake/tables/main/demo/missing: check the name, "
        "or set TESSERA_TABLES_ROOT to the folder (or s3://bucket/prefix) that holds <catalog>/<schema>/<table>")


def test_delta_missing_table_and_a_folder_that_is_not_one(tmp_path: Path):
    tables = tmp_path / "tables"
    assert refusal("main.demo.nope") == (
        f"train_data_path main.demo.nope: no Delta table at {tables}/main/demo/nope: check the name, or set "
        "TESSERA_TABLES_ROOT to the folder (or s3://bucket/prefix) that holds <catalog>/<schema>/<table>")
    (tables / "main" / "demo" / "plain").mkdir(parents=True)
    (tables / "main" / "demo" / "plain" / "rows.jsonl").write_bytes(JSONL)
    assert "no Delta table at" in refusal("main.demo.plain")


# What a string without a scheme names, and what CONTINUED_PRETRAIN refuses


@pytest.mark.parametrize(("uri", "expected"), [
    ("main.demo.chats", "no Delta table at"),
    ("train.data.jsonl", "train.data.jsonl does not exist: check the path"),
    ("someone/chats/train", "is not in the local Hugging Face cache"),
    ("chats/train", "is not in the local Hugging Face cache"),
    ("/no/such/folder/train", "does not exist: check the path"),
    ("missing.jsonl", "missing.jsonl does not exist: check the path"),
    ("gs://bucket/train.jsonl", "gs:// is not supported"),
])
def test_strings_without_a_scheme_are_told_apart(uri: str, expected: str, tmp_path: Path, hf_cache: Path,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in refusal(uri)


def test_a_typo_beside_plain_files_is_a_missing_path_not_a_dataset(tmp_path: Path, hf_cache: Path):
    (tmp_path / "notes.md").write_text("no data here")
    assert refusal(f"{tmp_path}/train") == f"train_data_path {tmp_path}/train does not exist: check the path"
    assert refusal(f"{tmp_path}/tran.jsonl").endswith("does not exist: check the path")


@pytest.mark.parametrize(("uri", "kind"), [("main.demo.chats", "a Delta table"),
                                           ("someone/chats/train", "a Hugging Face dataset")])
def test_cpt_refuses_tables_and_datasets(uri: str, kind: str, hf_cache: Path):
    message = refusal(uri, CPT)
    assert message == (f"train_data_path {uri} is {kind}: CONTINUED_PRETRAIN reads .txt files; pass a .txt file "
                       "or a folder of them (local, dbfs:/Volumes/... or s3://...)")
    with pytest.raises(InvalidInputError, match="CONTINUED_PRETRAIN reads .txt files"):
        fetch(uri, CPT)
