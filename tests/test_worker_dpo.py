"""DPO (task_type DPO) in the worker, as the train task runs it, on the tiny model and an easy set of pairs (the
chosen answer is always "Yes.", the rejected one a longer "No, ..."): rows prepared by the data step, 16 pairs to
train on and 4 to evaluate, one pair a row at context 32 (rows of 64).

Runs, started a few at a time so their start-ups overlap: full rank on ZeRO 0 with eval data; the same killed
after its step-3 checkpoint and resumed; full rank on ZeRO 3 (the model's own logits instead of the chunked head)
with early stopping; LoRA on ZeRO 2; an SFT run, then DPO from its checkpoint (init_from, as custom_weights_path
gives it); a run whose reference makes one step's loss spike. And the loss itself, in process.
"""

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import DpoCfg
from tasks.data.prepare import prepare_dataset
from tasks.training.checkpoints import LATEST
from tasks.training.data import epoch_order
from tasks.training.preference import REFERENCE_DIR, dpo_loss
from tasks.training.protocol import DIVERGED_EXIT
from tasks.training.rows import IGNORE, PackedRows
from test_worker import make_spec, write_rows
from test_worker_runs import Worker, losses

SETTINGS = {"micro_batch_size": 2, "global_batch_size": 4, "model.optim.sched.warmup_steps": 1}
REWARDS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


def pair(i: int) -> dict:
    return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Is {i} a number?"}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": f"No, never {i}."}]}


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TESSERA_CACHE", str(folder / "cache"))
        prepared = {}
        for split, numbers in (("train", range(16)), ("eval", range(16, 20))):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in numbers))
            prepared[split] = prepare_dataset(str(folder / f"{split}.jsonl"), tiny_model_dir, "DPO", 32).path
    return SimpleNamespace(folder=folder, train=prepared["train"], eval=prepared["eval"])


def dpo_spec(name: str, tiny_model_dir: Path, pairs, eval_data: bool = False, settings: dict | None = None,
             **runtime):
    return make_spec(name, tiny_model_dir, pairs.train, pairs.folder / name, task_type="DPO", duration="2ep",
                     eval_data_dir=pairs.eval if eval_data else None, settings={**SETTINGS, **(settings or {})},
                     **runtime)


def reference(spec, split: str = "train") -> np.ndarray:
    return np.load(spec.output_dir / REFERENCE_DIR / f"{split}.npy")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs):
    full = dpo_spec("full", tiny_model_dir, pairs, eval_data=True)
    killed = dpo_spec("killed", tiny_model_dir, pairs, settings={"save_steps": 3})
    zero3 = dpo_spec("zero3", tiny_model_dir, pairs, eval_data=True, settings={
        "deepspeed.zero_stage": 3, "trainer.val_check_interval": 2, "early_stopping.patience": 1,
        "early_stopping.min_delta": 1.0})  # the eval at step 4 cannot beat step 2's by a whole nat: it stops there
    simpo = dpo_spec("simpo", tiny_model_dir, pairs, settings={"model.dpo_cfg.loss_type": "simpo",
                                                               "model.dpo_cfg.beta": 2.0})
    workers = [Worker(spec, pairs.folder, spec.run_name) for spec in (full, killed, zero3, simpo)]
    workers[1].kill_when(lambda m: m["kind"] == "progress" and m["batch"] == 4)
    before = workers[1].finish(returncode=-signal.SIGKILL)
    latest_at_kill = os.readlink(killed.output_dir / LATEST)
    resumed = Worker(killed, pairs.folder, "resumed")
    return SimpleNamespace(full=full, full_lines=workers[0].finish(), killed=killed, before=before,
                           latest_at_kill=latest_at_kill, after=resumed.finish(),
                           resumed_log=resumed.stdout.read_text(), zero3=zero3, zero3_lines=workers[2].finish(),
                           simpo=simpo, simpo_lines=workers[3].finish(), simpo_log=workers[3].stdout.read_text())


