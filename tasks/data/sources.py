"""Every place users keep training data, resolved to local files the readers in tasks.data read.

A `train_data_path` or `eval_data_path` may be a local path or file:// URI, a Unity Catalog volume
(`dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>` or `/Volumes/...`), an S3 object or prefix
(`s3://bucket/key`), a Hugging Face dataset split (`<dataset>/<split>` or `<entity>/<dataset>/<split>`)
or a Delta table (`catalog.schema.table`). Remote files are downloaded into `cache_dir()/sources`;
dataset splits and tables are written there as JSON Lines, one row per line."""

import base64
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import boto3
import pyarrow as pa
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
)
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from tasks.config import TaskType
from tasks.errors import InvalidInputError
from tasks.home import cache_dir, tables_root, volumes_root
from tasks.publish import publish_once

# catalog.schema.table; a name ending like a file is a missing file, not a table.
_TABLE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".tsv", ".arrow")
# <dataset>/<split> or <entity>/<dataset>/<split>, as Hugging Face spells repository ids and split names.
_HUB_SPLIT = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*){1,2}$")
_SPLIT = re.compile(r"^\w[\w.-]*$")
_BATCH_ROWS = 1024  # rows per Arrow batch written as JSON Lines: memory stays bounded for any table size
_S3_CONFIG = Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 3})
_FORMS = (
    "a local path, file://, dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>, s3://bucket/key, "
    "a Hugging Face dataset <dataset>/<split> or a Delta table <catalog>.<schema>.<table>"
)


@dataclass(frozen=True)
class LocalData:
    """A data source resolved to local files."""

    uri: str  # as the user wrote it
    path: Path  # a local .jsonl file (chat/IFT), or a .txt file / folder of .txt files (CPT)
    name: str  # how problem messages name the source: the file's name for files; "org/ds/split"; "cat.schema.table"
    unit: str  # "line" for files, "row" for HF datasets and Delta tables (problem messages say "row 5")
    fingerprint: str  # sha256 hex that changes whenever the content changes (it keys the tokenized-data cache)


@dataclass(frozen=True)
class _S3:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class _S3Object:
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class _HFDataset:
    repo: str  # the dataset as written: a folder path or a hub id
    split: str
    folder: Path | None  # the local dataset folder; None: a hub id, looked up in the Hugging Face cache


@dataclass(frozen=True)
class _Table:
    name: str  # catalog.schema.table
    location: str  # a folder or s3:// URI under the tables root


_Source = Path | _S3 | _HFDataset | _Table


def check_data_path(uri: str, field: str, task_type: TaskType) -> None:
    """Cheap existence check before any run exists (no download): S3 head/list, volume, HF folder/split/subsets,
    Delta table exists. Raises InvalidInputError naming `field`, the uri, and the fix."""
    source = _resolve(uri, field, task_type)
    match source:
        case Path():
            _check_local(source, uri, field, task_type)
        case _S3():
            _s3_objects(_s3_client(), source, uri, field, task_type, full=False)
        case _HFDataset():
            _refuse_for_pretraining(uri, field, task_type, "a Hugging Face dataset")
            _hf_split(source, uri, field)
        case _Table():
            _refuse_for_pretraining(uri, field, task_type, "a Delta table")
            _open_table(source, uri, field)


def fetch(uri: str, task_type: TaskType, field: str = "data path") -> LocalData:
    """Materialise the source locally (cached), or return a local file in place."""
    source = _resolve(uri, field, task_type)
    match source:
        case Path():
            _check_local(source, uri, field, task_type)
            return LocalData(uri, source, source.name, "line", _local_fingerprint(source))
        case _S3():
            return _fetch_s3(source, uri, field, task_type)
        case _HFDataset():
            _refuse_for_pretraining(uri, field, task_type, "a Hugging Face dataset")
            return _fetch_hf(source, uri, field)
        case _Table():
            _refuse_for_pretraining(uri, field, task_type, "a Delta table")
            return _fetch_table(source, uri, field)


