"""The training worker's parts, in process and without DeepSpeed: spec, schedule, rows, checkpoints, protocol."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.config import Duration
from tasks.errors import InvalidInputError
from tasks.recipe import configure
from tasks.training import protocol
from tasks.training.checkpoint_names import LATEST, latest_tag
from tasks.training.checkpoints import check_same_architecture, checkpoint_tag, point_latest, prune
from tasks.training.data import eval_batches, step_batches
from tasks.training.rows import IGNORE, PackedRows
from tasks.training.schedule import learning_rate_at, plan_duration
from tasks.training.spec import TrainSpec


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


def make_spec(run_name: str, model_dir: Path, data_dir: Path, output_dir: Path, *, eval_data_dir: Path | None = None,
              duration: str = "1ep", learning_rate: float = 1e-3, eval_prompts: list[str] | None = None,
              settings: dict | None = None, task_type: str | None = None, **runtime) -> TrainSpec:
    """A TrainSpec as the train task builds one: the config from the anchor's arguments and `settings` (paths
    under training_config), at the rows' context length; `runtime` sets the spec's own fields."""
    context_length = json.loads((data_dir / "meta.json").read_text())["context_length"]
    config = configure(
        shorthands=dict(model=str(model_dir), train_data_path=str(data_dir), register_to="main.test",
                        eval_data_path=str(eval_data_dir) if eval_data_dir else None, training_duration=duration,
                        learning_rate=learning_rate, eval_prompts=eval_prompts, context_length=context_length,
                        task_type=task_type),
        overrides={f"training_config.{path}": value for path, value in (settings or {}).items()},
    )
    return TrainSpec.build(run_name, config, model_dir, data_dir, output_dir, eval_data_dir=eval_data_dir, **runtime)


# --- TrainSpec -------------------------------------------------------------------------------------


def test_spec_is_the_config_and_what_the_run_resolved(tmp_path):
    data = write_rows(tmp_path / "d", rows=10, context_length=16)
    spec = make_spec("r", tmp_path / "m", data, tmp_path / "o", duration="3ep", eval_prompts=["hi"],
                     settings={"global_batch_size": 4, "micro_batch_size": 2}, init_from=tmp_path / "c")
    # 10 rows, global batch 4: 2 steps an epoch; no warmup given: 10% of the run, at least 1 step.
    assert (spec.plan.total_batches, spec.plan.batches_per_epoch, spec.plan.tokens_per_batch) == (6, 2, 64)
    assert (spec.warmup_steps, spec.processes, spec.resume, spec.loss_spike_factor) == (1, 1, True, 10.0)
    assert make_spec("r", tmp_path / "m", data, tmp_path / "o", duration="200ba",
                     settings={"model.optim.sched.warmup_steps": 5}).warmup_steps == 5
    assert make_spec("r", tmp_path / "m", data, tmp_path / "o", duration="400ba").warmup_steps == 20  # at most 20
    spec.save(tmp_path / "spec.json")
    again = TrainSpec.load(tmp_path / "spec.json")
    assert again == spec and again.config == spec.config and isinstance(again.model_dir, Path)
    assert again.config.run.eval_prompts == ["hi"] and again.init_from == tmp_path / "c"


@pytest.mark.parametrize("runtime, words", [
    (dict(loss_spike_factor=0.5), "loss_spike_factor"),
    (dict(loss_spike_factor=math.nan), "loss_spike_factor"),
    (dict(peak_flops=0), "peak_flops"),
    (dict(peak_flops=math.inf), "peak_flops"),
    (dict(processes=0), "processes"),
    (dict(run_name="two\nlines"), "run_name"),
])
def test_spec_refuses_bad_run_time_values(tmp_path, runtime, words):
    with pytest.raises(ValidationError, match=words):
        make_spec(runtime.pop("run_name", "r"), tmp_path / "m", write_rows(tmp_path / "d"), tmp_path / "o", **runtime)


def test_spec_load_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "spec.json"
    make_spec("r", tmp_path / "m", write_rows(tmp_path / "d"), tmp_path / "o").save(path)
    path.write_text(path.read_text().replace('"resume": true', '"resume": true, "lr": 1'))
    with pytest.raises(InvalidInputError, match=r"(?s)cannot read the training spec .*spec.json.*lr"):
        TrainSpec.load(path)
    with pytest.raises(InvalidInputError, match="cannot read the training spec"):
        TrainSpec.load(tmp_path / "missing.json")


# --- schedule --------------------------------------------------------------------------------------


def test_plan_turns_durations_into_steps():
    # 10 rows, global batch 4: 2 steps per epoch (the last 2 rows of each shuffle are dropped); 4 x 16 tokens a step.
    assert plan_duration(Duration(3, "ep"), 10, 16, 4) == plan_duration(Duration(6, "ba"), 10, 16, 4)
    plan = plan_duration(Duration(5, "ba"), 10, 16, 4)
    assert (plan.epochs, plan.batches_per_epoch, plan.total_batches, plan.total_tokens) == (3, 2, 5, 320)
    assert plan_duration(Duration(129, "tok"), 10, 16, 4).total_batches == 3  # whole steps, at least that many tokens
    with pytest.raises(InvalidInputError, match="fewer than global_batch_size"):
        plan_duration(Duration(1, "ep"), 3, 16, 4)


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


def test_a_worker_process_never_loads_mlflow():
    """DeepSpeed imports MLflow when it can (2.5 s of CPU at each rank's start); the worker never logs to it."""
    started = subprocess.run([sys.executable, "-X", "importtime", "-m", "tasks.training.worker", "--help"],
                             capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=120)
    assert started.returncode == 0 and "usage: python -m tasks.training.worker" in started.stdout, started.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in started.stderr.splitlines() if line.startswith("import time:")}
    assert "deepspeed" in imported and not {m for m in imported if m.startswith("mlflow.")}  # tried, not loaded
