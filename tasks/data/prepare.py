"""A data set turned into packed rows on disk, once: cached by the data, the tokenizer and the settings.

Slices of the data are validated and tokenized in worker processes (one per core); the parent packs their
examples in file order, so the result is the same whatever the number of workers. A prepared folder holds
input_ids.npy, labels.npy and position_ids.npy (int32, [num_rows, row_length]), meta.json (the
PreparedDataset fields but path), and the evidence a user reads: report.txt, stats.json, quality.json
(the great-expectations result) and lengths.png. A rejected data set keeps its evidence in `<key>.rejected`.

Rows are context_length long, but preference pairs' (DPO) are twice that: each pair's two sides, prompt + chosen and
prompt + rejected (each at most context_length), lie in one row, so one forward computes both. Their folder also
holds sequence_ids.npy (int32, same shape): 2 * pair + side (0 chosen, 1 rejected) at every position of a side, -1
on padding, pairs numbered 0..num_examples-1 in file order. The loss tokens (labels) are the answers' only; a
side's log-probability is the sum of its positions' (the next-token shift as PackedRows.targets does it), so the
reference model's can be computed in one pass and kept per sequence id."""

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import pandas as pd

from tasks.config import TaskType
from tasks.data.formats import parse_task_type
from tasks.data.pack import RowBlock, pack_stream
from tasks.data.pair_stats import PairStats
from tasks.data.quality import run_suite
from tasks.data.report import DataReport, Problem
from tasks.data.shard import (
    MAX_LINE_BYTES,
    LineTooLong,
    Slice,
    SliceJob,
    SliceResult,
    encoder_for,
    offset_lines,
    offset_pairs,
    run_slice,
    slices,
)
from tasks.data.sources import LocalData, fetch, text_files
from tasks.data.stats import TokenStats
from tasks.data.template import TemplateSupport, probe
from tasks.data.tokenize import IGNORE
from tasks.errors import InvalidDataError
from tasks.home import cache_dir
from tasks.publish import publish_once

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_VERSION = 3  # bump when tokenization or packing changes, so older prepared folders are not reused
ARRAYS = ("input_ids", "labels", "position_ids")
PAIR_ARRAYS = (*ARRAYS, "sequence_ids")
# The files that decide how text becomes tokens (the chat template is in chat_template.jinja or tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*",
                   "merges.txt")
_LOAD_OPTIONS = {"local_files_only"}  # in a saved tokenizer_config.json: how it was loaded, not what it is
EVIDENCE = ("report.txt", "stats.json", "quality.json", "lengths.png")  # what a user reads about their data
IN_FLIGHT_PER_WORKER = 2  # slices queued ahead of the packer: keeps workers busy, bounds memory


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    num_records: int  # records read, valid or not
    num_invalid: int  # records skipped as invalid (only when allow_percentage_invalid permits it)
    num_examples: int  # packed; dropped ones excluded
    num_dropped: int  # examples left with no token to learn from after truncation
    num_truncated: int
    num_tokens: int  # real tokens in the rows, padding excluded
    num_loss_tokens: int
    num_rows: int
    context_length: int
    row_length: int  # context_length; twice that for preference pairs, whose two sides share a row
    packing_efficiency: float  # num_tokens / (num_rows * row_length)
    task_type: str
    source: str  # the data path it was first prepared from; the cache is shared by identical content
    content_hash: str

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(path=path, **json.loads((path / "meta.json").read_text()))


def prepare_dataset(data_path: str, model_dir: Path, task_type: str, context_length: int,
                    allow_percentage_invalid: float = 0.0, field: str = "data_path") -> PreparedDataset:
    """Validate, tokenize and pack `data_path` for the model's tokenizer, or return the cached result.

    Raises InvalidDataError, whose message is the report, when the data is not fit to train on."""
    task = parse_task_type(task_type)
    data = fetch(data_path, task, field)  # `field`: the argument an error about the source names
    key = _sha256(json.dumps([FORMAT_VERSION, data.fingerprint, tokenizer_hash(model_dir), context_length, task,
                              allow_percentage_invalid]))
    target = cache_dir() / "prepared" / key
    rejected = target.with_name(f"{key}.rejected")  # refused data: the report and statistics, kept as evidence

    def build(staging: Path) -> None:
        try:
            meta = _prepare(data, Path(model_dir), task, context_length, allow_percentage_invalid, staging)
        except InvalidDataError as e:
            shutil.rmtree(rejected, ignore_errors=True)
            for name in PAIR_ARRAYS:
                (staging / f"{name}.npy").unlink(missing_ok=True)
            staging.rename(rejected)
            raise InvalidDataError(str(e), evidence=rejected) from None
        meta |= dict(source=str(data_path), content_hash=data.fingerprint)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(rejected, ignore_errors=True)

    # Concurrent runs on the same data prepare it once; a folder with meta.json under its final name is complete.
    return PreparedDataset.load(publish_once(target, build, complete=lambda folder: (folder / "meta.json").is_file()))