def local_path(uri: str, field: str) -> Path | None:
    """The file or folder on this machine that `uri` reads, resolved (links and '..' followed); None for a volume,
    S3, a Delta table or a dataset on the Hugging Face hub. Reads no data."""
    if uri.startswith(("dbfs:", "s3://", "/Volumes/")):
        return None
    match _resolve(uri, field, TaskType.INSTRUCTION_FINETUNE):
        case Path() as path:
            return path.resolve()
        case _HFDataset(folder=Path() as folder):
            return folder.resolve()
    return None


def _resolve(uri: str, field: str, task_type: TaskType) -> _Source:
    """Which store `uri` names, and where in it; nothing is read from the store yet."""
    if not uri.strip():
        raise InvalidInputError(f"{field} is empty: pass {_FORMS}")
    if uri.startswith("dbfs:"):
        return _volume(uri, uri.removeprefix("dbfs:"), field)
    if uri.startswith("s3://"):
        location = _s3_location(uri)
        if not location.bucket:
            raise InvalidInputError(f"{field} {uri} names no bucket: write s3://bucket/key")
        return location
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise InvalidInputError(f"{field} {uri}: {scheme}:// is not supported: pass {_FORMS}")
    if uri.startswith("/Volumes/") or uri == "/Volumes":
        return _volume(uri, uri, field)
    path = Path(unquote(uri.removeprefix("file://")) if uri.startswith("file://") else uri).expanduser()
    if (path.parent / "dataset_dict.json").is_file() and task_type is not TaskType.CONTINUED_PRETRAIN:
        # A split folder of a saved DatasetDict: chat and instruction data is never a folder.
        return _HFDataset(str(path.parent), path.name, path.parent)
    if uri.startswith("file://") or path.exists():
        return path
    if _TABLE.match(uri) and not uri.lower().endswith(_FILE_SUFFIXES):
        catalog, schema, table = uri.split(".")
        return _Table(uri, str(_under_root(tables_root(), [catalog, schema, table])))
    if _SPLIT.match(path.name) and not path.name.lower().endswith(_FILE_SUFFIXES):
        if len(path.parts) > 1 and path.parent.is_dir():  # <folder>/<split>
            if _looks_like_dataset(path.parent):
                return _HFDataset(str(path.parent), path.name, path.parent)
        elif _HUB_SPLIT.match(uri):
            return _HFDataset(uri.rsplit("/", 1)[0], path.name, None)
    return path  # missing: _check_local says so


def _volume(uri: str, path: str, field: str) -> Path | _S3:
    """`/Volumes/<catalog>/<schema>/<volume>/<path>` under the volumes root, as Databricks maps dbfs:/Volumes."""
    parts = [part for part in path.split("/") if part]
    if parts[:1] != ["Volumes"]:
        raise InvalidInputError(
            f"{field} {uri}: only Unity Catalog volumes are supported under dbfs:/: write "
            "dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>, or copy the data into a volume"
        )
    if len(parts) < 4:
        raise InvalidInputError(
            f"{field} {uri} does not name a volume: write dbfs:/Volumes/<catalog>/<schema>/<volume>/<path>"
        )
    if ".." in parts:
        raise InvalidInputError(f"{field} {uri} leaves its volume ('..'): write the path inside the volume")
    return _under_root(volumes_root(), parts[1:])


def _under_root(root: str, parts: list[str]) -> Path | _S3:
    if root.startswith("s3://"):
        base = _s3_location(root)
        return _S3(base.bucket, "/".join(p for p in (base.key.strip("/"), *parts) if p))
    return Path(root, *parts)


def _s3_location(uri: str) -> _S3:
    # Split by hand: keys may hold '?' or '#', which urlparse would cut off.
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return _S3(bucket, key)


def _label(uri: str, location: object) -> str:
    """The uri as the user wrote it, and where it resolved to when that differs."""
    return uri if str(location).rstrip("/") == uri.rstrip("/") else f"{uri} ({location})"


def _does_not_exist(uri: str, field: str, location: object) -> InvalidInputError:
    message = f"{field} {_label(uri, location)} does not exist: check the path"
    if uri.startswith(("dbfs:/Volumes", "/Volumes")):
        message += f"; volumes are read from TESSERA_VOLUMES_ROOT ({volumes_root()})"
    return InvalidInputError(message)


