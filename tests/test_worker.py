"""The training worker's parts, in process and without DeepSpeed: spec, schedule, rows, checkpoints, protocol."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import InvalidInputError
from tasks.training import protocol
from tasks.training.checkpoints import (
    LATEST,
    check_same_architecture,
    checkpoint_tag,
    latest_tag,
    point_latest,
    prune,
)
from tasks.training.data import IGNORE, PackedRows, eval_batches, step_batches
from tasks.training.schedule import learning_rate_at, plan_duration
from tasks.training.spec import TrainSpec
from tasks.training.worker import EvalWatch


def write_rows(folder: Path, rows: int = 8, context_length: int = 32, seed: int = 0, repeated: bool = False) -> Path:
    """A prepared dataset: two packed documents per row, an uneven prompt (no loss) at the start of each."""
    rng = np.random.default_rng(seed)
    input_ids = np.zeros((rows, context_length), np.int32)
    labels = np.full((rows, context_length), IGNORE, np.int32)
    position_ids = np.zeros((rows, context_length), np.int32)
    same = rng.integers(3, 500, size=context_length)
    for r in range(rows):
        tokens = same if repeated else rng.integers(3, 500, size=context_length)
        cut = context_length // 2 - 4 + r % 5  # where the second document starts
        input_ids[r] = tokens
        position_ids[r, :cut] = np.arange(cut)
        position_ids[r, cut:] = np.arange(context_length - cut)
        labels[r, 3 + r % 3 : cut] = tokens[3 + r % 3 : cut]
        labels[r, cut + 2 + r % 4 :] = tokens[cut + 2 + r % 4 :]
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids)):
        np.save(folder / f"{name}.npy", array)
    (folder / "meta.json").write_text(json.dumps({"rows": rows, "context_length": context_length}))
    return folder


def spec_for(tmp_path: Path, **overrides) -> TrainSpec:
    values = dict(run_name="r", model_dir=tmp_path / "m", data_dir=tmp_path / "d", output_dir=tmp_path / "o")
    return TrainSpec(**{**values, **overrides})


# --- TrainSpec -------------------------------------------------------------------------------------


def test_spec_round_trips_through_json(tmp_path):
    spec = spec_for(tmp_path, duration_value=3, duration_unit="ba", eval_prompts=["hi"], init_from=str(tmp_path / "c"))
    spec.to_json(tmp_path / "spec.json")
    again = TrainSpec.from_json(tmp_path / "spec.json")
    assert again == spec
    assert isinstance(again.model_dir, Path) and again.init_from == tmp_path / "c" and again.eval_data_dir is None
    assert again.betas == (0.9, 0.95) and again.final_lr == pytest.approx(5e-6)  # min_lr None: a tenth of the peak

    knobs = dict(schedule="linear", min_lr=0.0, constant_steps=5, weight_decay=0.1, betas=[0.8, 0.99], eps=1e-6,
                 attention_dropout=0.1, eval_data_dir=tmp_path / "e", eval_every_n_batches=10,
                 save_top_k=2, early_stopping_patience=3, early_stopping_min_delta=0.01,
                 peft="lora", lora_rank=8, lora_alpha=64, lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj"],
                 loraplus_lr_ratio=16)
    spec = spec_for(tmp_path, **knobs)
    spec.to_json(tmp_path / "spec.json")
    again = TrainSpec.from_json(tmp_path / "spec.json")
    assert again == spec and again.betas == (0.8, 0.99) and isinstance(again.betas, tuple)  # JSON has a list
    assert again.final_lr == 0.0
    assert spec_for(tmp_path).peft is None  # LoRA is opt-in: by default every weight trains


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(duration_unit="epochs"), "duration_unit must be one of ep, ba, tok"),
        (dict(duration_value=0), "duration_value must be an integer >= 1"),
        (dict(duration_value=1.5), "duration_value must be an integer"),
        (dict(global_batch_size=10, micro_batch_size=4), "multiple of micro_batch_size"),
        (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
        (dict(learning_rate=0), "learning_rate must be a number in (0, 1)"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(gradient_clip=-1), "gradient_clip must be >= 0"),
        (dict(save_every_n_batches=0), "save_every_n_batches must be an integer >= 1"),
        (dict(micro_batch_size=True), "micro_batch_size must be an integer"),
        (dict(eval_prompts="hi"), "eval_prompts must be a list"),
        (dict(run_name=""), "run_name"),
        (dict(resume="yes"), "resume must be true or false"),
        (dict(schedule="step"), "schedule must be one of cosine, linear, constant, got 'step'"),
        (dict(min_lr=5e-5), "min_lr must be a number >= 0 and below learning_rate (5e-05)"),
        (dict(min_lr=-1e-6), "min_lr must be a number >= 0"),
        (dict(min_lr="0"), "min_lr must be a number"),
        (dict(constant_steps=-1), "constant_steps must be an integer >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
        (dict(betas=(0.9, 1.0)), "betas must be two numbers in [0, 1)"),
        (dict(betas=[0.9]), "betas must be two numbers in [0, 1)"),
        (dict(betas=0.9), "betas must be two numbers in [0, 1)"),
        (dict(eps=0), "eps must be a number > 0"),
        (dict(attention_dropout=1.0), "attention_dropout must be a number in [0, 1)"),
        (dict(attention_dropout=-0.1), "attention_dropout must be a number in [0, 1)"),
        (dict(eval_every_n_batches=0, eval_data_dir="e"), "eval_every_n_batches must be an integer >= 1"),
        (dict(eval_every_n_batches=5), "eval_every_n_batches (5) needs eval_data_dir"),
        (dict(save_top_k=0), "save_top_k must be an integer >= 1, got 0"),
        (dict(save_top_k=1.0), "save_top_k must be an integer >= 1"),
        (dict(early_stopping_patience=0, eval_data_dir="e"), "early_stopping_patience must be an integer >= 1"),
        (dict(early_stopping_patience=3), "early_stopping_patience (3) needs eval_data_dir"),
        (dict(early_stopping_min_delta=-0.1), "early_stopping_min_delta must be a number >= 0"),
        (dict(early_stopping_min_delta="0"), "early_stopping_min_delta must be a number >= 0"),
        (dict(peft="qlora"), "peft must be one of lora, or null to train every weight; got 'qlora'"),
        (dict(peft="lora", lora_rank=0), "lora_rank must be an integer from 1 to 256, got 0"),
        (dict(lora_rank=257), "lora_rank must be an integer from 1 to 256, got 257"),
        (dict(lora_rank=8.0), "lora_rank must be an integer from 1 to 256"),
        (dict(lora_alpha=0), "lora_alpha must be an integer >= 1, got 0"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in [0, 1)"),
        (dict(lora_dropout=-0.1), "lora_dropout must be a number in [0, 1)"),
        (dict(lora_target_modules=[]), "lora_target_modules must be a non-empty list of module names"),
        (dict(lora_target_modules=["q_proj", ""]), "lora_target_modules must be a non-empty list"),
        (dict(lora_target_modules=" "), "lora_target_modules must be"),
        (dict(loraplus_lr_ratio=0.5), "loraplus_lr_ratio must be a number >= 1 (1: plain LoRA"),
        (dict(loraplus_lr_ratio=float("inf")), "loraplus_lr_ratio must be a number >= 1"),
        (dict(hidden_dropout=1.0), "hidden_dropout must be a number in [0, 1)"),
        (dict(ffn_dropout=-0.1), "ffn_dropout must be a number in [0, 1)"),
        (dict(offload_optimizer=True), "offload_optimizer needs zero_stage 1, 2 or 3"),
        (dict(offload_optimizer="yes", zero_stage=2), "offload_optimizer must be true or false"),
        (dict(processes=0), "processes must be an integer >= 1, got 0"),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(tmp_path, overrides, words):
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        spec_for(tmp_path, **overrides)


def test_spec_from_json_names_unknown_and_missing_fields(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"run_name": "r", "model_dir": "m", "data_dir": "d", "output_dir": "o", "lr": 1}))
    with pytest.raises(InvalidInputError, match="unknown field.*lr"):
        TrainSpec.from_json(path)
    path.write_text(json.dumps({"run_name": "r"}))
    with pytest.raises(InvalidInputError, match="incomplete"):
        TrainSpec.from_json(path)


# --- schedule --------------------------------------------------------------------------------------


def test_plan_turns_durations_into_steps():
    # 10 rows, global batch 4: 2 steps per epoch (the last 2 rows of each shuffle are dropped); 4 x 16 tokens a step.
    assert plan_duration(3, "ep", 10, 16, 4) == plan_duration(6, "ba", 10, 16, 4)
    plan = plan_duration(5, "ba", 10, 16, 4)
    assert (plan.epochs, plan.batches_per_epoch, plan.total_batches, plan.total_tokens) == (3, 2, 5, 320)
    assert plan_duration(129, "tok", 10, 16, 4).total_batches == 3  # whole steps, at least that many tokens
    with pytest.raises(InvalidInputError, match="fewer than global_batch_size"):
        plan_duration(1, "ep", 3, 16, 4)


# Warmup 4, held 10 steps, then 100 steps of decay (steps 14..113) from 1.0 towards 0.2.
SCHEDULE_STEPS = dict(first=0, warmup_end=3, constant_end=13, decay_start=14, quarter=39, middle=64, last=113)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", dict(quarter=0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), middle=0.6,
                        last=0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.99)))),
        ("linear", dict(quarter=0.2 + 0.8 * 0.75, middle=0.6, last=0.2 + 0.8 * 0.01)),
        ("constant", dict(quarter=1.0, middle=1.0, last=1.0)),
    ],
)
def test_learning_rate_warms_up_holds_then_decays_to_min_lr(schedule, expected):
    def lr(step, **changes):
        args = dict(peak_lr=1.0, warmup_steps=4, total_steps=114, schedule=schedule, min_lr=0.2, constant_steps=10)
        return learning_rate_at(step, **{**args, **changes})

    expected = dict(first=0.25, warmup_end=1.0, constant_end=1.0, decay_start=1.0, **expected)
    assert {key: lr(step) for key, step in SCHEDULE_STEPS.items()} == pytest.approx(expected)
    lrs = [lr(step) for step in range(114)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup: the first step already learns
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never back up after the peak
    assert lr(500) == (1.0 if schedule == "constant" else 0.2)  # past the end: stays at the floor
    assert lr(0, warmup_steps=0, constant_steps=0) == 1.0  # no warmup
    assert lr(50, constant_steps=200) == 1.0  # held longer than the run: never decays


# --- rows and batches ------------------------------------------------------------------------------


def test_packed_rows_name_what_is_missing_or_wrong(tmp_path):
    folder = write_rows(tmp_path / "d")
    (folder / "labels.npy").unlink()
    with pytest.raises(InvalidInputError, match=r"data_dir .* has no labels\.npy"):
        PackedRows(folder, "data_dir")
    np.save(folder / "labels.npy", np.zeros((8, 32), np.int64))
    with pytest.raises(InvalidInputError, match=r"labels\.npy must be int32"):
        PackedRows(folder, "data_dir")
    with pytest.raises(InvalidInputError, match="eval_data_dir .* does not exist"):
        PackedRows(tmp_path / "nowhere", "eval_data_dir")


def test_targets_shift_labels_and_never_cross_a_document_boundary(tmp_path):
    data = PackedRows(write_rows(tmp_path / "d"), "data_dir")
    targets = data.targets(np.array([0]))[0]
    labels, positions = data.labels[0], data.position_ids[0]
    cut = int(np.flatnonzero(positions == 0)[1])
    assert (targets[:-1][positions[1:] != 0] == labels[1:][positions[1:] != 0]).all()
    assert targets[cut - 1] == IGNORE and targets[-1] == IGNORE  # nothing predicts the next document's start


def test_batches_shard_the_global_batch_over_ranks_and_resume_mid_epoch(tmp_path):
    data = PackedRows(write_rows(tmp_path / "d", rows=10), "data_dir")
    common = dict(seed=3, total_steps=6, batches_per_epoch=2, global_batch_size=4, micro_batch_size=1)
    alone = list(step_batches(data, start_step=0, rank=0, world_size=1, **common))
    assert len(alone) == 6 and all(len(b.micro_batches) == 4 for b in alone)
    ranks = [list(step_batches(data, start_step=0, rank=r, world_size=2, **common)) for r in (0, 1)]
    for step, batch in enumerate(alone):
        rows = lambda b: {tuple(mb.input_ids[0].tolist()) for mb in b.micro_batches}  # noqa: E731
        assert rows(ranks[0][step]) | rows(ranks[1][step]) == rows(batch)  # together: the same rows, once each
        assert ranks[0][step].loss_tokens == ranks[1][step].loss_tokens == batch.loss_tokens
        assert batch.loss_tokens == sum(int((mb.targets != IGNORE).sum()) for mb in batch.micro_batches)
    epoch_rows = [
        sorted(tuple(mb.input_ids[0].tolist()) for b in alone[e * 2 : e * 2 + 2] for mb in b.micro_batches)
        for e in range(3)
    ]
    assert epoch_rows[0] != epoch_rows[1]  # a fresh shuffle each epoch
    resumed = list(step_batches(data, start_step=3, rank=0, world_size=1, **common))
    for a, b in zip(alone[3:], resumed, strict=True):
        assert all((x.input_ids == y.input_ids).all() for x, y in zip(a.micro_batches, b.micro_batches))


def test_eval_batches_give_every_rank_the_same_number_of_forwards(tmp_path):
    data = PackedRows(write_rows(tmp_path / "d", rows=5), "data_dir")
    per_rank = [list(eval_batches(data, 2, rank, 2)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    rows = sum(len(mb.input_ids) for mbs in per_rank for mb in mbs if (mb.targets != IGNORE).any())
    assert rows == 5


# --- checkpoints and protocol ----------------------------------------------------------------------


def test_latest_link_is_relative_and_replaced(tmp_path):
    assert latest_tag(tmp_path) is None
    for step in (4, 8):
        (tmp_path / checkpoint_tag(step, 4)).mkdir()
        point_latest(tmp_path, checkpoint_tag(step, 4))
    assert (tmp_path / LATEST).is_symlink() and str((tmp_path / LATEST).readlink()) == "ep2-ba8"
    assert latest_tag(tmp_path) == "ep2-ba8" and checkpoint_tag(6, 4) == "ep1-ba6"
    (tmp_path / "ep2-ba8").rmdir()
    with pytest.raises(InvalidInputError, match="does not exist"):
        latest_tag(tmp_path)


def test_prune_keeps_the_newest_k_up_to_the_latest_link(tmp_path):
    hf = tmp_path / "huggingface"
    for step in (2, 3, 4, 8):  # ba8: left by a run that died saving it, before the link moved
        (tmp_path / checkpoint_tag(step, 4)).mkdir()
        (tmp_path / checkpoint_tag(step, 4) / "mp_rank_00_model_states.pt").write_text("x")
        (hf / f"ba{step}").mkdir(parents=True)
    (hf / ".ba5.partial").mkdir()  # an export being written: not prune's
    (tmp_path / ".ep0-ba1.deleting").mkdir()  # a removal cut short
    assert prune(tmp_path, keep=1) == []  # no link yet: nothing is known complete
    point_latest(tmp_path, "ep1-ba4")

    assert prune(tmp_path, keep=2) == [tmp_path / "ep0-ba2", hf / "ba2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba3", "ep1-ba4", "ep2-ba8", "huggingface", LATEST]
    assert sorted(p.name for p in hf.iterdir()) == [".ba5.partial", "ba3", "ba4", "ba8"]
    assert prune(tmp_path, keep=2) == []
    assert prune(tmp_path, keep=1) == [tmp_path / "ep0-ba3", hf / "ba3"]
    assert latest_tag(tmp_path) == "ep1-ba4" and (tmp_path / "ep1-ba4/mp_rank_00_model_states.pt").is_file()


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


def test_weights_of_another_architecture_are_refused_by_name(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = dict(model.state_dict())
    check_same_architecture(weights, model, Path("ck"), tiny_model_dir)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:, :32]
    del weights["model.norm.weight"]
    with pytest.raises(InvalidInputError, match=r"another architecture.*embed_tokens.weight is \[49152, 32\] there"):
        check_same_architecture(weights, model, Path("ck"), tiny_model_dir)


def test_protocol_lines_parse_back(capsys):
    protocol.emit("progress", batch=3, loss=math.pi)
    line = capsys.readouterr().out
    assert line.startswith("@@tessera ") and line.count("\n") == 1
    assert protocol.parse(line) == {"kind": "progress", "batch": 3, "loss": math.pi}
    assert protocol.parse("DeepSpeed says hello") is None
