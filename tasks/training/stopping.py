"""When the loop pauses and when it stops: checkpoints and evals due, early stopping, the divergence guard.

Plain policies over numbers the loop hands them, with no torch: a newcomer can read and test them alone
(tests/test_stopping.py imports this module in an interpreter that has no torch loaded).
"""

import math
from dataclasses import dataclass, field

SPIKE_WARMUP = 5  # logged losses before the spike check starts, so the noisy first steps cannot trigger it
SPIKE_MIN_RISE = 1.0  # nats: how far above the mean a spike must also be
SPIKE_WINDOW = 20  # the spike check compares with the mean of at most this many of the latest logged losses


def checkpoint_due(step: int, batches_per_epoch: int, total_batches: int, every: int | None) -> bool:
    """A checkpoint every `every` steps, or at each epoch's end; always at the plan's end."""
    if step == total_batches:
        return True
    return step % batches_per_epoch == 0 if every is None else step % every == 0


def eval_due(step: int, total_batches: int, every: int | None, checkpointed: bool) -> bool:
    """Eval loss at each checkpoint, or every `every` steps and at the end."""
    if every is None:
        return checkpointed
    return step % every == 0 or step == total_batches


@dataclass
class EvalWatch:
    """Early stopping's state: the best eval loss so far, its step, and the evals since that did not beat it."""

    best_loss: float | None = None
    best_batch: int | None = None
    evals_without_improvement: int = 0

    def update(self, loss: float, batch: int, min_delta: float) -> None:
        """An eval improves when it is below the best by more than min_delta; only then does it become the best."""
        if self.best_loss is None or loss < self.best_loss - min_delta:
            self.best_loss, self.best_batch, self.evals_without_improvement = loss, batch, 0
        else:
            self.evals_without_improvement += 1

    def exhausted(self, patience: int | None) -> bool:
        return patience is not None and self.evals_without_improvement >= patience

    def stops(self, step: int, total_batches: int, patience: int | None) -> bool:
        """Whether training stops early here: patience is exhausted before the plan's end (at the end it just ends)."""
        return step < total_batches and self.exhausted(patience)

    def reason(self, min_delta: float) -> str:
        """E.g. `eval loss did not improve by more than 0.001 for 3 evaluations (best 1.234 at batch 6)`."""
        n = self.evals_without_improvement
        by = f" by more than {min_delta:g}" if min_delta else ""
        return (
            f"eval loss did not improve{by} for {n} evaluation{'s' * (n != 1)} "
            f"(best {self.best_loss:.4g} at batch {self.best_batch})"
        )


@dataclass
class DivergenceGuard:
    """Decides, at each log point, whether training has diverged; `recent` holds the latest logged losses."""

    spike_factor: float | None  # None: only non-finite values count
    recent: list[float] = field(default_factory=list)

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Why training has diverged (a phrase, e.g. `loss nan (not a number)`), or None when it has not."""
        for name, value in (("loss", loss), ("grad norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                return f"{name} {value} ({'not a number' if math.isnan(value) else 'infinite'})"
        if self.spike_factor is not None and len(self.recent) >= SPIKE_WARMUP:
            mean = sum(self.recent) / len(self.recent)
            # Near zero, a tenfold jump is noise (0.02 -> 0.2): a spike must also rise SPIKE_MIN_RISE above the mean.
            if loss > self.spike_factor * mean and loss > mean + SPIKE_MIN_RISE:
                return (
                    f"loss {loss:.4g} is over {self.spike_factor:g}x the mean of the last {len(self.recent)} "
                    f"logged losses ({mean:.4g})"
                )
        return None

    def record(self, loss: float) -> None:
        self.recent = [*self.recent, loss][-SPIKE_WINDOW:]