def _prepare(data: LocalData, model_dir: Path, task: TaskType, context_length: int, allow_percentage_invalid: float,
             folder: Path) -> dict:
    """Write the rows and the evidence into `folder`; return the counts for meta.json."""
    tokenizer = encoder_for(str(model_dir)).tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = task is TaskType.DPO
    template = _template(tokenizer, task)
    report = DataReport(data.uri, task)
    parts = _parts(data, task, report)
    stats = PairStats(context_length) if pairs else TokenStats(context_length)
    quality: list[dict[str, np.ndarray]] = []
    failing = [not report.acceptable(allow_percentage_invalid)]  # once bound to fail, workers only report

    def job(part: Slice) -> SliceJob:
        return SliceJob(part, task, context_length, pad_id, template, tokenize=not failing[0])

    def results() -> Iterator[SliceResult]:
        lines_read: dict[Path, int] = {}  # per file, in file order: a folder of documents has many
        for part, result in _results(parts, job, str(model_dir)):
            result = offset_lines(result, lines_read.setdefault(part.path, 0))
            lines_read[part.path] += result.num_lines
            if task is TaskType.CONTINUED_PRETRAIN:  # a document is a file: the suite numbers documents
                result.quality["line"][:] = len(lines_read)
            if pairs:  # numbered across slices, in file order
                result = offset_pairs(result, stats.num_examples)
            report.merge(result.report)
            quality.append(result.quality)
            stats.add(*result.counts)
            failing[0] = allow_percentage_invalid == 0 and not report.ok
            yield result

    if task is TaskType.CONTINUED_PRETRAIN:  # documents run on across files, cut wherever a row ends
        examples = (e for result in results() for e in result.examples if e.has_loss)
        blocks = (RowBlock.of([row], context_length) for row in pack_stream(examples, context_length, pad_id))
    else:  # whole examples, packed by the workers
        blocks = (result.rows for result in results())
    row_length = 2 * context_length if pairs else context_length
    counts = _write_rows(folder, blocks, row_length, PAIR_ARRAYS if pairs else ARRAYS)
    if report.num_records == 0 and report.ok:  # an empty file, or one of blank lines
        what = "no documents" if task is TaskType.CONTINUED_PRETRAIN else "no records"
        report.add_problem(Problem(data.name, None, "", what, "write one JSON object per line"
                                   if task is not TaskType.CONTINUED_PRETRAIN else "put text in the .txt files"))
    trainable = report.acceptable(allow_percentage_invalid)
    _write_evidence(folder, quality, stats, report, task, context_length, allow_percentage_invalid, trainable)
    if not trainable:
        raise InvalidDataError(report.render(allow_percentage_invalid))
    if counts["num_rows"] == 0:
        raise InvalidDataError(
            f"{data.uri}: no example keeps a token to learn from within context_length={context_length}; "
            "raise context_length or shorten the prompts"
        )
    return dict(
        counts, num_records=report.num_records, num_invalid=report.num_invalid,
        num_examples=stats.num_examples, num_dropped=stats.num_dropped,
        num_truncated=stats.num_truncated, context_length=context_length, row_length=row_length, task_type=task,
        packing_efficiency=round(counts["num_tokens"] / (counts["num_rows"] * row_length), 4),
    )


def _template(tokenizer: "PreTrainedTokenizerBase", task: TaskType) -> TemplateSupport | None:
    """What the chat template renders, where records are conversations: chat records, and pairs where the model has
    a template (pairs of plain strings need none; conversational ones are refused without one when tokenized)."""
    if task is TaskType.CHAT_COMPLETION or (task is TaskType.DPO and tokenizer.chat_template is not None):
        return probe(tokenizer)
    return None


