"""One slice of a data file, validated and tokenized in a worker process.

A file is cut into byte ranges that end at line ends, so each worker reads, checks and tokenizes its own slice
and the parent only packs. Line numbers in a result count from the slice's first line; the parent adds the lines
of the slices before it."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import TaskType
from tasks.data.formats import At, normalize, parse_line, record_problems
from tasks.data.pack import RowBlock, pack_best_fit, pack_pairs
from tasks.data.pair_tokenize import PairExample, tokenize_pairs
from tasks.data.preference import Pair, canonical_pair, pair_problems
from tasks.data.quality import QUALITY_COLUMNS
from tasks.data.report import DataReport, Problem
from tasks.data.template import TemplateSupport
from tasks.data.tokenize import (
    IGNORE,
    Encoder,
    Example,
    tokenize_chat,
    tokenize_documents,
    tokenize_instructions,
)

SLICE_BYTES = 4 << 20  # big enough to amortise a task's overhead, small enough to spread a file over every core
MAX_LINE_BYTES = 64 << 20
BATCH = 256  # records per tokenizer call


@dataclass(frozen=True)
class Slice:
    """Bytes [start, end) of one file, both at line starts."""

    path: Path
    start: int
    end: int
    name: str  # how problems name the file
    unit: str  # "line", or "row" for tables and datasets exported as JSON Lines
    first_of_file: bool  # documents: the slice that opens a file starts a document
    last_of_file: bool  # documents: ... and the one that closes it ends it with EOS


@dataclass(frozen=True)
class SliceJob:
    part: Slice
    task_type: TaskType
    context_length: int
    pad_id: int
    template: TemplateSupport | None
    tokenize: bool  # False once the run is bound to fail: only the report is still wanted


@dataclass
class SliceResult:
    num_lines: int
    report: DataReport
    # Chat and instructions: the slice's examples packed here, in the worker. Documents: the examples themselves,
    # which the parent packs as one stream across files.
    rows: RowBlock | None = None
    examples: list[Example] = field(default_factory=list)
    # per example: length, loss tokens, truncated, dropped (TokenStats.add); per pair: pair_counts (PairStats.add)
    counts: tuple[np.ndarray, ...] = ()
    quality: dict[str, np.ndarray] = field(default_factory=dict)  # one entry per record, for the GX suite


class LineTooLong(Exception):
    """A line runs past MAX_LINE_BYTES: no record is that large, and reading it whole could exhaust memory."""

    def __init__(self, offset: int):
        self.offset = offset


def slices(path: Path, name: str, unit: str, size: int = SLICE_BYTES, text: bool = False) -> list[Slice]:
    """The file in byte ranges of about `size`, each ending just after a newline (or at the end of the file).
    Text (documents) may run on without a newline: a long line is cut between two characters instead."""
    total = path.stat().st_size
    bounds = [0]
    with path.open("rb") as f:
        while bounds[-1] + size < total:
            cut = bounds[-1] + size
            f.seek(cut)
            rest = f.readline(MAX_LINE_BYTES)  # to the end of the line the cut falls in
            if len(rest) == MAX_LINE_BYTES and not rest.endswith(b"\n"):
                if not text:
                    raise LineTooLong(cut)
                rest = rest[:_char_start(rest, len(rest) - 1)]  # never split a multi-byte character
            if cut + len(rest) >= total:
                break
            bounds.append(cut + len(rest))
    bounds.append(total)
    return [Slice(path, a, b, name, unit, a == 0, b == total) for a, b in zip(bounds, bounds[1:])]


def _char_start(data: bytes, at: int) -> int:
    """The start of the UTF-8 character that byte `at` belongs to."""
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return at


_encoders: dict[str, Encoder] = {}  # per worker process: loading a tokenizer takes longer than a small slice


def encoder_for(model_dir: str) -> Encoder:
    if model_dir not in _encoders:
        from transformers import AutoTokenizer

        _encoders[model_dir] = Encoder(AutoTokenizer.from_pretrained(model_dir))
    return _encoders[model_dir]


def run_slice(job: SliceJob, model_dir: str) -> SliceResult:
    """Validate every record of the slice; tokenize the valid ones unless the job says only to report."""
    with job.part.path.open("rb") as f:
        f.seek(job.part.start)
        data = f.read(job.part.end - job.part.start)
    if job.task_type is TaskType.CONTINUED_PRETRAIN:
        return _documents(job, data, model_dir)
    if job.task_type is TaskType.DPO:
        return _pairs(job, data, model_dir)
    return _records(job, data, model_dir)


Checked = tuple[int, Any, list[Problem]]  # a record's line, the record, what is wrong with it


def _checked(job: SliceJob, data: bytes, check: Callable[[Any, At], list[Problem]]) -> tuple[int, list[Checked]]:
    """The slice's lines, and each non-blank one parsed and checked."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    checked = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            record = parse_line(line)
            checked.append((number, record, check(record, _at(job, number))))
    return len(lines), checked


