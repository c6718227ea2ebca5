"""OpenAI's Files API over Tessera's own storage, for training and validation files.

A file is a folder `<TESSERA_FILES_ROOT>/<file id>/` holding `<file id>.jsonl` (the bytes as uploaded: a run's
messages name the file by it) and `file.json` (its OpenAI object and who uploaded it). The root is a local folder
(default TESSERA_HOME/files) or s3://bucket/prefix; a job's run reads its data straight from there. Uploads stream to
disk (Starlette spools them past 1 MiB) and are refused past TESSERA_MAX_UPLOAD_MB (default 512, OpenAI's limit for
one file) before any byte is read (api/limits.py).
"""

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

import boto3
from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from api.openai.errors import OpenAIError
from api.openai.pages import page
from tasks.home import files_root
from tasks.run_record import current_user

router = APIRouter(prefix="/v1")
META = "file.json"
PURPOSES = ("fine-tune",)  # what a user uploads; Tessera writes "fine-tune-results" itself
CHUNK = 2**20
FIRST_LINE_MAX = 8 * CHUNK  # how far into a file a job looks for its first record
FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,100}$")  # file-<24 hex>, or a job's file-results-<run name>


def data_name(file_id: str) -> str:
    return f"{file_id}.jsonl"


def max_upload_bytes() -> int:
    return int(os.environ.get("TESSERA_MAX_UPLOAD_MB", "512")) * 2**20


class _Store:
    """One file folder per id under the root, on local disk or S3."""

    def __init__(self, root: str):
        self.root = root
        if root.startswith("s3://"):
            self.bucket, _, prefix = root.removeprefix("s3://").partition("/")
            self.prefix = prefix.strip("/")
            self.s3 = boto3.session.Session().client("s3")

    def _key(self, file_id: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, file_id, name) if p)

    def _data_key(self, file_id: str) -> str:
        return self._key(file_id, data_name(file_id))

    def _data_path(self, file_id: str) -> Path:
        return Path(self.root, file_id, data_name(file_id))

    def data_uri(self, file_id: str) -> str:
        """Where a run reads the file from: a local path or an s3:// URI."""
        return f"s3://{self.bucket}/{self._data_key(file_id)}" if self.s3_root else str(self._data_path(file_id))

    def id_of(self, uri: str | None) -> str | None:
        """The file whose data `uri` is (data_uri read back), else None."""
        file_id = Path(uri).stem if uri else ""
        return file_id if file_id.startswith("file-") and self.data_uri(file_id) == uri else None

    @property
    def s3_root(self) -> bool:
        return self.root.startswith("s3://")

    def put(self, file_id: str, source: BinaryIO, meta: dict) -> None:
        """Write the data, then the metadata: a file is listed only once its bytes are all there."""
        if self.s3_root:
            self.s3.upload_fileobj(source, self.bucket, self._data_key(file_id))
            self.s3.put_object(Bucket=self.bucket, Key=self._key(file_id, META), Body=json.dumps(meta).encode())
            return
        folder = Path(self.root, file_id)
        folder.mkdir(parents=True)
        with open(folder / data_name(file_id), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        (folder / f"{META}.partial").write_text(json.dumps(meta))
        (folder / f"{META}.partial").rename(folder / META)

    def meta(self, file_id: str) -> dict | None:
        if self.s3_root:
            try:
                return json.loads(self.s3.get_object(Bucket=self.bucket, Key=self._key(file_id, META))["Body"].read())
            except self.s3.exceptions.NoSuchKey:
                return None
        path = Path(self.root, file_id, META)
        return json.loads(path.read_text()) if path.is_file() else None

    def ids(self) -> list[str]:
        if self.s3_root:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", Delimiter="/")
            found = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
            return [prefix.rstrip("/").rsplit("/", 1)[-1] for prefix in found]
        root = Path(self.root)
        return [p.name for p in root.iterdir() if (p / META).is_file()] if root.is_dir() else []

    def read(self, file_id: str) -> Iterator[bytes]:
        if self.s3_root:
            yield from self.s3.get_object(Bucket=self.bucket, Key=self._data_key(file_id))["Body"].iter_chunks(CHUNK)
            return
        with open(self._data_path(file_id), "rb") as source:
            while chunk := source.read(CHUNK):
                yield chunk

    def delete(self, file_id: str) -> None:
        if self.s3_root:
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [
                {"Key": self._key(file_id, META)}, {"Key": self._data_key(file_id)}]})
            return
        Path(self.root, file_id, META).unlink()  # unlisted first, then gone
        shutil.rmtree(Path(self.root, file_id))


def store() -> _Store:
    return _Store(files_root())


def put(file_id: str, source: BinaryIO, filename: str, purpose: str, created_by: str) -> dict:
    """Keep `source` as file `file_id` of `created_by`; its OpenAI object."""
    meta = {"id": file_id, "object": "file", "bytes": 0, "created_at": int(time.time()), "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
            "created_by": created_by}
    source.seek(0, os.SEEK_END)
    meta["bytes"] = source.tell()
    source.seek(0)
    store().put(file_id, source, meta)
    return meta


def first_line(file_id: str) -> tuple[int, bytes] | None:
    """The file's first line that is not blank, with its number; None when there is none in its first
    FIRST_LINE_MAX bytes."""
    head = b""
    with closing(store().read(file_id)) as chunks:
        for chunk in chunks:
            head += chunk
            if any(line.strip() for line in head.split(b"\n")[:-1]) or len(head) > FIRST_LINE_MAX:
                break
        else:
            head += b"\n"  # the whole file was read: its last line is whole too
    return next(((n, line) for n, line in enumerate(head.split(b"\n")[:-1], 1) if line.strip()), None)


def owned(file_id: str, param: str = "file_id") -> dict:
    """The acting user's file `file_id`; another user's is as absent as one that never was."""
    meta = store().meta(file_id) if FILE_ID.match(file_id) else None
    if meta is None or meta["created_by"] != current_user():
        raise OpenAIError(404, f"No such File object: {file_id}", param, "file_not_found")
    return meta


def public(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "created_by"}


@router.post("/files")
def upload(file: UploadFile, purpose: str = Form()) -> dict:
    """Upload a training or validation file: JSON lines, conversations in OpenAI's chat format or preference pairs
    (for a dpo job)."""
    if purpose not in PURPOSES:
        raise OpenAIError(400, f"purpose {purpose!r}: Tessera stores files for fine-tuning only, "
                               "so send purpose=fine-tune", "purpose", "invalid_value")
    return public(put(f"file-{secrets.token_hex(12)}", file.file, Path(file.filename or "upload.jsonl").name, purpose,
                      current_user()))


@router.get("/files")
def list_files(purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000), after: str | None = None,
               order: str = Query("desc", pattern="^(asc|desc)$")) -> dict:
    """The acting user's files, newest first (order=desc)."""
    kept = store()
    files = [m for m in (kept.meta(i) for i in kept.ids()) if m and m["created_by"] == current_user()
             and (purpose is None or m["purpose"] == purpose)]
    files.sort(key=lambda m: (m["created_at"], m["id"]), reverse=order == "desc")
    return page([public(m) for m in files], after, limit)


@router.get("/files/{file_id}")
def retrieve(file_id: str) -> dict:
    return public(owned(file_id))


@router.get("/files/{file_id}/content")
def content(file_id: str):
    owned(file_id)
    where = store().data_uri(file_id)
    if not where.startswith("s3://"):
        return FileResponse(where, media_type="application/octet-stream")
    return StreamingResponse(store().read(file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete(file_id: str) -> dict:
    owned(file_id)
    store().delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}