def test_a_full_rank_dpo_run_starts_at_log_2_and_learns_the_preference(runs):
    progress = [m for m in runs.full_lines if m["kind"] == "progress"]
    assert [m["batch"] for m in progress] == list(range(1, 9))
    # The policy is the reference at step 1: every log-ratio is 0, the loss log 2 and no pair is won yet.
    assert progress[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [progress[0][k] for k in REWARDS] == pytest.approx([0, 0, 0, 0], abs=1e-6)
    for m in progress:
        assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"])
    margins, accuracy = [m["reward_margin"] for m in progress], [m["reward_accuracy"] for m in progress]
    assert all(a < b for a, b in zip(margins, margins[1:])) or margins[-1] > margins[0] + 0.3, margins
    assert accuracy[-1] == 1.0 and progress[-1]["loss"] < 0.55
    evals = [m for m in runs.full_lines if m["kind"] == "eval"]
    assert [(m["batch"], m["pairs"]) for m in evals] == [(4, 4), (8, 4)]  # the held-out pairs, at each checkpoint
    assert evals[1]["loss"] < evals[0]["loss"] < math.log(2) and evals[1]["reward_accuracy"] == 1.0
    assert evals[1]["reward_margin"] > evals[0]["reward_margin"] > 0
    assert runs.full_lines[-1]["kind"] == "finished"
    assert reference(runs.full).shape == (16, 2) and reference(runs.full, "eval").shape == (4, 2)


def test_a_simpo_run_computes_no_reference_and_learns_the_preference(runs):
    assert not (runs.simpo.output_dir / REFERENCE_DIR).exists()
    assert "DPO (simpo, beta 2)" in runs.simpo_log and "reference log-probabilities" not in runs.simpo_log
    progress = [m for m in runs.simpo_lines if m["kind"] == "progress"]
    assert progress[-1]["loss"] < progress[0]["loss"] and progress[-1]["reward_accuracy"] == 1.0
    assert runs.simpo_lines[-1]["kind"] == "finished"


def test_the_reference_is_each_sides_answer_log_probability_alone(runs, tiny_model_dir):
    """One row holds a pair's two sides with per-document attention: the reference pass gives what each side alone
    gives the starting model, summed over its answer tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert reference(runs.full)[:3] == pytest.approx(side_logps_alone(model, runs.full.data_dir, range(3)),
                                                     rel=1e-4)


def side_logps_alone(model, data_dir: Path, pair_numbers) -> np.ndarray:
    """Each pair's chosen and rejected answers' summed log-probabilities, each side run through `model` by itself."""
    rows = PackedRows(data_dir, "data_dir")
    found = np.zeros((len(pair_numbers), 2))
    for i, number in enumerate(pair_numbers):
        for side in (0, 1):
            row, at = np.argwhere(rows.sequence_ids == 2 * number + side).T
            ids, labels = (torch.from_numpy(a[row[0], at].astype(np.int64))[None] for a in (rows.input_ids,
                                                                                              rows.labels))
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[0, 1:]
            kept = targets != IGNORE
            found[i, side] = logits[kept].log_softmax(-1).gather(1, targets[kept, None]).sum().item()
    return found


def test_a_killed_dpo_run_resumes_with_its_reference_and_matches_the_uninterrupted_one(runs):
    saved = [m["tag"] for m in runs.before if m["kind"] == "checkpoint"]
    assert saved == ["ep0-ba3"] and runs.latest_at_kill == "ep0-ba3"
    assert runs.after[0]["resumed_from"] == "ep0-ba3"
    assert "reference log-probabilities of 16 pairs read back" in runs.resumed_log  # not computed again
    assert reference(runs.killed) == pytest.approx(reference(runs.full), rel=1e-6)
    expected = losses(runs.full_lines)
    assert list(losses(runs.after)) == list(range(4, 9))
    for batch, loss in {**losses(runs.before), **losses(runs.after)}.items():
        assert loss == pytest.approx(expected[batch], rel=1e-5), batch
    final = [m for m in runs.after if m["kind"] == "progress"][-1]
    assert final["reward_accuracy"] == next(m for m in runs.full_lines if m.get("batch") == 8
                                            and m["kind"] == "progress")["reward_accuracy"]


def test_zero_3_takes_the_models_own_logits_and_early_stopping_ends_the_dpo_run(runs):
    lines = runs.zero3_lines
    # The same losses as ZeRO 0's chunked head, to float rounding, up to where early stopping ends it.
    expected = losses(runs.full_lines)
    assert list(losses(lines)) == [1, 2, 3, 4]
    for batch, loss in losses(lines).items():
        assert loss == pytest.approx(expected[batch], rel=1e-5), batch
    assert [m["batch"] for m in lines if m["kind"] == "eval"] == [2, 4]
    (stopped,) = [m for m in lines if m["kind"] == "stopped"]
    assert stopped["batch"] == 4 and stopped["best_batch"] == 2 and "did not improve by more than 1" in \
        stopped["reason"]
    assert os.readlink(runs.zero3.output_dir / LATEST) == "ep1-ba4"


@pytest.fixture(scope="module")
def lora_and_sft(tiny_model_dir, pairs):
    """A LoRA DPO run on ZeRO 2, beside an SFT run (rows of the pairs' length) and then DPO from its checkpoint."""
    lora = dpo_spec("lora", tiny_model_dir, pairs, eval_data=True, learning_rate=1e-3, settings={
        "deepspeed.zero_stage": 2, "model.peft.peft_scheme": "lora", "model.peft.lora_tuning.rank": 8})
    sft = make_spec("sft", tiny_model_dir, write_rows(pairs.folder / "sft-rows", rows=8, context_length=64),
                    pairs.folder / "sft", duration="4ba", settings=SETTINGS)
    workers = [Worker(spec, pairs.folder, spec.run_name) for spec in (lora, sft)]
    sft_lines = workers[1].finish()
    after_sft = dpo_spec("after-sft", tiny_model_dir, pairs, init_from=sft.output_dir / LATEST)
    return SimpleNamespace(lora=lora, lines=workers[0].finish(), sft=sft, sft_lines=sft_lines, after_sft=after_sft,
                           after_sft_lines=Worker(after_sft, pairs.folder, "after-sft").finish())


def test_a_lora_dpo_run_measures_against_the_base_with_its_adapters_off(lora_and_sft, runs):
    lines = lora_and_sft.lines
    assert lines[0]["trainable_params"] < lines[0]["total_params"] // 10
    progress = [m for m in lines if m["kind"] == "progress"]
    assert progress[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert progress[-1]["reward_margin"] > progress[0]["reward_margin"] + 0.1
    assert progress[-1]["reward_accuracy"] == 1.0 and progress[-1]["loss"] < progress[0]["loss"] - 0.05
    evals = [m for m in lines if m["kind"] == "eval"]
    assert evals[-1]["reward_accuracy"] == 1.0 and evals[-1]["loss"] < evals[0]["loss"]
    # The adapters off, the model is the base: the reference is the full-rank run's.
    assert reference(lora_and_sft.lora) == pytest.approx(reference(runs.full), rel=1e-5)
    assert (lora_and_sft.lora.output_dir / "huggingface/ba8/adapter").is_dir()


def test_dpo_after_sft_starts_from_the_sft_checkpoint_and_measures_against_it(lora_and_sft, runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    lines, spec = lora_and_sft.after_sft_lines, lora_and_sft.after_sft
    assert lora_and_sft.sft_lines[-1]["kind"] == "finished"
    # Its reference is the SFT model's, not the base's; and training starts there (loss log 2 at step 1).
    sft_model = AutoModelForCausalLM.from_pretrained(lora_and_sft.sft.output_dir / "huggingface/ba4")
    assert reference(spec)[:3] == pytest.approx(side_logps_alone(sft_model, spec.data_dir, range(3)), rel=1e-4)
    assert not np.allclose(reference(spec), reference(runs.full), rtol=1e-3)
    progress = [m for m in lines if m["kind"] == "progress"]
    assert progress[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert progress[-1]["reward_accuracy"] == 1.0 and progress[-1]["reward_margin"] > 0.1
    assert lines[-1]["kind"] == "finished"


def test_a_spiking_dpo_loss_stops_the_run(tiny_model_dir, pairs):
    """The divergence guard on DPO's loss: a reference of zeros, but for the pairs of step 6 a chosen answer 100 nats
    likelier than any policy will make it, so their loss is several nats above the mean of the ones before."""
    spec = make_spec("spike", tiny_model_dir, pairs.train, pairs.folder / "spike", task_type="DPO", duration="1ep",
                     settings={**SETTINGS, "global_batch_size": 2}, loss_spike_factor=2.0)  # 8 steps, each pair once
    rows = PackedRows(spec.data_dir, "data_dir")
    ids = rows.sequence_ids[epoch_order(rows.rows, spec.config.training_config.seed, 0)[10:12]]  # step 6's rows
    kept = np.zeros((16, 2), np.float32)
    kept[np.unique(ids[ids >= 0] // 2), 0] = 100.0
    (spec.output_dir / REFERENCE_DIR).mkdir(parents=True)
    np.save(spec.output_dir / REFERENCE_DIR / "train.npy", kept)  # read as a resumed run reads its own
    lines = Worker(spec, pairs.folder, "spike").finish(returncode=DIVERGED_EXIT)
    (diverged,) = [m for m in lines if m["kind"] == "diverged"]
    assert diverged["batch"] == 6 and "over 2x the mean of the last 5 logged losses" in diverged["reason"]
    assert diverged["loss"] > 3 and all(m["loss"] < 1 for m in lines if m["kind"] == "progress" and m["batch"] < 6)


def test_the_dpo_loss_variants():
    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    ref = torch.tensor([[-4.0, -4.0], [-4.0, -4.0]])
    tokens = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    h = torch.tensor([2.0, -2.0])  # (chosen - its reference) - (rejected - its reference)
    losses, rewards = dpo_loss(policy, ref, tokens, DpoCfg(beta=0.1))
    torch.testing.assert_close(losses, -F.logsigmoid(0.1 * h))
    torch.testing.assert_close(rewards, 0.1 * (policy - ref))
    smoothed, _ = dpo_loss(policy, ref, tokens, DpoCfg(beta=0.1, label_smoothing=0.2))
    torch.testing.assert_close(smoothed, -0.8 * F.logsigmoid(0.1 * h) - 0.2 * F.logsigmoid(-0.1 * h))
    ipo, _ = dpo_loss(policy, ref, tokens, DpoCfg(beta=0.1, loss_type="ipo"))
    averaged = (policy - ref) / tokens  # IPO compares log-probabilities averaged over each answer's tokens
    torch.testing.assert_close(ipo, (averaged[:, 0] - averaged[:, 1] - 1 / 0.2) ** 2)
    rpo, rpo_rewards = dpo_loss(policy, ref, tokens, DpoCfg(beta=0.1, rpo_alpha=0.5))
    # plus the chosen answers' mean token NLL: 3 nats over 2 tokens, 4 nats over 1
    torch.testing.assert_close(rpo, -F.logsigmoid(0.1 * h) + 0.5 * torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(rpo_rewards, rewards)
    simpo, simpo_rewards = dpo_loss(policy, None, tokens, DpoCfg(beta=2.0, loss_type="simpo", simpo_gamma=0.5))
    per_token = policy / tokens  # SimPO: each side's own averaged log-probability, no reference at all
    torch.testing.assert_close(simpo, -F.logsigmoid(2.0 * (per_token[:, 0] - per_token[:, 1]) - 0.5))
    torch.testing.assert_close(simpo_rewards, 2.0 * per_token)