def _refuse_for_pretraining(uri: str, field: str, task_type: TaskType, kind: str) -> None:
    if task_type is TaskType.CONTINUED_PRETRAIN:
        raise InvalidInputError(
            f"{field} {uri} is {kind}: {TaskType.CONTINUED_PRETRAIN} reads .txt files; pass a .txt file "
            "or a folder of them (local, dbfs:/Volumes/... or s3://...)"
        )


def _not_one_file(uri: str, field: str, task_type: TaskType, location: object) -> InvalidInputError:
    return InvalidInputError(
        f"{field} {_label(uri, location)} is a folder: {task_type} takes one .jsonl file; pass the file's path"
    )


def _notext_files(uri: str, field: str, location: object) -> InvalidInputError:
    return InvalidInputError(
        f"{field} {_label(uri, location)} holds no .txt files: {TaskType.CONTINUED_PRETRAIN} reads every .txt "
        "file under a folder; add some, or pass a .txt file"
    )


# Local files and volumes on a local root


def _check_local(path: Path, uri: str, field: str, task_type: TaskType) -> None:
    if not path.exists():
        raise _does_not_exist(uri, field, path)
    if task_type is TaskType.CONTINUED_PRETRAIN:
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*.txt")):
            raise _notext_files(uri, field, path)
    elif path.is_dir():
        error = _not_one_file(uri, field, task_type, path)
        if (path / "dataset_dict.json").is_file():  # a saved Hugging Face DatasetDict: the split is missing
            error = InvalidInputError(f"{error}, or name a split of this Hugging Face dataset: {uri}/train")
        raise error


def _local_fingerprint(path: Path) -> str:
    """sha256 of the file, or of every .txt file's relative name and content digest, sorted by name."""
    if not path.is_dir():
        return _file_digest(path).hex()
    return _files_fingerprint(path, text_files(path))


def _files_fingerprint(root: Path, files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + _file_digest(file))
    return digest.hexdigest()


def text_files(path: Path) -> list[Path]:
    """The file itself, or every .txt file under a folder, in sorted order so the data order is stable."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return [path]


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


# The download cache


def _cached(fingerprint: str, build: Callable[[Path], None]) -> Path:
    """The cache folder for `fingerprint`, filled once by `build(staging folder)`."""
    return publish_once(cache_dir() / "sources" / fingerprint, build)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# S3, and volumes on an S3 root


def _s3_client() -> BaseClient:
    # A fresh session, so credentials and endpoints set after import (or changed between runs) are honoured.
    return boto3.session.Session().client("s3", config=_S3_CONFIG)


@contextmanager
def _s3_errors(uri: str, field: str, location: _S3) -> Iterator[None]:
    """Turn what boto3 raises into what to fix."""
    label = _label(uri, location)
    try:
        yield
    except NoCredentialsError:
        raise InvalidInputError(
            f"{field} {label}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError) as e:
        raise InvalidInputError(
            f"{field} {label}: cannot reach the S3 endpoint {e.kwargs.get('endpoint_url')}: check AWS_ENDPOINT_URL "
            "(or AWS_ENDPOINT_URL_S3) and that the store is running"
        ) from None
    except ParamValidationError:
        raise InvalidInputError(
            f"{field} {label}: {location.bucket!r} is not a valid bucket name: write s3://bucket/key"
        ) from None
    except ClientError as e:
        raise InvalidInputError(_s3_refusal(e, label, field, location)) from None
    except BotoCoreError as e:
        raise InvalidInputError(f"{field} {label}: S3 failed: {e}") from None


def _s3_refusal(error: ClientError, label: str, field: str, location: _S3) -> str:
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return (f"{field} {label}: bucket {location.bucket} does not exist: check the bucket name "
                "(and AWS_ENDPOINT_URL, for an S3-compatible store)")
    if code in ("403", "AccessDenied", "AllAccessDisabled"):
        return (f"{field} {label}: access denied: give the credentials in use (AWS_PROFILE, AWS_ACCESS_KEY_ID "
                "or the instance role) s3:GetObject and s3:ListBucket on it")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return f"{field} {label}: the AWS credentials were refused ({code}): check or renew them"
    if code in ("PreconditionFailed", "412"):
        return f"{field} {label} changed while it was being downloaded: start again"
    return f"{field} {label}: S3 refused the request ({code}: {error.response.get('Error', {}).get('Message')})"


def _s3_objects(client: BaseClient, location: _S3, uri: str, field: str, task_type: TaskType,
                full: bool) -> tuple[bool, list[_S3Object]]:
    """Whether `location` is a prefix (else one object), and its objects: the .txt files under a prefix for
    CONTINUED_PRETRAIN. With `full` false, lists only as far as the first .txt file."""
    with _s3_errors(uri, field, location):
        head = _s3_head(client, location)
        if head is not None:
            return False, [head]
        objects = _s3_list(client, location.bucket, _s3_prefix(location))
        first = next(objects, None)
        if first is None:
            raise _does_not_exist(uri, field, location)
        if task_type is not TaskType.CONTINUED_PRETRAIN:
            raise _not_one_file(uri, field, task_type, location)
        texts = (o for o in itertools.chain([first], objects) if o.key.endswith(".txt"))
        found = list(texts) if full else list(itertools.islice(texts, 1))
        if not found:
            raise _notext_files(uri, field, location)
        return True, found


def _s3_head(client: BaseClient, location: _S3) -> _S3Object | None:
    """The object at `location`, or None when there is none (it may be a prefix)."""
    if not location.key or location.key.endswith("/"):
        return None
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as e:
        # A missing bucket is a bare 404 here too; listing the prefix next tells the two apart.
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return _S3Object(location.key, head["ETag"], head["ContentLength"])


def _s3_list(client: BaseClient, bucket: str, prefix: str) -> Iterator[_S3Object]:
    """Every object under `prefix`, a page at a time; folder markers (keys ending in '/') left out."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield _S3Object(item["Key"], item["ETag"], item["Size"])


