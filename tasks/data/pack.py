"""Packing examples into rows of exactly context_length tokens.

Each document in a row gets position ids that restart at 0. Given position_ids, no attention mask and no KV cache,
transformers reads those restarts as document boundaries and builds a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices), so a packed document is computed as if it were alone. Training must
therefore call the model with use_cache=False: the default (config.use_cache=True, even in train mode) creates a
cache, which skips that detection and lets documents attend to each other. Padding fills the row's end as one more
such document.

Preference pairs (pack_pairs) put a pair's two sides, prompt + chosen and prompt + rejected, side by side in one row,
so one forward pass computes both, in rows twice the context length, which any pair fits; `sequence_ids` says which
pair and side each position belongs to."""

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from tasks.data.tokenize import IGNORE, Example


class Row(NamedTuple):
    input_ids: np.ndarray  # int32 [context_length]
    labels: np.ndarray  # int32 [context_length], IGNORE on padding and at each document's first token
    position_ids: np.ndarray  # int32 [context_length], restarting at 0 where each document starts
    num_tokens: int  # real tokens; the rest of the row is padding
    # Pairs only, int32 [row length]: 2 * pair + side (0 chosen, 1 rejected) at each position of a side, -1 on padding.
    sequence_ids: np.ndarray | None = None


class RowBlock(NamedTuple):
    """Rows stacked: int32 [rows, context_length] each, and the real tokens of each row."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    num_tokens: np.ndarray
    sequence_ids: np.ndarray | None = None  # pairs only

    @classmethod
    def of(cls, rows: Sequence[Row], context_length: int) -> "RowBlock":
        if not rows:
            empty = np.empty((0, context_length), dtype=np.int32)
            return cls(empty, empty, empty, np.empty(0, dtype=np.int64))
        sequence_ids = np.stack([r.sequence_ids for r in rows]) if rows[0].sequence_ids is not None else None
        return cls(*(np.stack([getattr(r, name) for r in rows]) for name in ("input_ids", "labels", "position_ids")),
                   np.array([r.num_tokens for r in rows], dtype=np.int64), sequence_ids)


class _RowBuilder:
    def __init__(self, context_length: int, paired: bool = False):
        self.input_ids = np.empty(context_length, dtype=np.int32)
        self.labels = np.empty(context_length, dtype=np.int32)
        self.position_ids = np.empty(context_length, dtype=np.int32)
        self.sequence_ids = np.full(context_length, -1, dtype=np.int32) if paired else None
        self.used = 0

    @property
    def room(self) -> int:
        return len(self.input_ids) - self.used

    def add(self, input_ids: np.ndarray, labels: np.ndarray, sequence_id: int | None = None) -> None:
        start, end = self.used, self.used + len(input_ids)
        self.input_ids[start:end] = input_ids
        self.labels[start:end] = labels
        # The token before a document belongs to another one: nothing in this row may predict its first token.
        self.labels[start] = IGNORE
        self.position_ids[start:end] = np.arange(end - start)
        if sequence_id is not None:
            self.sequence_ids[start:end] = sequence_id
        self.used = end

    def finish(self, pad_id: int) -> Row:
        self.input_ids[self.used:] = pad_id
        self.labels[self.used:] = IGNORE
        self.position_ids[self.used:] = np.arange(self.room)
        return Row(self.input_ids, self.labels, self.position_ids, self.used, self.sequence_ids)


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Items (each at most `capacity` long) grouped into rows, best-fit decreasing: longest first, each into the
    fullest row it fits. The rows' item indices, rows in the order they were opened, each row's longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    by_room: list[tuple[int, int]] = []  # (room, row index) of rows with room left, ascending
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(by_room, (lengths[i], -1))
        if at == len(by_room):
            rows.append([])
            room.append(capacity)
            index = len(rows) - 1
        else:
            index = by_room.pop(at)[1]
        rows[index].append(i)
        room[index] -= lengths[i]
        if room[index]:
            bisect.insort(by_room, (room[index], index))
    return rows


def pack_best_fit(examples: Sequence[Example], context_length: int, pad_id: int) -> list[Row]:
    """Whole examples (each at most context_length) into rows, best-fit decreasing (best_fit). Each slice of a data
    set is packed alone, so only its last few rows are partly empty."""
    rows = []
    for members in best_fit([len(example) for example in examples], context_length):
        row = _RowBuilder(context_length)
        for i in members:
            row.add(examples[i].input_ids, examples[i].labels)
        rows.append(row.finish(pad_id))
    return rows


def pack_pairs(pairs: Sequence[tuple[Example, Example]], row_length: int, pad_id: int) -> list[Row]:
    """Each pair's chosen and rejected sides (each at most row_length / 2) side by side in one row, pairs best-fit
    into rows of row_length. Pair i of `pairs` gets sequence ids 2i (chosen) and 2i + 1 (rejected)."""
    rows = []
    for members in best_fit([len(chosen) + len(rejected) for chosen, rejected in pairs], row_length):
        row = _RowBuilder(row_length, paired=True)
        for i in members:
            for side, example in enumerate(pairs[i]):
                row.add(example.input_ids, example.labels, 2 * i + side)
        rows.append(row.finish(pad_id))
    return rows


def pack_stream(examples: Iterable[Example], context_length: int, pad_id: int) -> Iterator[Row]:
    """Examples end to end, cut into full rows wherever the row ends: continued pretraining's blocks."""
    row = _RowBuilder(context_length)
    for example in examples:
        start = 0
        while start < len(example):
            end = start + min(row.room, len(example) - start)
            row.add(example.input_ids[start:end], example.labels[start:end])
            start = end
            if row.room == 0:
                yield row.finish(pad_id)
                row = _RowBuilder(context_length)
    if row.used:
        yield row.finish(pad_id)