def _write_evidence(folder: Path, quality: list[dict[str, np.ndarray]], stats: TokenStats | PairStats,
                    report: DataReport, task: TaskType, context_length: int, allow_percentage_invalid: float,
                    trainable: bool) -> None:
    """What a run keeps of its data, refused or not: the quality suite's result, the length histogram, the token
    statistics and the report."""
    frame = pd.DataFrame({name: np.concatenate([q[name] for q in quality]) for name in quality[0]}) if quality \
        else pd.DataFrame()
    suite = run_suite(frame, task, context_length)
    quality_json = {"success": suite.success, "failed": suite.failed, "warnings": suite.warnings,
                    "result": suite.result}
    (folder / "quality.json").write_text(json.dumps(quality_json, indent=1, default=str))
    stats.histogram_png(folder / "lengths.png")
    warnings = stats.warnings(task) if trainable else []  # token counts of refused data would only mislead
    (folder / "stats.json").write_text(json.dumps(dict(stats.to_dict(), warnings=warnings), indent=2))
    (folder / "report.txt").write_text(report.render(allow_percentage_invalid) + "\n")


def _parts(data: LocalData, task: TaskType, report: DataReport) -> list[Slice]:
    """The slices to read; problems with the source as a whole go straight into the report."""
    try:
        if task is not TaskType.CONTINUED_PRETRAIN:
            return slices(data.path, data.name, data.unit)
        if data.path.is_file():
            if data.path.suffix != ".txt":
                report.add_problem(Problem(data.name, None, "", f"a {data.path.suffix or 'extensionless'} file",
                                           "use a .txt file, or a folder of .txt files"))
                return []
            return slices(data.path, data.name, "line", text=True)
        files = text_files(data.path)
        if not files:
            report.add_problem(Problem(data.name, None, "", "no .txt files", "put each document in a .txt file"))
        return [part for file in files for part in slices(file, str(file.relative_to(data.path)), "line", text=True)]
    except LineTooLong as e:
        report.add_problem(Problem(data.name, None, "", f"a line of more than {MAX_LINE_BYTES >> 20} MiB (from byte "
                                   f"{e.offset:,})", "write one record per line: no training example is that large"))
        return []


def _results(parts: list[Slice], job: Callable[[Slice], SliceJob], model_dir: str
             ) -> Iterator[tuple[Slice, SliceResult]]:
    """Each slice with its result, in order. One slice runs here; more go to one worker process per core."""
    workers = min(len(parts), len(os.sched_getaffinity(0)))
    if workers <= 1:
        for part in parts:
            yield part, run_slice(job(part), model_dir)
        return
    # fork: workers inherit the imported libraries, so a pool starts in milliseconds, not seconds
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_single_threaded) as pool:
        remaining = iter(parts)
        pending = deque((p, pool.submit(run_slice, job(p), model_dir))
                        for p in islice(remaining, workers * IN_FLIGHT_PER_WORKER))
        while pending:
            part, future = pending.popleft()
            yield part, future.result()  # the consumer may decide here that later slices need no tokenizing
            pending.extend((p, pool.submit(run_slice, job(p), model_dir)) for p in islice(remaining, 1))


def _single_threaded() -> None:
    """One worker per core already: the tokenizer's own thread pool would only contend with its siblings."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def tokenizer_hash(model_dir: Path) -> str:
    """What keys prepared data to the tokenizer: its files, less how they were loaded when saved (transformers writes
    local_files_only into tokenizer_config.json, true wherever HF_HUB_OFFLINE was set)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in TOKENIZER_FILES for p in Path(model_dir).glob(pattern) if p.is_file()})
    for file in files:
        content = file.read_bytes()
        if file.name == "tokenizer_config.json":
            settings = {k: v for k, v in json.loads(content).items() if k not in _LOAD_OPTIONS}
            content = json.dumps(settings, sort_keys=True).encode()
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def _write_rows(folder: Path, blocks: Iterable[RowBlock], row_length: int, arrays: tuple[str, ...]
                ) -> dict[str, int]:
    counts = dict.fromkeys(("num_tokens", "num_loss_tokens", "num_rows"), 0)
    files = {name: _RowsFile(folder / f"{name}.npy", row_length) for name in arrays}
    try:
        for block in blocks:
            for name in arrays:
                files[name].append(getattr(block, name))
            counts["num_rows"] += len(block.num_tokens)
            counts["num_tokens"] += int(block.num_tokens.sum())
            counts["num_loss_tokens"] += int((block.labels != IGNORE).sum())
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

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype="<i4").tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.seek(0)
        header = {"descr": "<i4", "fortran_order": False, "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self.file, header)
        assert self.file.tell() == self.HEADER_BYTES
        self.file.close()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