def _s3_prefix(location: _S3) -> str:
    """The key prefix of the "folder" at `location`: its key with one trailing '/', or '' for the bucket."""
    return f"{location.key.strip('/')}/" if location.key.strip("/") else ""


def _fetch_s3(location: _S3, uri: str, field: str, task_type: TaskType) -> LocalData:
    """The object downloaded, or for CONTINUED_PRETRAIN the .txt files under the prefix, keeping their
    relative paths; an unchanged object (same key, ETag and size) is not downloaded again."""
    client = _s3_client()
    is_prefix, objects = _s3_objects(client, location, uri, field, task_type, full=True)
    if is_prefix:
        prefix: str | None = _s3_prefix(location)
        name = PurePosixPath(prefix).name or location.bucket
        files = {o.key.removeprefix(prefix): o for o in objects}
    else:
        prefix, name = None, PurePosixPath(location.key).name
        files = {name: objects[0]}
    fingerprint = _fingerprint("s3", location.bucket, prefix, [[o.key, o.etag, o.size] for o in objects])
    folder = _cached(fingerprint, lambda staging: _download(client, location, files, uri, field, staging))
    return LocalData(uri, folder if is_prefix else folder / name, name, "line", fingerprint)


def _download(client: BaseClient, location: _S3, files: dict[str, _S3Object], uri: str, field: str,
              staging: Path) -> None:
    """Stream each object to its relative path under `staging`."""
    for relative, obj in files.items():
        parts = PurePosixPath(relative).parts
        if not parts or ".." in parts:
            raise InvalidInputError(
                f"{field} {_label(uri, location)}: object {obj.key} has no file name that stays inside the "
                "folder: rename it"
            )
        target = staging.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(uri, field, location):
            # IfMatch: the bytes are those of the ETag that keys the cache, or the download fails.
            body = client.get_object(Bucket=location.bucket, Key=obj.key, IfMatch=obj.etag)["Body"]
            with target.open("wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    out.write(chunk)


# Hugging Face datasets


@dataclass(frozen=True)
class _Split:
    """One split of a dataset folder, and the files that hold it."""

    folder: Path
    split: str
    saved: bool  # written by save_to_disk; else data files that datasets.load_dataset(folder) reads
    files: list[Path]


def _looks_like_dataset(folder: Path) -> bool:
    """Whether `folder` holds a dataset at its top: a mistyped path must not start a recursive scan of,
    say, the home folder it happens to sit in."""
    if not folder.is_dir():
        return False
    for entry in folder.iterdir():
        if entry.name in ("dataset_dict.json", "state.json", "data"):
            return True
        if entry.suffix.lower() in _FILE_SUFFIXES and entry.suffix.lower() != ".txt":
            return True
        if entry.name == "README.md" and entry.read_bytes()[:3] == b"---":  # a dataset card declaring configs
            return True
    return False


def _hub_snapshot(source: _HFDataset, uri: str, field: str) -> Path:
    """The dataset's folder in the local Hugging Face cache; never the network, which these machines lack."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise InvalidInputError(
            f"{field} {uri}: the Hugging Face dataset {source.repo} is not in the local Hugging Face cache, and "
            f"Tessera does not reach the Hub: download it where the Hub is reachable (`hf download {source.repo} "
            "--repo-type dataset`) and copy the cache here, or save the split as JSONL and pass that file's path"
        ) from None


def _hf_split(source: _HFDataset, uri: str, field: str) -> _Split:
    """The split's files, refusing a missing split or a dataset with several subsets (configs)."""
    folder = (source.folder or _hub_snapshot(source, uri, field)).absolute()
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        _check_split(source, splits, uri, field)
        files = sorted(p for p in (folder / source.split).iterdir() if p.is_file())
        return _Split(folder, source.split, True, files)
    if (folder / "state.json").is_file():
        raise InvalidInputError(
            f"{field} {uri}: {folder} holds one saved Dataset, without splits: save a DatasetDict instead "
            f"(DatasetDict({{'{source.split}': dataset}}).save_to_disk(...)), or save it as JSONL and pass that "
            "file's path"
        )
    import datasets  # takes a second to import; only Hugging Face sources need it

    try:
        configs = datasets.get_dataset_config_names(str(folder))
        builder = datasets.load_dataset_builder(str(folder)) if len(configs) == 1 else None
    except FileNotFoundError:  # no data files in the folder
        raise _does_not_exist(uri, field, folder) from None
    except (ValueError, datasets.exceptions.DatasetsError) as e:
        raise InvalidInputError(f"{field} {uri}: cannot read the Hugging Face dataset at {folder}: {e}") from None
    if builder is None:
        raise InvalidInputError(
            f"{field} {uri}: the Hugging Face dataset {source.repo} has several subsets ({', '.join(configs)}), "
            "and a path names no subset: save the subset you want as JSONL and pass that file's path, e.g. "
            f"datasets.load_dataset({source.repo!r}, {configs[0]!r}, split={source.split!r})"
            f".to_json('{source.split}.jsonl')"
        )
    data_files = {str(split): files for split, files in (builder.config.data_files or {}).items()}
    _check_split(source, list(data_files), uri, field)
    return _Split(folder, source.split, False, [Path(f) for f in data_files[source.split]])


def _check_split(source: _HFDataset, splits: list[str], uri: str, field: str) -> None:
    if source.split not in splits:
        raise InvalidInputError(
            f"{field} {uri}: the Hugging Face dataset {source.repo} has no split {source.split!r}; its splits are "
            f"{', '.join(splits) or 'none'}: write {source.repo}/{splits[0] if splits else '<split>'}"
        )


def _fetch_hf(source: _HFDataset, uri: str, field: str) -> LocalData:
    """The split written as JSON Lines, keyed by its files' content."""
    split = _hf_split(source, uri, field)
    fingerprint = _fingerprint("hf", split.split, split.saved, _files_fingerprint(split.folder, split.files))
    folder = _cached(fingerprint, lambda staging: _export_hf(split, uri, field, staging / "rows.jsonl"))
    name = source.repo if source.folder is None else source.folder.name
    return LocalData(uri, folder / "rows.jsonl", f"{name}/{source.split}", "row", fingerprint)


def _export_hf(split: _Split, uri: str, field: str, target: Path) -> None:
    import datasets

    try:
        if split.saved:
            dataset = datasets.load_from_disk(str(split.folder / split.split))
        else:  # streamed: no Arrow copy of the data in the Hugging Face cache
            dataset = datasets.load_dataset(str(split.folder), split=split.split, streaming=True)
        _write_jsonl(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS), target)
    except (ValueError, OSError, pa.ArrowException, datasets.exceptions.DatasetsError) as e:
        raise InvalidInputError(
            f"{field} {uri}: cannot read the Hugging Face dataset at {split.folder}: {e}; fix its files, or save "
            "the split as JSONL and pass that file's path"
        ) from None


