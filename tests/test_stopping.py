"""The loop's policies, alone and without torch: when a checkpoint and an eval are due, early stopping's watch and
the divergence guard (the runs that exercise them through the worker are in test_worker_runs.py and
test_worker_diverge.py)."""

import math
import subprocess
import sys
from pathlib import Path

from tasks.training.stopping import SPIKE_WARMUP, DivergenceGuard, EvalWatch, checkpoint_due, eval_due


def test_the_policies_import_no_torch():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tasks.training.stopping; print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False"]


def test_checkpoints_fall_at_each_epochs_end_or_every_save_steps_and_always_at_the_end():
    def due(every: int | None) -> list[int]:
        return [step for step in range(1, 11) if checkpoint_due(step, 4, 10, every)]

    assert due(None) == [4, 8, 10]  # 4 batches an epoch, 10 in all: the last epoch is cut short
    assert due(3) == [3, 6, 9, 10]
    assert due(1) == list(range(1, 11))
    assert due(20) == [10]  # save_steps beyond the plan: the end still checkpoints


def test_evals_fall_with_each_checkpoint_or_every_val_check_interval_and_at_the_end():
    assert eval_due(4, 10, None, checkpointed=True) and not eval_due(3, 10, None, checkpointed=False)
    for checkpointed in (True, False):  # with an interval, checkpoints do not matter
        assert [step for step in range(1, 11) if eval_due(step, 10, 4, checkpointed)] == [4, 8, 10]


def test_eval_watch_counts_evals_that_do_not_beat_the_best_by_min_delta():
    watch = EvalWatch()
    for batch, loss in enumerate([2.0, 1.5, 1.45, 1.6, 1.2], start=1):
        watch.update(loss, batch, min_delta=0.1)
    assert (watch.best_loss, watch.best_batch, watch.evals_without_improvement) == (1.2, 5, 0)
    watch.update(1.15, 6, min_delta=0.1)  # better, but not by more than 0.1: counts as no improvement
    watch.update(1.3, 7, min_delta=0.1)
    assert (watch.best_loss, watch.best_batch, watch.evals_without_improvement) == (1.2, 5, 2)
    assert watch.exhausted(2) and not watch.exhausted(3) and not watch.exhausted(None)
    assert watch.reason(0.1) == "eval loss did not improve by more than 0.1 for 2 evaluations (best 1.2 at batch 5)"
    watch.update(1.3, 8, min_delta=0.0)
    watch.update(1.1, 9, min_delta=0.0)  # any decrease counts with min_delta 0
    assert (watch.best_batch, watch.evals_without_improvement) == (9, 0)
    watch.update(1.1, 10, min_delta=0.0)
    assert watch.reason(0.0) == "eval loss did not improve for 1 evaluation (best 1.1 at batch 9)"


def test_early_stopping_stops_before_the_plans_end_only():
    watch = EvalWatch(best_loss=1.0, best_batch=2, evals_without_improvement=2)
    assert watch.stops(6, 10, patience=2) and watch.stops(6, 10, patience=1)
    assert not watch.stops(6, 10, patience=3) and not watch.stops(6, 10, patience=None)
    assert not watch.stops(10, 10, patience=2)  # at the end the run finishes as planned, not stopped
    assert not EvalWatch().stops(0, 10, patience=1)  # no eval yet


def test_non_finite_losses_and_grad_norms_diverge_at_once():
    guard = DivergenceGuard(10.0)
    assert guard.check(math.nan, 1.0) == "loss nan (not a number)"
    assert guard.check(math.inf, 1.0) == "loss inf (infinite)"
    assert guard.check(2.0, math.nan) == "grad norm nan (not a number)"
    assert guard.check(2.0, -math.inf) == "grad norm -inf (infinite)"
    assert DivergenceGuard(None).check(math.nan, None) == "loss nan (not a number)"  # spike check off, NaN still not
    assert guard.check(1e6, None) is None  # no spike check before the warm-up log points


def test_a_spike_over_the_factor_times_the_recent_mean_diverges_after_warm_up():
    guard = DivergenceGuard(10.0)
    for loss in (3.0, 2.0, 1.0, 2.0):
        guard.record(loss)
    assert len(guard.recent) == SPIKE_WARMUP - 1 and guard.check(100.0, 1.0) is None
    guard.record(2.0)  # the mean of the 5 is 2.0
    assert guard.check(20.0, 1.0) is None
    assert guard.check(20.1, 1.0) == "loss 20.1 is over 10x the mean of the last 5 logged losses (2)"
    assert DivergenceGuard(None, recent=list(guard.recent)).check(1e9, 1.0) is None  # None: no spike check
    for _ in range(50):
        guard.record(0.1)
    assert len(guard.recent) == 20 and guard.check(1.5, 1.0).endswith("the last 20 logged losses (0.1)")
    assert guard.check(1.0, 1.0) is None  # 10x the mean but less than SPIKE_MIN_RISE above it: noise near zero
