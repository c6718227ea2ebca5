"""A training file turned into packed rows on disk, once: cached by the data, the tokenizer and the settings.

A prepared folder holds input_ids.npy, labels.npy and position_ids.npy (int32, [num_rows, context_length])
and meta.json (the PreparedDataset fields but path)."""

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from transformers import AutoTokenizer

from tasks.config import TaskType
from tasks.data.formats import parse_task_type, raise_if_invalid, validate_data_file
from tasks.data.pack import pack_examples, pack_stream
from tasks.data.sources import local_path, read_documents, read_jsonl, text_files
from tasks.data.tokenize import IGNORE, Example, tokenize_records
from tasks.errors import InvalidInputError
from tasks.home import cache_dir

FORMAT_VERSION = 1  # bump when tokenization or packing changes, so older prepared folders are not reused
ARRAYS = ("input_ids", "labels", "position_ids")
# The files that decide how text becomes tokens (the chat template is in chat_template.jinja or tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*",
                   "merges.txt")


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    num_examples: int  # packed; dropped ones excluded
    num_dropped: int  # examples left with no token to learn from after truncation
    num_truncated: int
    num_tokens: int  # real tokens in the rows, padding excluded
    num_loss_tokens: int
    num_rows: int
    context_length: int
    packing_efficiency: float  # num_tokens / (num_rows * context_length)
    task_type: str
    source: str  # the path it was first prepared from; the cache is shared by identical content
    content_hash: str

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(path=path, **json.loads((path / "meta.json").read_text()))


def prepare_dataset(data_path: str, model_dir: Path, task_type: str, context_length: int) -> PreparedDataset:
    """Validate, tokenize and pack `data_path` for the model's tokenizer, or return the cached result."""
    task = parse_task_type(task_type)
    source = local_path(data_path)
    if not source.exists():
        raise InvalidInputError(f"training data {data_path} does not exist: check the path")
    content = content_hash(source, task)
    key = _sha256(json.dumps([FORMAT_VERSION, content, tokenizer_hash(model_dir), context_length, task]))
    target = cache_dir() / "prepared" / key
    if (target / "meta.json").is_file():
        return PreparedDataset.load(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs on the same data prepare it once
        if (target / "meta.json").is_file():
            return PreparedDataset.load(target)
        raise_if_invalid(validate_data_file(data_path, task))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        staging = target.with_name(f"{key}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            examples = tokenize_records(_records(source, task), tokenizer, task, context_length)
            counts = _write_rows(staging, examples, task, context_length, pad_id)
            if counts["num_rows"] == 0:
                raise InvalidInputError(
                    f"{data_path}: no example keeps a token to learn from within context_length={context_length}; "
                    "raise context_length or shorten the prompts"
                )
            efficiency = round(counts["num_tokens"] / (counts["num_rows"] * context_length), 4)
            meta = dict(counts, context_length=context_length, packing_efficiency=efficiency, task_type=str(task),
                        source=str(data_path), content_hash=content)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            staging.rename(target)  # atomic: a folder with meta.json under its final name is complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return PreparedDataset.load(target)


def content_hash(source: Path, task_type: TaskType) -> str:
    """sha256 of the data: the file, or for a folder every .txt file's name and content in sorted order."""
    digest = hashlib.sha256()
    files = text_files(source) if task_type is TaskType.CONTINUED_PRETRAIN else [source]
    for file in files:
        if source.is_dir():
            digest.update(str(file.relative_to(source)).encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def tokenizer_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    files = sorted({p for pattern in TOKENIZER_FILES for p in Path(model_dir).glob(pattern) if p.is_file()})
    for file in files:
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _records(source: Path, task_type: TaskType) -> Iterator[Any]:
    if task_type is TaskType.CONTINUED_PRETRAIN:
        return (text for _, text in read_documents(source))
    return (record for _, record in read_jsonl(source))


def _write_rows(folder: Path, examples: Iterable[Example], task_type: TaskType, context_length: int,
                pad_id: int) -> dict[str, int]:
    counts = dict.fromkeys(("num_examples", "num_dropped", "num_truncated", "num_tokens", "num_loss_tokens",
                            "num_rows"), 0)

    def kept(examples: Iterable[Example]) -> Iterator[Example]:
        for example in examples:
            counts["num_truncated"] += example.truncated
            if example.has_loss:
                counts["num_examples"] += 1
                yield example
            else:
                counts["num_dropped"] += 1

    pack = pack_stream if task_type is TaskType.CONTINUED_PRETRAIN else pack_examples
    files = {name: _RowsFile(folder / f"{name}.npy", context_length) for name in ARRAYS}
    try:
        for row in pack(kept(examples), context_length, pad_id):
            for name in ARRAYS:
                files[name].append(getattr(row, name))
            counts["num_rows"] += 1
            counts["num_tokens"] += row.num_tokens
            counts["num_loss_tokens"] += int((row.labels != IGNORE).sum())
    finally:
        for file in files.values():
            file.close()
    return counts


class _RowsFile:
    """An int32 .npy file written a row at a time, so memory stays bounded: the header, which holds the row
    count, is written last into space kept for it at the start."""

    HEADER_BYTES = 128  # what numpy's 64-byte-aligned v1.0 header for a 2-D int32 array takes

    def __init__(self, path: Path, width: int):
        self.file = path.open("wb")
        self.file.seek(self.HEADER_BYTES)
        self.width = width
        self.rows = 0

    def append(self, row: np.ndarray) -> None:
        self.file.write(row.astype("<i4", copy=False).tobytes())
        self.rows += 1

    def close(self) -> None:
        self.file.seek(0)
        header = {"descr": "<i4", "fortran_order": False, "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self.file, header)
        assert self.file.tell() == self.HEADER_BYTES
        self.file.close()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
