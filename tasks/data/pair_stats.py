"""Token statistics of preference pairs, gathered from worker slices like TokenStats: pairs, the tokens of each side
(the prompt, the chosen and the rejected answers), answers cut to fit, and the lengths of the sequences a pair trains
on (its prompt with one answer: what context_length bounds), whose histogram is lengths.png."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import TaskType
from tasks.data.stats import TokenStats

NOVA_MIN_PAIRS = 1000  # Nova's recommendation for effective DPO training
HISTOGRAM_BINS = 8  # the length histogram stats.json carries, which `tessera validate` draws


@dataclass(eq=False)
class PairStats:
    """Counts over the pairs a run trains on (bad pairs are refused, never dropped)."""

    context_length: int
    sequences: TokenStats = field(init=False)  # both sides of every pair, each prompt + answer
    num_examples: int = 0  # pairs
    prompt_tokens: int = 0  # once per pair, though each side holds them
    chosen_tokens: int = 0  # after the cut
    rejected_tokens: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    num_truncated: int = 0  # pairs with either answer cut
    num_dropped: int = 0  # always 0: the name TokenStats gives it, which prepare reads

    def __post_init__(self):
        self.sequences = TokenStats(self.context_length)

    def add(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, chosen_cut: np.ndarray,
            rejected_cut: np.ndarray) -> None:
        """A batch of pairs (shard.pair_counts): tokens of each prompt and answer, and whether each answer was cut."""
        for answer, cut in ((chosen, chosen_cut), (rejected, rejected_cut)):
            self.sequences.add(prompt + answer, answer, cut, np.zeros(len(answer), dtype=bool))
        self.num_examples += len(prompt)
        self.prompt_tokens += int(prompt.sum())
        self.chosen_tokens += int(chosen.sum())
        self.rejected_tokens += int(rejected.sum())
        self.chosen_truncated += int(chosen_cut.sum())
        self.rejected_truncated += int(rejected_cut.sum())
        self.num_truncated += int((chosen_cut | rejected_cut).sum())

    def warnings(self, task_type: TaskType) -> list[str]:
        """Too few pairs, and answers cut short."""
        notes = []
        if self.num_examples < NOVA_MIN_PAIRS:
            notes.append(f"the data set has {self.num_examples:,} preference pairs, fewer than the {NOVA_MIN_PAIRS:,} "
                         "recommended for DPO: the model may not learn much from it; add pairs")
        if self.num_truncated:
            notes.append(f"{self.num_truncated:,} of {self.num_examples:,} pairs have an answer longer than fits after "
                         f"its prompt in context_length={self.context_length} tokens and cut to it "
                         f"({self.chosen_truncated:,} chosen, {self.rejected_truncated:,} rejected): raise "
                         "context_length or shorten them")
        return notes

    def histogram_png(self, path: Path) -> None:
        self.sequences.histogram_png(path, noun="sequence")

    def to_dict(self) -> dict:
        """TokenStats' counts over the sequences (tokens as the rows hold them: the prompt once per side), the pairs
        in place of examples, and each side's tokens."""
        return dict(self.sequences.to_dict(), num_examples=self.num_examples, num_truncated=self.num_truncated,
                    pairs={"prompt_tokens": self.prompt_tokens, "chosen_tokens": self.chosen_tokens,
                           "rejected_tokens": self.rejected_tokens, "chosen_truncated": self.chosen_truncated,
                           "rejected_truncated": self.rejected_truncated,
                           "histogram": self.sequences.bins(HISTOGRAM_BINS)})
