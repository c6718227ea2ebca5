"""TRAIN_UPDATED messages read like the anchor's, in the unit of the run's duration."""

from tasks.train import finished_message, pruned_message, train_message

PROGRESS = {"epoch": 1, "epochs": 2, "batch": 5, "total_batches": 20, "tokens": 5120, "total_tokens": 20480,
            "loss": 1.7123, "elapsed_s": 60.0}


def test_epoch_durations_show_epoch_and_batch():
    assert train_message(PROGRESS, "ep") == "[epoch=1/2][batch=5/20][ETA=3min] Train loss: 1.71"


def test_batch_and_token_durations_count_in_their_own_unit():
    assert train_message(PROGRESS, "ba") == "[batch=5/20][ETA=3min] Train loss: 1.71"
    assert train_message(PROGRESS, "tok") == "[token=5120/20480][ETA=3min] Train loss: 1.71"


def test_dpo_runs_add_their_reward_accuracy_and_margin():
    dpo = {**PROGRESS, "loss": 0.6513, "reward_accuracy": 0.75, "reward_margin": 0.1234}
    assert train_message(dpo, "ba") == "[batch=5/20][ETA=3min] Train loss: 0.65, reward accuracy: 0.75, margin: 0.123"


def test_eta_is_seconds_minutes_or_hours():
    assert "[ETA=20s]" in train_message({**PROGRESS, "elapsed_s": 6.7}, "ep")
    assert "[ETA=2h0min]" in train_message({**PROGRESS, "elapsed_s": 2400.0}, "ep")
    assert "[ETA=0s]" in train_message({**PROGRESS, "batch": 20, "tokens": 20480}, "ep")


def test_finished_message_says_why_early_stopping_ended_the_run():
    finished = {"kind": "finished", "batch": 12, "hf_path": "/o/huggingface/ba12"}
    assert finished_message(finished, None) == "training finished after 12 batches"
    stopped = {"kind": "stopped", "batch": 12, "best_loss": 1.2341, "best_batch": 6, "evals_without_improvement": 3,
               "reason": "eval loss did not improve by more than 0.001 for 3 evaluations (best 1.234 at batch 6)"}
    assert finished_message(finished, stopped) == (
        "training stopped early at batch 12: eval loss did not improve by more than 0.001 for 3 evaluations "
        "(best 1.234 at batch 6)"
    )


def test_pruned_checkpoints_are_named_in_the_log():
    pruned = {"kind": "pruned", "batch": 6, "keep": 1, "removed": ["/o/ep1-ba4", "/o/huggingface/ba4"]}
    assert pruned_message(pruned) == "save_top_k=1: removed /o/ep1-ba4, /o/huggingface/ba4\n"