# Delta tables


def _open_table(table: _Table, uri: str, field: str) -> DeltaTable:
    missing = InvalidInputError(
        f"{field} {uri}: no Delta table at {table.location}: check the name, or set TESSERA_TABLES_ROOT to "
        "the folder (or s3://bucket/prefix) that holds <catalog>/<schema>/<table>"
    )
    if table.location.startswith("s3://"):
        # Ask boto3 first: its errors (no bucket, access denied, no credentials) say what to fix.
        location = _s3_location(table.location)
        with _s3_errors(uri, field, location):
            if next(_s3_list(_s3_client(), location.bucket, f"{location.key}/_delta_log/"), None) is None:
                raise missing
    try:
        return DeltaTable(table.location, storage_options=_table_storage_options(table, uri, field))
    except TableNotFoundError:
        raise missing from None
    except (DeltaError, OSError) as e:
        raise InvalidInputError(
            f"{field} {uri}: cannot read the Delta table at {table.location}: {_delta_reason(e)}"
        ) from None


def _delta_reason(error: Exception) -> str:
    """deltalake's error chain on one line, without its terminal colours."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m|↳", " ", str(error)).split())


def _table_storage_options(table: _Table, uri: str, field: str) -> dict[str, str]:
    """deltalake's S3 settings, from boto3's resolution of credentials, region and endpoint, so both stores
    read the same configuration."""
    if not table.location.startswith("s3://"):
        return {}
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise InvalidInputError(
            f"{field} {uri} ({table.location}): no AWS credentials found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    frozen = credentials.get_frozen_credentials()
    options = {
        "AWS_ACCESS_KEY_ID": frozen.access_key,
        "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
        "AWS_REGION": session.region_name or "us-east-1",
    }
    if frozen.token:
        options["AWS_SESSION_TOKEN"] = frozen.token
    endpoint = session.client("s3", config=_S3_CONFIG).meta.endpoint_url
    if not (urlparse(endpoint).hostname or "").endswith("amazonaws.com"):  # an S3-compatible store
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):  # a local server; object_store refuses plain HTTP unless told
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def _fetch_table(table: _Table, uri: str, field: str) -> LocalData:
    """The table's current version written as JSON Lines, keyed by its location, version and files."""
    delta = _open_table(table, uri, field)
    fingerprint = _fingerprint("delta", table.location, delta.version(), sorted(delta.file_uris()))

    def export(staging: Path) -> None:
        try:
            _write_jsonl(delta.to_pyarrow_dataset().to_batches(batch_size=_BATCH_ROWS), staging / "rows.jsonl")
        except (DeltaError, OSError, pa.ArrowException) as e:
            raise InvalidInputError(
                f"{field} {uri}: cannot read the Delta table at {table.location}: {_delta_reason(e)}"
            ) from None

    folder = _cached(fingerprint, export)
    return LocalData(uri, folder / "rows.jsonl", table.name, "row", fingerprint)


def _write_jsonl(batches: Iterable[pa.RecordBatch | pa.Table], target: Path) -> None:
    """One JSON object per row, columns as keys in table order, so row N of the source is line N.

    A null column is left out of its row: a table has every column in every row, so rows written with
    `response` and rows written with `completion` share both columns, each null where the other is set."""
    with target.open("w", encoding="utf-8") as out:
        for batch in batches:
            for row in batch.to_pylist():
                row = {key: value for key, value in row.items() if value is not None}
                out.write(json.dumps(row, ensure_ascii=False, default=_json_value) + "\n")


def _json_value(value: object) -> str:
    """A value JSON cannot hold, as a string: times in ISO 8601, bytes as text (base64 when not UTF-8)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return str(value)
