"""The store behind /v1/files, on a local folder and on S3 (the moto server, over HTTP): a file is listed only once
whole, reads back byte for byte, and is gone after delete."""

import io

import pytest

from api.openai import files


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        s3.create_bucket(Bucket="uploads")
        monkeypatch.setenv("TESSERA_FILES_ROOT", "s3://uploads/tessera/files")
        return "s3://uploads/tessera/files"
    monkeypatch.setenv("TESSERA_FILES_ROOT", str(tmp_path / "files"))
    return str(tmp_path / "files")


def test_a_file_is_kept_listed_read_and_deleted(root):
    data = b'{"messages": []}\n' * 200_000  # 3.4 MB: more than one chunk and one S3 part
    meta = files.put("file-abc", io.BytesIO(data), "train.jsonl", "fine-tune", "ada@example.com")
    assert (meta["bytes"], meta["filename"], meta["created_by"]) == (len(data), "train.jsonl", "ada@example.com")
    store = files.store()
    assert store.ids() == ["file-abc"] and store.meta("file-abc") == meta
    assert b"".join(store.read("file-abc")) == data
    assert store.data_uri("file-abc") == f"{root}/file-abc/file-abc.jsonl"
    store.delete("file-abc")
    assert store.ids() == [] and store.meta("file-abc") is None
