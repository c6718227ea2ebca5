"""Token statistics of a training set, gathered from worker shards in bounded memory: the distribution of example
lengths, what a run will train on (tokens × epochs, the anchor's cost estimate), and the anchor's warnings about too
little data and examples cut short."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path

import numpy as np

from tasks.config import TaskType

CPT_MIN_TOKENS = 1_500_000  # the anchor recommends at least 1.5M tokens of text for continued pretraining
PERCENTILES = (50, 90, 99)
BARS = 100  # the histogram's bars, however long the context


@dataclass(eq=False)
class TokenStats:
    """Counts over the examples a run trains on; dropped ones (no token left to learn from) are counted apart."""

    context_length: int
    # Kept examples per token length, as trained (after the cut). The last bin also holds longer examples:
    # continued pretraining's documents, which are not cut but split across rows by the packer.
    lengths: np.ndarray = field(init=False, repr=False)
    num_examples: int = 0  # kept
    num_tokens: int = 0  # in kept examples
    num_loss_tokens: int = 0  # in kept examples
    num_truncated: int = 0  # of all examples, kept or dropped
    num_dropped: int = 0
    max_length: int = 0  # exact, where the histogram stops at context_length

    def __post_init__(self):
        self.lengths = np.zeros(self.context_length + 1, dtype=np.int64)

    def add(self, lengths: np.ndarray, loss_tokens: np.ndarray, truncated: np.ndarray, dropped: np.ndarray) -> None:
        """A batch of examples: tokens and loss tokens of each (after the cut), and whether it was cut or dropped."""
        lengths = np.asarray(lengths, dtype=np.int64)
        loss_tokens = np.asarray(loss_tokens, dtype=np.int64)
        truncated, dropped = np.asarray(truncated, dtype=bool), np.asarray(dropped, dtype=bool)
        if not lengths.shape == loss_tokens.shape == truncated.shape == dropped.shape:
            raise ValueError("lengths, loss_tokens, truncated and dropped must have one value per example each")
        kept = lengths[~dropped]
        self.lengths += np.bincount(np.minimum(kept, self.context_length), minlength=self.context_length + 1)
        self.num_examples += kept.size
        self.num_tokens += int(kept.sum())
        self.num_loss_tokens += int(loss_tokens[~dropped].sum())
        self.num_truncated += int(truncated.sum())
        self.num_dropped += int(dropped.sum())
        self.max_length = max(self.max_length, int(kept.max(initial=0)))

    def merge(self, other: "TokenStats") -> None:
        """Add another shard's counts (same context_length) to these."""
        if other.context_length != self.context_length:
            raise ValueError(f"cannot merge statistics for context_length {other.context_length} into "
                             f"statistics for {self.context_length}")
        self.lengths += other.lengths
        self.num_examples += other.num_examples
        self.num_tokens += other.num_tokens
        self.num_loss_tokens += other.num_loss_tokens
        self.num_truncated += other.num_truncated
        self.num_dropped += other.num_dropped
        self.max_length = max(self.max_length, other.max_length)

    def percentiles(self, qs: Sequence[float] = PERCENTILES) -> dict[str, int]:
        """Length at each percentile, by nearest rank: the shortest length that q% of the examples do not exceed."""
        if self.num_examples == 0:
            return {f"p{q:g}": 0 for q in qs}
        # q * n / 100 rather than q / 100 * n: 0.9 * 100 is 90.00000000000001, whose ceiling is one rank too far.
        ranks = [max(1, ceil(q * self.num_examples / 100)) for q in qs]
        found = np.searchsorted(np.cumsum(self.lengths), ranks)
        return {f"p{q:g}": int(length) for q, length in zip(qs, found)}

    def summary(self) -> dict[str, float]:
        """Shortest, percentiles, longest and mean example length."""
        if self.num_examples == 0:
            return {"min": 0, **self.percentiles(), "max": 0, "mean": 0.0}
        shortest = int(np.flatnonzero(self.lengths)[0])
        mean = round(self.num_tokens / self.num_examples, 1)
        return {"min": shortest, **self.percentiles(), "max": self.max_length, "mean": mean}

    def bins(self, count: int) -> list[dict[str, int]]:
        """The length histogram in `count` equal bins from 0 to context_length: each bin's lengths and examples."""
        width = ceil((self.context_length + 1) / count)
        return [{"from": start, "to": min(start + width, self.context_length + 1) - 1,
                 "count": int(self.lengths[start:start + width].sum())}
                for start in range(0, self.context_length + 1, width)]

    def warnings(self, task_type: TaskType) -> list[str]:
        """Too little data for the task, and examples cut or left out."""
        notes = []
        if task_type is TaskType.CONTINUED_PRETRAIN:
            if self.num_tokens < CPT_MIN_TOKENS:
                notes.append(f"the data set has {self.num_tokens:,} tokens, fewer than the 1.5M recommended for "
                             "continued pretraining: the model may not learn much from it; add text")
        elif self.num_tokens < self.context_length:
            notes.append(f"the data set has {self.num_tokens:,} tokens, fewer than one context of "
                         f"{self.context_length:,}: packed, it fills a single row, so the model may not learn much "
                         "from it; add examples")
        total = self.num_examples + self.num_dropped
        if self.num_truncated:
            notes.append(f"{self.num_truncated:,} of {total:,} examples are longer than context_length="
                         f"{self.context_length} tokens and are cut to it: raise context_length or shorten them")
        if self.num_dropped:
            why = ("are empty" if task_type is TaskType.CONTINUED_PRETRAIN
                   else f"keep no token to learn from within context_length={self.context_length}")
            notes.append(f"{self.num_dropped:,} of {total:,} examples {why} and are left out")
        return notes

    def histogram_png(self, path: Path, noun: str = "example") -> None:
        """Examples (or what `noun` names) per length in about BARS bars, context_length marked, titled with the
        counts."""
        from matplotlib.figure import (
            Figure,  # on use: a second to import; Figure needs no pyplot or backend state
        )

        top = min(max(self.max_length, 1), self.context_length)  # the longest bin with examples
        width = ceil((top + 1) / BARS)
        starts = np.arange(0, top + 1, width)
        counts = np.add.reduceat(self.lengths[: top + 1], starts)
        figure = Figure(figsize=(8, 4), dpi=100, layout="constrained")
        axes = figure.subplots()
        axes.stairs(counts, np.append(starts, top + 1), fill=True, color="tab:blue")
        shown = self.context_length <= 1.25 * (top + 1)  # else the data would shrink to a sliver at the left
        axes.axvline(self.context_length, color="tab:red", linestyle="--",
                     label=f"context_length = {self.context_length:,}" + ("" if shown else " (off the chart)"))
        axes.set_xlim(0, (self.context_length if shown else top + 1) * 1.02)
        axes.set_xlabel(f"tokens per {noun}")
        axes.set_ylabel(f"{noun}s")
        axes.legend(loc="upper right")
        summary = self.summary()
        axes.set_title(f"{self.num_examples:,} {noun}s, {self.num_tokens:,} tokens; {self.num_truncated:,} "
                       f"truncated, {self.num_dropped:,} dropped\nlength p50 {summary['p50']:,}, "
                       f"p99 {summary['p99']:,}, max {summary['max']:,}", fontsize=10)
        figure.savefig(path, format="png")

    def to_dict(self) -> dict:
        """The counts and the length summary, JSON-able (the histogram itself is the PNG)."""
        return {
            "context_length": self.context_length,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "num_loss_tokens": self.num_loss_tokens,
            "num_truncated": self.num_truncated,
            "num_dropped": self.num_dropped,
            "length": self.summary(),
        }