def _at(job: SliceJob, number: int) -> At:
    return partial(Problem, job.part.name, number, unit=job.part.unit)


def _records(job: SliceJob, data: bytes, model_dir: str) -> SliceResult:
    num_lines, checked = _checked(job, data, lambda record, at: record_problems(record, job.task_type, at,
                                                                                job.template))
    report = DataReport(job.part.name, job.task_type)
    quality = _Quality()
    valid: list[tuple[int, dict]] = []
    for number, record, problems in checked:
        report.add_record(problems)
        if not problems:
            record = normalize(record, job.task_type)
            valid.append((number, record))
        quality.add_record(number, record, not problems)
    examples: list[Example] = []
    if job.tokenize and valid:
        encoder = encoder_for(model_dir)
        for start in range(0, len(valid), BATCH):
            batch = [record for _, record in valid[start:start + BATCH]]
            if job.task_type is TaskType.CHAT_COMPLETION:
                tokenized = tokenize_chat(encoder, [r["messages"] for r in batch], job.context_length)
            else:
                tokenized = tokenize_instructions(encoder, batch, job.context_length)
            examples += tokenized
            quality.add_tokens([number for number, _ in valid[start:start + BATCH]], tokenized)
    kept = [example for example in examples if example.has_loss]
    rows = RowBlock.of(pack_best_fit(kept, job.context_length, job.pad_id), job.context_length)
    return SliceResult(num_lines, report, rows=rows, counts=example_counts(examples), quality=quality.columns())


def _pairs(job: SliceJob, data: bytes, model_dir: str) -> SliceResult:
    """Preference pairs: checked, tokenized (which finds the prompts that fill the context), and packed two sides
    to a row. Pairs are numbered from 0 in the slice, in file order; the parent numbers them across slices."""
    num_lines, checked = _checked(job, data, lambda record, at: pair_problems(record, at, job.template))
    valid = {number: canonical_pair(record) for number, record, problems in checked if not problems}
    examples: dict[int, PairExample] = {}
    if job.tokenize and valid:
        pairs = list(valid.values())
        examples = dict(zip(valid, (example for start in range(0, len(pairs), BATCH) for example in
                                    tokenize_pairs(encoder_for(model_dir), pairs[start:start + BATCH],
                                                   job.context_length))))
    report = DataReport(job.part.name, job.task_type)
    quality = _Quality()
    for number, record, problems in checked:
        example = examples.get(number)
        if example is not None and example.problem:
            problems = [_at(job, number)(*example.problem)]
        report.add_record(problems)
        quality.add_record(number, valid[number] if not problems else record, not problems)
    kept = {number: example for number, example in examples.items() if example.problem is None}
    quality.add_pairs(list(kept), list(kept.values()))
    width = 2 * job.context_length
    rows = RowBlock.of(pack_pairs([example.sides for example in kept.values()], width, job.pad_id), width)
    return SliceResult(num_lines, report, rows=rows, counts=pair_counts(list(kept.values())),
                       quality=quality.columns())


def _documents(job: SliceJob, data: bytes, model_dir: str) -> SliceResult:
    report = DataReport(job.part.name, job.task_type)
    quality = _Quality()
    if job.part.first_of_file and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, as some editors write: not text to learn
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        report.add_record([Problem(job.part.name, line, "", f"bytes that are not UTF-8 (0x{data[e.start]:02x})",
                                   "save the file as UTF-8 text", unit="line")])
        quality.add_record(1, None, False)
        return SliceResult(data.count(b"\n"), report, counts=example_counts([]), quality=quality.columns())
    # Emptiness is a property of the whole file; a large file's last slice may hold only whitespace.
    whole = job.part.first_of_file and job.part.last_of_file
    problems = record_problems(text, job.task_type, partial(Problem, job.part.name, None)) if whole else []
    report.add_record(problems)
    quality.add_record(1, text, not problems)
    examples = []
    if job.tokenize and not problems:
        examples = tokenize_documents(encoder_for(model_dir), [text], lead=job.part.first_of_file,
                                      eos=job.part.last_of_file)
        quality.add_tokens([1], examples)
    return SliceResult(data.count(b"\n"), report, examples=examples, counts=example_counts(examples),
                       quality=quality.columns())


