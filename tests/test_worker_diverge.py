"""The divergence guard in real runs (its policy alone: test_stopping.py) and the progress line's efficiency figures
(peak memory, MFU).

Real runs: a checkpointed run, then runs of a copy of its model whose embedding of one token is infinite, with
that token only in the rows of step 2: step 1 trains as usual (nothing looks the row up, and it gets no gradient),
and at step 2 the RMS norm of an infinite vector is NaN, so the loss is NaN for certain.
"""

import math
import os
import shutil

import pytest

import numpy as np
import torch
from pydantic import ValidationError

from tasks.errors import TrainingDiverged
from tasks.retries import retryable
from tasks.train import diverged_message
from tasks.training.checkpoints import LATEST
from tasks.training.data import epoch_order
from tasks.training.metrics import flops_per_token
from tasks.training.protocol import DIVERGED_EXIT
from test_worker import make_spec, write_rows
from test_worker_runs import Worker, folders


def test_spec_checks_the_spike_factor_and_peak_flops(tmp_path):
    def spec(**runtime):
        return make_spec("r", tmp_path / "m", write_rows(tmp_path / "d"), tmp_path / "o", **runtime)

    assert spec().loss_spike_factor == 10.0 and spec().peak_flops is None
    assert spec(loss_spike_factor=None, peak_flops=312e12).loss_spike_factor is None
    for bad in (0.5, math.nan, "ten"):
        with pytest.raises(ValidationError, match="loss_spike_factor"):
            spec(loss_spike_factor=bad)
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValidationError, match="peak_flops"):
            spec(peak_flops=bad)


def test_flops_per_token_is_6n_plus_12_l_d_t_and_lora_skips_the_frozen_weight_gradients():
    assert flops_per_token(1000, 1000, layers=2, hidden_size=64, context_length=32) == 6 * 1000 + 12 * 2 * 64 * 32
    # Llama-2-7B at 4096 tokens (PaLM's appendix B form): 6 x 6.74e9 + 12 x 32 x 4096 x 4096.
    assert flops_per_token(6_738_415_616, 6_738_415_616, 32, 4096, 4096) == pytest.approx(4.687e10, rel=1e-3)
    # LoRA: forward and the backward through the activations (4N) for all weights, weight gradients (2N) for 10.
    assert flops_per_token(1000, 10, layers=0, hidden_size=64, context_length=32) == 4 * 1000 + 2 * 10


def test_the_train_task_says_where_it_diverged_and_what_to_do():
    diverged = {"kind": "diverged", "batch": 7, "loss": math.nan, "grad_norm": 3.0,
                "reason": "loss nan (not a number)", "checkpoint": "ep0-ba5"}
    assert diverged_message(diverged, 0.5) == (
        "training diverged at batch 7: loss nan (not a number); lower learning_rate (now 0.5) and start again "
        "from the last checkpoint ep0-ba5"
    )
    assert diverged_message({**diverged, "checkpoint": None}, 5e-5).endswith(
        "lower learning_rate (now 5e-05) and start again from the start (no checkpoint was saved before it)"
    )
    # Not retried: the error says so itself.
    error = TrainingDiverged(diverged_message(diverged, 0.5))
    state = type("State", (), {"result": lambda self, raise_on_failure: error})()
    assert error.retryable is False and retryable(None, None, state) is False


POISON = 7  # the token whose embedding is made infinite


@pytest.fixture(scope="module")
def diverged_runs(tiny_model_dir, tmp_path_factory):
    """"good": 2 steps of an untied tiny model, checkpointed at 2. Then, in copies of its output_dir, two fresh runs
    (resume off) of the same model with token POISON's embedding set to inf, which only the rows of step 2 hold:
    "logged" logs every step; "unlogged" logs every 4 steps but checkpoints at 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("diverge")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(  # untied: the LM head does not read the poisoned embedding
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False))
    model.save_pretrained(folder / "model")
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = math.inf
    model.save_pretrained(folder / "poisoned")
    # 8 rows of tokens 10-499; the rows step 2 takes (global batch 2, seed 17's first epoch) also hold POISON.
    train = write_rows(folder / "train", rows=8)
    input_ids = np.load(train / "input_ids.npy")
    input_ids[input_ids == POISON] = 10
    input_ids[epoch_order(8, 17, 0)[2:4], 5] = POISON
    np.save(train / "input_ids.npy", input_ids)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # exported with the weights (nothing is generated)
        for model_dir in ("model", "poisoned"):
            shutil.copy(tiny_model_dir / name, folder / model_dir / name)
    settings = {"micro_batch_size": 1, "global_batch_size": 2}
    good = make_spec("good", folder / "model", train, folder / "logged", duration="2ba", settings=settings)
    good_lines = Worker(good, folder, "good").finish()
    shutil.copytree(good.output_dir, folder / "unlogged", symlinks=True)
    bad = dict(duration="4ba", resume=False)
    logged = Worker(make_spec("logged", folder / "poisoned", train, folder / "logged",
                              settings={**settings, "save_steps": 2}, **bad), folder, "logged")
    unlogged = Worker(make_spec("unlogged", folder / "poisoned", train, folder / "unlogged",
                                settings={**settings, "save_steps": 2, "trainer.log_every_n_steps": 4}, **bad),
                      folder, "unlogged")
    return good_lines, logged, logged.finish(DIVERGED_EXIT), unlogged, unlogged.finish(DIVERGED_EXIT), folder


def test_a_diverged_run_stops_without_a_checkpoint_and_says_why(diverged_runs):
    good_lines, worker, lines, *_, folder = diverged_runs
    assert [m["kind"] for m in good_lines][-2:] == ["checkpoint", "finished"]
    progress = [m for m in lines if m["kind"] == "progress"]
    assert [m["batch"] for m in progress] == [1, 2] and math.isfinite(progress[0]["loss"])
    assert math.isnan(progress[1]["loss"])
    assert lines[-1] == {"kind": "diverged", "batch": 2, "loss": lines[-1]["loss"], "grad_norm": lines[-1]["grad_norm"],
                         "reason": "loss nan (not a number)", "checkpoint": "ep0-ba2"}
    assert math.isnan(lines[-1]["loss"])
    assert not any(m["kind"] in ("checkpoint", "finished") for m in lines)
    assert worker.stderr.read_text().strip().splitlines()[-1] == "training diverged at batch 2: loss nan (not a number)"
    out = folder / "logged"
    assert folders(out) == (["ep0-ba2"], ["ba2"]) and os.readlink(out / LATEST) == "ep0-ba2"
    assert (out / "ep0-ba2" / "mp_rank_00_model_states.pt").is_file()


def test_steps_since_the_last_log_point_are_checked_before_a_checkpoint(diverged_runs):
    *_, worker, lines, folder = diverged_runs
    assert [m["kind"] for m in lines] == ["started", "diverged"]  # no progress line: none was due
    assert (lines[1]["batch"], lines[1]["checkpoint"]) == (2, "ep0-ba2") and "not a number" in lines[1]["reason"]
    out = folder / "unlogged"
    assert folders(out) == (["ep0-ba2"], ["ba2"]) and os.readlink(out / LATEST) == "ep0-ba2"


def test_progress_lines_carry_peak_memory_and_no_mfu_on_cpu(diverged_runs):
    progress = [m for m in diverged_runs[0] if m["kind"] == "progress"]
    assert progress and all(m["peak_memory_mb"] > 10 and m["mfu"] is None for m in progress)
