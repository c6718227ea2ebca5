"""A data source that grows, for retraining: what it holds now, what is new since an earlier look, and those rows.

A growing source is a folder of .jsonl files (local, file:// or a volume), an S3 prefix of them, or a Delta table.
Its inventory names each file with what changes when the file does: a local file's sha256, an S3 object's ETag
and size; a Delta table's data files never change (a write adds files), so their names are enough. A file is new
when it was not in the earlier inventory or its version differs. The rows of the chosen files are gathered into
one .jsonl file, the form a finetune run reads.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
from deltalake.exceptions import DeltaError

from tasks.config import TaskType
from tasks.data.sources import (
    _BATCH_ROWS,
    _S3,
    _delta_reason,
    _does_not_exist,
    _file_digest,
    _HFDataset,
    _label,
    _open_table,
    _resolve,
    _s3_client,
    _s3_errors,
    _s3_head,
    _s3_list,
    _s3_prefix,
    _Table,
    _write_jsonl,
)
from tasks.errors import InvalidInputError

_FORMS = "a folder or S3 prefix of .jsonl files (local, file://, dbfs:/Volumes/..., s3://...) or a Delta table"


@dataclass(frozen=True)
class Inventory:
    """What a growing source holds: each file and its version; `version` is a Delta table's, for messages."""

    files: dict[str, str]
    version: int | None = None

    def new_since(self, earlier: "Inventory | None") -> list[str]:
        """The files added or changed since `earlier` (all of them when there was no earlier look), sorted."""
        seen = earlier.files if earlier else {}
        return sorted(name for name, version in self.files.items() if seen.get(name) != version)

    def to_json(self) -> str:
        return json.dumps({"files": self.files, "version": self.version}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Inventory":
        data = json.loads(text)
        return cls(data["files"], data.get("version"))


def take_inventory(uri: str, field: str = "run.train_data_path") -> Inventory:
    """The source's files now; refused in words when `uri` is not a growing source."""
    source = _resolve(uri, field, TaskType.CHAT_COMPLETION)
    match source:
        case Path() if source.is_dir():
            return Inventory({str(p.relative_to(source)): _file_digest(p).hex() for p in _jsonl_files(source)})
        case Path() if source.exists():
            raise InvalidInputError(f"{field} {_label(uri, source)} is one file: retraining watches a source that "
                                    f"grows; pass {_FORMS}")
        case Path():
            raise _does_not_exist(uri, field, source)
        case _S3():
            client, prefix = _s3_client(), _s3_prefix(source)
            with _s3_errors(uri, field, source):
                if _s3_head(client, source) is not None:
                    raise InvalidInputError(f"{field} {_label(uri, source)} is one object: retraining watches a source "
                                            f"that grows; pass {_FORMS}")
                return Inventory({o.key.removeprefix(prefix): f"{o.etag}:{o.size}"
                                  for o in _s3_list(client, source.bucket, prefix) if o.key.endswith(".jsonl")})
        case _Table():
            table = _open_table(source, uri, field)
            try:
                files = {f.path: "" for f in table.to_pyarrow_dataset().get_fragments()}
            except (DeltaError, OSError, pa.ArrowException) as e:
                raise InvalidInputError(f"{field} {uri}: cannot read the Delta table: {_delta_reason(e)}") from None
            return Inventory(files, table.version())
        case _HFDataset() if source.folder is not None and not (source.folder / source.split).exists():
            raise _does_not_exist(uri, field, source.folder / source.split)  # a missing folder, as it looks
        case _HFDataset():
            raise InvalidInputError(f"{field} {uri} is a Hugging Face dataset, which does not grow: pass {_FORMS}")


def gather(uri: str, files: list[str], target: Path, field: str = "run.train_data_path") -> Path:
    """The rows of `files` of the source (names as in its inventory), in that order, written to `target` (.jsonl)."""
    source = _resolve(uri, field, TaskType.CHAT_COMPLETION)
    target.parent.mkdir(parents=True, exist_ok=True)
    match source:
        case Path():
            with target.open("wb") as out:
                for name in files:
                    try:
                        with (source / name).open("rb") as f:
                            _append(f, out)
                    except OSError as e:
                        raise InvalidInputError(f"{field} {uri}: cannot read {name}: {e.strerror}; was it removed "
                                                "while the retraining ran?") from None
        case _S3():
            client, prefix = _s3_client(), _s3_prefix(source)
            with _s3_errors(uri, field, source), target.open("wb") as out:
                for name in files:
                    _append(client.get_object(Bucket=source.bucket, Key=prefix + name)["Body"], out)
        case _Table():
            dataset = _open_table(source, uri, field).to_pyarrow_dataset()
            wanted = set(files)
            chosen = pds.FileSystemDataset([f for f in dataset.get_fragments() if f.path in wanted], dataset.schema,
                                           dataset.format, dataset.filesystem)
            try:
                _write_jsonl(chosen.to_batches(batch_size=_BATCH_ROWS), target)
            except (DeltaError, OSError, pa.ArrowException) as e:
                raise InvalidInputError(f"{field} {uri}: cannot read the Delta table: {_delta_reason(e)}") from None
    return target


def _jsonl_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jsonl") if p.is_file())


def _append(stream, out) -> None:
    """Copy one file's lines, ending its last line so the next file's first line starts a line of its own."""
    last = b"\n"
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        out.write(chunk)
        last = chunk[-1:]
    if last != b"\n":
        out.write(b"\n")
