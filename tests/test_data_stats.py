"""Token statistics: shards merge to the whole, percentiles, the cost estimate, the warnings and the histogram."""

import json

import numpy as np
import pytest

from tasks.config import TaskType
from tasks.data.stats import CPT_MIN_TOKENS, TokenStats


def batch(lengths, loss=None, truncated=(), dropped=()) -> tuple[np.ndarray, ...]:
    """add()'s arguments: loss tokens default to half of each example; truncated and dropped list indices."""
    lengths = np.asarray(lengths)
    flags = [np.isin(np.arange(len(lengths)), list(indices)) for indices in (truncated, dropped)]
    return lengths, lengths // 2 if loss is None else np.asarray(loss), *flags


def stats_of(context_length: int, *args) -> TokenStats:
    stats = TokenStats(context_length)
    stats.add(*batch(*args))
    return stats


def test_shards_merge_to_what_one_add_counts():
    rng = np.random.default_rng(0)
    lengths, loss = rng.integers(1, 600, 1000), rng.integers(0, 100, 1000)
    truncated, dropped = rng.random(1000) < 0.1, rng.random(1000) < 0.05
    whole = TokenStats(512)
    whole.add(np.minimum(lengths, 512), loss, truncated, dropped)
    merged = TokenStats(512)
    for part in np.array_split(np.arange(1000), 3):
        shard = TokenStats(512)
        shard.add(np.minimum(lengths, 512)[part], loss[part], truncated[part], dropped[part])
        merged.merge(shard)
    assert merged.to_dict() == whole.to_dict()
    assert np.array_equal(merged.lengths, whole.lengths) and merged.max_length == whole.max_length
    assert whole.num_examples == (~dropped).sum() and whole.num_dropped == dropped.sum()
    assert whole.num_tokens == np.minimum(lengths, 512)[~dropped].sum() and whole.num_truncated == truncated.sum()
    with pytest.raises(ValueError, match="context_length"):
        merged.merge(TokenStats(1024))


def test_dropped_examples_are_counted_apart():
    stats = stats_of(16, [4, 16, 16, 7], [2, 8, 0, 3], [1, 2], [2])
    assert (stats.num_examples, stats.num_tokens, stats.num_loss_tokens) == (3, 27, 13)
    assert (stats.num_truncated, stats.num_dropped) == (2, 1)
    assert stats.lengths[[4, 7, 16]].tolist() == [1, 1, 1] and stats.lengths.sum() == 3


def test_longer_documents_fill_the_last_bin_and_keep_their_length():
    stats = stats_of(8, [3, 20, 8])
    assert stats.lengths[8] == 2 and stats.max_length == 20 and stats.num_tokens == 31
    assert stats.summary() == {"min": 3, "p50": 8, "p90": 8, "p99": 8, "max": 20, "mean": 10.3}


def test_percentiles_by_nearest_rank():
    stats = stats_of(128, np.arange(1, 101))
    assert stats.summary() == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    lengths = np.random.default_rng(1).integers(1, 4096, 9_999)
    stats = stats_of(4096, lengths)
    qs = (1, 25, 50, 90, 99, 99.9, 100)
    expected = np.percentile(lengths, qs, method="inverted_cdf")
    assert stats.percentiles(qs) == {f"p{q:g}": int(e) for q, e in zip(qs, expected)}
    assert TokenStats(8).summary() == {"min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}


def test_warnings_at_their_thresholds():
    # Chat and instructions: fewer tokens than one full context.
    for task_type in (TaskType.CHAT_COMPLETION, TaskType.INSTRUCTION_FINETUNE):
        [note] = stats_of(100, [40, 59]).warnings(task_type)
        assert note.startswith("the data set has 99 tokens, fewer than one context of 100")
        assert stats_of(100, [40, 60]).warnings(task_type) == []
    # Continued pretraining: fewer than 1.5M tokens, whatever the context.
    [note] = stats_of(100, [CPT_MIN_TOKENS - 1]).warnings(TaskType.CONTINUED_PRETRAIN)
    assert "fewer than the 1.5M recommended for continued pretraining" in note
    assert stats_of(100, [CPT_MIN_TOKENS - 100, 100]).warnings(TaskType.CONTINUED_PRETRAIN) == []
    # Examples cut and left out, whatever the size.
    notes = stats_of(100, [100, 100, 100, 50], None, [0, 1], [1]).warnings(TaskType.CHAT_COMPLETION)
    assert notes == [
        "2 of 4 examples are longer than context_length=100 tokens and are cut to it: raise context_length or "
        "shorten them",
        "1 of 4 examples keep no token to learn from within context_length=100 and are left out",
    ]


def test_histogram_is_a_small_png(tmp_path):
    lengths = np.random.default_rng(2).integers(1, 3000, 5000)
    # A context the data fills, and one so wide that its marker is only named (off the chart).
    for name, context_length in (("fits.png", 2048), ("wide.png", 131072)):
        stats = stats_of(context_length, np.minimum(lengths, 2048), None, np.flatnonzero(lengths > 2048), [0])
        stats.histogram_png(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(data) < 300_000
    TokenStats(64).histogram_png(tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes().startswith(b"\x89PNG")


def test_to_dict_is_json():
    stats = stats_of(64, [10, 20, 64], None, [2])
    assert json.loads(json.dumps(stats.to_dict())) == {
        "context_length": 64, "num_examples": 3, "num_tokens": 94, "num_loss_tokens": 47, "num_truncated": 1,
        "num_dropped": 0, "length": {"min": 10, "p50": 20, "p90": 64, "p99": 64, "max": 64, "mean": 31.3},
    }
