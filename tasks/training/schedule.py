"""How long a run is and what learning rate each step uses: pure arithmetic, no torch."""

import math
from dataclasses import dataclass

from tasks.config import Duration
from tasks.errors import InvalidInputError


@dataclass(frozen=True)
class Plan:
    epochs: int  # epochs started, the last one possibly partial
    batches_per_epoch: int  # optimizer steps per pass over the rows (a last partial global batch is dropped)
    total_batches: int  # optimizer steps in the run
    tokens_per_batch: int  # rows x context length: every position of a row counts, padding included

    @property
    def total_tokens(self) -> int:
        return self.total_batches * self.tokens_per_batch


def plan_duration(duration: Duration, rows: int, context_length: int, global_batch_size: int) -> Plan:
    """Turn a duration like 3ep, 100ba or 2_000_000tok into optimizer steps over `rows` rows."""
    batches_per_epoch = rows // global_batch_size
    if batches_per_epoch == 0:
        raise InvalidInputError(
            f"the training data has {rows} rows, fewer than global_batch_size ({global_batch_size}): "
            "lower global_batch_size or add data"
        )
    tokens_per_batch = global_batch_size * context_length
    if duration.unit == "ep":
        total = duration.value * batches_per_epoch
    elif duration.unit == "ba":
        total = duration.value
    else:  # "tok": enough whole steps to see at least that many tokens
        total = math.ceil(duration.value / tokens_per_batch)
    return Plan(
        epochs=math.ceil(total / batches_per_epoch),
        batches_per_epoch=batches_per_epoch,
        total_batches=total,
        tokens_per_batch=tokens_per_batch,
    )


def default_warmup(total_batches: int) -> int:
    """10% of the run, 1 to 20 steps (Nova 1.0's range)."""
    return min(20, max(1, total_batches // 10))


def learning_rate_at(
    step: int,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr: float,
    constant_steps: int,
) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup to peak_lr over warmup_steps; then peak_lr for constant_steps; then, over the steps left,
    a cosine or linear decay from peak_lr towards min_lr ("constant": no decay). As in the usual schedulers
    the decay reaches min_lr at step total_steps, one past the last, and stays there beyond it.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps  # (step + 1): the first step already learns
    decay_start = warmup_steps + constant_steps
    if schedule == "constant" or step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if schedule == "cosine":
        remaining = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        remaining = 1 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr + (peak_lr - min_lr) * remaining
