"""TRAIN_UPDATED messages read like the anchor's, in the unit of the run's duration."""

from tasks.train import train_message

PROGRESS = {"epoch": 1, "epochs": 2, "batch": 5, "total_batches": 20, "tokens": 5120, "total_tokens": 20480,
            "loss": 1.7123, "elapsed_s": 60.0}


def test_epoch_durations_show_epoch_and_batch():
    assert train_message(PROGRESS, "ep") == "[epoch=1/2][batch=5/20][ETA=3min] Train loss: 1.71"


def test_batch_and_token_durations_count_in_their_own_unit():
    assert train_message(PROGRESS, "ba") == "[batch=5/20][ETA=3min] Train loss: 1.71"
    assert train_message(PROGRESS, "tok") == "[token=5120/20480][ETA=3min] Train loss: 1.71"


def test_eta_is_seconds_minutes_or_hours():
    assert "[ETA=20s]" in train_message({**PROGRESS, "elapsed_s": 6.7}, "ep")
    assert "[ETA=2h0min]" in train_message({**PROGRESS, "elapsed_s": 2400.0}, "ep")
    assert "[ETA=0s]" in train_message({**PROGRESS, "batch": 20, "tokens": 20480}, "ep")