class _Quality:
    """The derived columns the GX suite judges, one value per record."""

    def __init__(self):
        self.rows: dict[int, dict[str, Any]] = {}

    def add_record(self, line: int, record: Any, valid: bool) -> None:
        row = {"line": line, "valid": valid, "num_messages": 0, "role_pattern": "", "last_role": "",
               "num_empty_content": 0, "num_chars": 0, "num_tokens": 0, "num_loss_tokens": 0, "truncated": False}
        if isinstance(record, str):
            row["num_chars"] = len(record)
        elif isinstance(record, dict | Pair):
            texts = _texts(record)
            row["num_chars"] = sum(len(t) for t in texts if isinstance(t, str))
            row["num_empty_content"] = sum(1 for t in texts if not (isinstance(t, str) and t.strip()))
            roles = _roles(record)
            if roles is not None:
                row["num_messages"] = len(roles)
                row["role_pattern"] = ",".join(roles)
                row["last_role"] = roles[-1] if roles else ""
        self.rows[line] = row

    def add_tokens(self, lines: list[int], examples: list[Example]) -> None:
        for line, example in zip(lines, examples):
            row = self.rows[line]
            row["num_tokens"] = len(example)
            row["num_loss_tokens"] = int((example.labels[1:] != IGNORE).sum())
            row["truncated"] = example.truncated

    def add_pairs(self, lines: list[int], pairs: list[PairExample]) -> None:
        """A pair's tokens as its longer side holds them (what context_length bounds), its loss tokens both answers'."""
        for line, pair in zip(lines, pairs):
            row = self.rows[line]
            row["num_tokens"] = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
            row["num_loss_tokens"] = len(pair.chosen) + len(pair.rejected)
            row["truncated"] = pair.chosen_cut or pair.rejected_cut

    def columns(self) -> dict[str, np.ndarray]:
        rows = list(self.rows.values())
        return {name: np.array([row[name] for row in rows], dtype=dtype) for name, dtype in QUALITY_COLUMNS.items()}


def _texts(record: dict | Pair) -> list[Any]:
    if isinstance(record, Pair):
        prompt = [m["content"] for m in record.prompt] if record.chat else [record.prompt]
        return [*prompt, record.chosen, record.rejected]
    messages = record.get("messages")
    if isinstance(messages, list):
        return [m.get("content") if isinstance(m, dict) else None for m in messages]
    return [record.get(key) for key in ("prompt", "response", "completion") if key in record]


def _roles(record: dict | Pair) -> list[str] | None:
    if isinstance(record, Pair):
        return [m["role"] for m in record.prompt] + ["assistant"] if record.chat else None
    messages = record.get("messages")
    if not isinstance(messages, list):
        return None
    return [str(m.get("role")) if isinstance(m, dict) else "?" for m in messages]


def offset_lines(result: SliceResult, lines_before: int) -> SliceResult:
    """The result with line numbers counted from the start of the file."""
    report = result.report
    report.shown = {kind: [replace(p, line=p.line + lines_before) if p.line is not None else p for p in shown]
                    for kind, shown in report.shown.items()}
    result.quality["line"] = result.quality["line"] + lines_before
    return result


def example_counts(examples: list[Example]) -> tuple[np.ndarray, ...]:
    """Per example: length, loss tokens, truncated, dropped (no token left to learn from)."""
    loss = np.array([int((e.labels[1:] != IGNORE).sum()) for e in examples], dtype=np.int64)
    return (np.array([len(e) for e in examples], dtype=np.int64), loss,
            np.array([e.truncated for e in examples], dtype=bool), loss == 0)


def pair_counts(pairs: list[PairExample]) -> tuple[np.ndarray, ...]:
    """Per pair: prompt tokens, chosen and rejected answer tokens (after the cut), whether each answer was cut."""
    return (*(np.array([len(getattr(p, name)) for p in pairs], dtype=np.int64)
              for name in ("prompt", "chosen", "rejected")),
            *(np.array([getattr(p, name) for p in pairs], dtype=bool) for name in ("chosen_cut", "rejected_cut")))


def offset_pairs(result: SliceResult, pairs_before: int) -> SliceResult:
    """The result with its pairs numbered from the start of the data set."""
    sides = result.rows.sequence_ids
    sides[sides >= 0] += 2 * pairs_before
    return result
