"""The worker as the train task runs it: `python -m tasks.training.worker` in its own process group.

Each worker start costs seconds (torch, transformers, DeepSpeed), so there are few runs and each is
asserted on at length: a full run (protocol, checkpoints, HF export, learning); a run with the same
seed killed mid-way and resumed (same losses, right total); a run with a recipe's optimizer, schedule,
eval and dropout settings; a run that fails on a bad input; runs with save_top_k and early stopping.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.train import worker_command
from tasks.training.checkpoints import LATEST, load_weights
from tasks.training.protocol import parse
from tasks.recipe import configure
from tasks.training.checkpoints import RECIPE
from tasks.training.spec import TrainSpec
from test_worker import make_spec, write_rows

REPO = Path(__file__).resolve().parents[1]
# The tiny model: tied embeddings, 2 x (q, o 64x64; k, v 32x64; gate, up, down 64x128; 2 norms), final norm.
TINY_PARAMS = 49152 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64


class Worker:
    """A worker process in its own session; stdout and stderr go to files, read back while it runs."""

    def __init__(self, spec: TrainSpec, folder: Path, label: str):
        spec.save(folder / f"{label}.json")
        self.stdout, self.stderr = folder / f"{label}.stdout", folder / f"{label}.stderr"
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen(
                worker_command(spec, str(folder / f"{label}.json")),  # the train task's: the launcher for processes > 1
                cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True,
                # Two workers share two cores here: one thread each, or their OpenMP threads spin against each other.
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )

    def messages(self) -> list[dict]:
        lines = self.stdout.read_text().split("\n")[:-1]  # complete lines only
        return [m for m in map(parse, lines) if m is not None]

    def kill_when(self, condition, timeout: float = 300, kill: bool = True) -> None:
        """SIGKILL the worker's process group as soon as a message meets `condition` (with kill=False, just wait)."""
        deadline = time.monotonic() + timeout
        while not any(map(condition, self.messages())):
            assert self.process.poll() is None and time.monotonic() < deadline, self.stderr.read_text()[-3000:]
            time.sleep(0.05)
        if kill:
            os.killpg(self.process.pid, signal.SIGKILL)

    def group_commands(self) -> list[str]:
        """The command lines of every process in the worker's process group (the launcher's and each rank's)."""
        commands = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == self.process.pid:  # field 5: the group
                    commands.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, IndexError, ValueError):  # a process that ended while we looked
                continue
        return commands

    def finish(self, returncode: int = 0) -> list[dict]:
        assert self.process.wait(timeout=300) == returncode, self.stderr.read_text()[-3000:]
        return self.messages()


def losses(lines: list[dict]) -> dict[int, float]:
    return {m["batch"]: m["loss"] for m in lines if m["kind"] == "progress"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two runs of 2 epochs x 4 steps (global batch 4 as 2 micro batches of 2) on 16 copies of one row,
    started together so their start-ups overlap on two cores:
    "full" with eval data and an eval prompt, checkpointing per epoch;
    "killed", the same training checkpointing every 3 steps, SIGKILLed at step 4 and run again.
    """
    folder = tmp_path_factory.mktemp("runs")
    train = write_rows(folder / "train", rows=16, context_length=64, repeated=True)
    settings = {"micro_batch_size": 2, "global_batch_size": 4, "model.optim.sched.warmup_steps": 2}
    full = make_spec(
        "full", tiny_model_dir, train, folder / "full", duration="2ep", eval_prompts=["What is Tessera?"],
        eval_data_dir=write_rows(folder / "eval", rows=3, context_length=64, repeated=True),  # the rows it learns
        settings=settings,
    )
    killed = make_spec("killed", tiny_model_dir, train, folder / "killed", duration="2ep",
                       settings={**settings, "save_steps": 3})
    full_worker, killed_worker = Worker(full, folder, "full"), Worker(killed, folder, "killed")
    killed_worker.kill_when(lambda m: m["kind"] == "progress" and m["batch"] == 4)
    before = killed_worker.finish(returncode=-signal.SIGKILL)
    latest_at_kill = os.readlink(killed.output_dir / LATEST)
    after = Worker(killed, folder, "resumed").finish()
    return SimpleNamespace(full=full, full_lines=full_worker.finish(), killed=killed,
                           before=before, latest_at_kill=latest_at_kill, after=after, settings=settings, folder=folder)


@pytest.fixture(scope="module")
def launched(runs):
    """The "full" run's training on 2 processes through the deepspeed launcher, as ZeRO-3 (weights, gradients and
    optimizer states partitioned) with the optimizer offloaded: 1 micro batch of 2 rows per rank per step instead
    of 2 accumulated on one. The full run has eval data and a prompt, so this one too: ZeRO-3 evaluates, exports
    and generates with the weights spread over the ranks."""
    spec = make_spec("launched", runs.full.model_dir, runs.full.data_dir, runs.folder / "launched", duration="2ep",
                     eval_data_dir=runs.full.eval_data_dir, eval_prompts=runs.full.config.run.eval_prompts,
                     settings={**runs.settings, "deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True},
                     processes=2)
    worker = Worker(spec, runs.folder, "launched")
    worker.kill_when(lambda m: m["kind"] == "started", kill=False)
    commands = worker.group_commands()
    lines = worker.finish()
    return SimpleNamespace(spec=spec, commands=commands, lines=lines, stdout=worker.stdout.read_text())


def test_full_run_reports_checkpoints_exports_and_learns(runs):
    lines, out = runs.full_lines, runs.full.output_dir
    assert lines[0] == {"kind": "started", "epochs": 2, "batches_per_epoch": 4, "total_batches": 8,
                        "total_tokens": 8 * 4 * 64, "resumed_from": None,
                        "trainable_params": TINY_PARAMS, "total_params": TINY_PARAMS}
    assert [m["kind"] for m in lines[1:3]] == ["generations", "progress"] and lines[1]["batch"] == 0

    progress = [m for m in lines if m["kind"] == "progress"]
    assert [m["batch"] for m in progress] == list(range(1, 9))
    assert [m["epoch"] for m in progress] == [1] * 4 + [2] * 4
    assert [m["tokens"] for m in progress] == [b * 4 * 64 for b in range(1, 9)]
    assert all((m["epochs"], m["total_batches"], m["total_tokens"]) == (2, 8, 2048) for m in progress)
    assert [m["lr"] for m in progress[:3]] == pytest.approx([5e-4, 1e-3, 1e-3])  # warmup, then cosine down
    assert progress[-1]["lr"] < progress[3]["lr"] < 1e-3
    assert all(m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["elapsed_s"] > 0 for m in progress)
    learned = [m["loss"] for m in progress]
    assert all(a > b for a, b in zip(learned, learned[1:])) and learned[-1] < learned[0] - 0.5, learned  # it learns

    checkpoints = [m for m in lines if m["kind"] == "checkpoint"]
    assert checkpoints == [
        {"kind": "checkpoint", "tag": f"ep{e}-ba{b}", "path": str(out / f"ep{e}-ba{b}"),
         "hf_path": str(out / f"huggingface/ba{b}")}
        for e, b in ((1, 4), (2, 8))
    ]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [(m["batch"], m["tokens"]) for m in evals] == [(4, evals[0]["tokens"]), (8, evals[0]["tokens"])]
    assert evals[1]["loss"] < evals[0]["loss"]
    generations = [m for m in lines if m["kind"] == "generations"]
    assert [m["batch"] for m in generations] == [0, 4, 8]
    assert all(m["prompts"] == ["What is Tessera?"] and len(m["responses"]) == 1 for m in generations)
    assert lines[-1] == {"kind": "finished", "batch": 8, "hf_path": str(out / "huggingface/ba8")}

    assert os.readlink(out / LATEST) == "ep2-ba8"
    assert (out / "ep2-ba8" / "mp_rank_00_model_states.pt").is_file()
    assert sorted(p.name for p in (out / "huggingface").iterdir()) == ["ba4", "ba8"]
    # Beside every checkpoint and export, the run's config as a recipe that runs it again.
    for folder in (out / "ep1-ba4", out / "ep2-ba8", out / "huggingface/ba4", out / "huggingface/ba8"):
        assert configure(folder / RECIPE) == runs.full.config, folder


def test_hf_export_loads_generates_and_matches_the_checkpoint(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = runs.full.output_dir / "huggingface/ba8"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template
    inputs = tokenizer("Tessera is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5
    saved = load_weights(runs.full.output_dir / LATEST)  # what init_from would load
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_same_seed_gives_the_same_losses(runs):
    # The killed run differs only in checkpoint cadence and has no prompts or eval data: none may change training.
    before, expected = losses(runs.before), losses(runs.full_lines)
    assert len(before) >= 4
    for batch, loss in before.items():
        assert loss == pytest.approx(expected[batch], rel=1e-6), batch


def test_killed_run_resumes_from_its_last_checkpoint_and_completes(runs):
    saved = [m["tag"] for m in runs.before if m["kind"] == "checkpoint"]
    assert saved[0] == "ep0-ba3" and runs.latest_at_kill == saved[-1]  # killed mid-run, after a checkpoint
    assert not any(m["kind"] == "finished" for m in runs.before)
    resumed_at = int(saved[-1].split("-ba")[1])

    after = runs.after
    assert after[0] == {"kind": "started", "epochs": 2, "batches_per_epoch": 4, "total_batches": 8,
                        "total_tokens": 2048, "resumed_from": saved[-1],
                        "trainable_params": TINY_PARAMS, "total_params": TINY_PARAMS}
    assert list(losses(after)) == list(range(resumed_at + 1, 9))
    # The divergence guard's window came back with it: the losses logged up to the checkpoint.
    state = torch.load(runs.killed.output_dir / saved[-1] / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["tessera"]["recent_losses"] == [losses(runs.before)[b] for b in range(1, resumed_at + 1)]
    elapsed_at_checkpoint = next(m["elapsed_s"] for m in runs.before if m.get("batch") == resumed_at)
    assert next(m for m in after if m["kind"] == "progress")["elapsed_s"] > elapsed_at_checkpoint  # carried over
    assert [m["tag"] for m in after if m["kind"] == "checkpoint"][-1] == "ep2-ba8"
    assert after[-1] == {"kind": "finished", "batch": 8, "hf_path": str(runs.killed.output_dir / "huggingface/ba8")}
    assert os.readlink(runs.killed.output_dir / LATEST) == "ep2-ba8"
    # Weights, optimizer state, LR step and data order all came back: the losses are the uninterrupted run's.
    expected = losses(runs.full_lines)
    for batch, loss in losses(after).items():
        assert loss == pytest.approx(expected[batch], rel=1e-6), batch


def test_two_processes_through_the_launcher_train_like_one_with_accumulation(runs, launched):
    lines = launched.lines
    assert "2 process(es) on cpu, ZeRO 3" in launched.stdout and "full-logits loss" in launched.stdout
    assert [m["kind"] for m in lines].count("started") == 1  # rank 0 alone reports
    # Loss and gradient are means over all loss tokens of the global batch, however they are split over ranks
    # and micro batches; the offloaded ZeRO-3 optimizer steps as the plain one does, and the full logits' loss
    # (the chunked one needs the whole LM head on each rank) equals the chunked one of the 1-process run.
    expected = losses(runs.full_lines)
    assert list(losses(lines)) == list(expected)
    for batch, loss in losses(lines).items():
        assert loss == pytest.approx(expected[batch], rel=1e-5), batch
    evals = [m["loss"] for m in lines if m["kind"] == "eval"]
    assert evals == pytest.approx([m["loss"] for m in runs.full_lines if m["kind"] == "eval"], rel=1e-5)
    assert [m["batch"] for m in lines if m["kind"] == "generations"] == [0, 4, 8]
    exported = AutoModelForCausalLM.from_pretrained(launched.spec.output_dir / "huggingface/ba8").state_dict()
    for name, tensor in load_weights(launched.spec.output_dir / LATEST).items():  # the ranks' shards, merged
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    assert [m["tag"] for m in lines if m["kind"] == "checkpoint"] == ["ep1-ba4", "ep2-ba8"]
    assert sorted(p.name for p in (launched.spec.output_dir / "ep2-ba8").glob("*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # ps shows which run every process belongs to: the launcher's, its child's and both ranks'.
    workers = [c for c in launched.commands if "tasks.training.worker" in c]
    assert len(workers) >= 3 and all("--run-name launched" in c for c in workers), launched.commands


def test_recipe_settings_reach_the_optimizer_the_schedule_the_evals_and_the_model(tiny_model_dir, tmp_path):
    # 6 rows, global batch 2: 3 steps an epoch, 6 steps, checkpoints at 3 and 6; eval every 4 steps and at the end.
    spec = make_spec(
        "recipe", tiny_model_dir, write_rows(tmp_path / "train", rows=6), tmp_path / "out", duration="6ba",
        eval_data_dir=write_rows(tmp_path / "eval", rows=2, seed=1), learning_rate=1e-3,
        settings={"trainer.val_check_interval": 4, "micro_batch_size": 1, "global_batch_size": 2,
                  "model.optim.sched.warmup_steps": 2, "model.optim.sched.constant_steps": 1,
                  "model.optim.sched.name": "linear", "model.optim.sched.min_lr": 1e-4, "model.optim.weight_decay": 0.1,
                  "model.optim.betas": [0.8, 0.99], "model.optim.eps": 1e-6, "model.attention_dropout": 0.1},
    )
    lines = Worker(spec, tmp_path, "recipe").finish()

    progress = [m for m in lines if m["kind"] == "progress"]
    # Warmup (2 steps), the peak held 1 step, then linear from the peak by (1e-3 - 1e-4) / 3 a step.
    assert [m["lr"] for m in progress] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 7e-4, 4e-4])
    assert [m["tag"] for m in lines if m["kind"] == "checkpoint"] == ["ep1-ba3", "ep2-ba6"]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["batch"] for m in evals] == [4, 6] and all(m["loss"] > 0 and m["tokens"] > 0 for m in evals)
    step_4 = next(i for i, m in enumerate(lines) if m["kind"] == "progress" and m["batch"] == 4)
    assert lines[step_4 + 1] == evals[0]  # not at a checkpoint: right after step 4's progress line

    config = json.loads((spec.output_dir / "huggingface/ba6/config.json").read_text())
    assert config["attention_dropout"] == 0.1
    state = torch.load(spec.output_dir / "ep2-ba6/mp_rank_00_model_states.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all((tuple(g["betas"]), g["eps"]) == ((0.8, 0.99), 1e-6) for g in groups)


@pytest.mark.parametrize("processes", [1, 2])  # 2: the launcher passes the rank's exit code and last words on
def test_a_bad_input_fails_with_the_reason_last_on_stderr(tiny_model_dir, tmp_path, processes):
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = make_spec("bad", tiny_model_dir, write_rows(tmp_path / "rows"), tmp_path / "out", processes=processes,
                     settings={"global_batch_size": 2, "micro_batch_size": 1})
    spec = spec.model_copy(update={"data_dir": empty})
    worker = Worker(spec, tmp_path, "bad")
    assert worker.finish(returncode=2) == []
    assert worker.stderr.read_text().strip().splitlines()[-1] == (
        f"data_dir {empty} has no input_ids.npy: point it at a folder written by the data preparation step"
    )


def folders(out: Path) -> tuple[list[str], list[str]]:
    """The checkpoint folders and HF exports left in a run's output_dir, hidden ones included."""
    return (sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "huggingface"),
            sorted(p.name for p in (out / "huggingface").iterdir()))


@pytest.fixture(scope="module")
def top_k_and_stopping(tiny_model_dir, tmp_path_factory):
    """Two runs started together, 8 rows, global batch 2 (4 steps an epoch):
    "top2", 5 steps checkpointing every step with save_top_k=2;
    "stop", planned for 10 steps, an eval every step, checkpoints every 2 with save_top_k=1, and early stopping
    with patience 2 that no eval can satisfy (min_delta huge): best at 1, stopped at 3.
    Then "stop" again with patience 3: it resumes from its stop, counts on from 2 and stops at 4; and once more
    as the train task's retry would: it resumes stopped and reports the same end without training.
    """
    folder = tmp_path_factory.mktemp("recipe-runs")
    train, batches = write_rows(folder / "train", rows=8), {"micro_batch_size": 1, "global_batch_size": 2}
    top2 = make_spec("top2", tiny_model_dir, train, folder / "top2", duration="5ba",
                     settings={**batches, "save_steps": 1, "save_top_k": 2})

    def stopping(patience: int) -> TrainSpec:
        return make_spec("stop", tiny_model_dir, train, folder / "stop", duration="10ba",
                         eval_data_dir=write_rows(folder / "eval", rows=2, seed=1),
                         settings={**batches, "save_steps": 2, "save_top_k": 1, "trainer.val_check_interval": 1,
                                   "early_stopping.patience": patience, "early_stopping.min_delta": 1e9})

    stop = stopping(patience=2)
    top2_worker, stop_worker = Worker(top2, folder, "top2"), Worker(stop, folder, "stop")
    stop_lines = stop_worker.finish()
    stop_folders = folders(stop.output_dir), os.readlink(stop.output_dir / LATEST)
    stop_export = sorted(p.name for p in (stop.output_dir / "huggingface/ba3").iterdir())  # before "again" prunes it
    stop = stopping(patience=3)
    again = Worker(stop, folder, "again").finish()
    return SimpleNamespace(top2=top2, top2_lines=top2_worker.finish(), stop=stop, stop_lines=stop_lines,
                           stop_folders=stop_folders, stop_export=stop_export, again=again,
                           retried=Worker(stop, folder, "retried").finish())


def test_save_top_k_keeps_the_newest_k_checkpoints_and_exports(top_k_and_stopping):
    lines, out = top_k_and_stopping.top2_lines, top_k_and_stopping.top2.output_dir
    assert [m["tag"] for m in lines if m["kind"] == "checkpoint"] == [f"ep{b // 4}-ba{b}" for b in range(1, 6)]
    pruned = [m for m in lines if m["kind"] == "pruned"]
    assert [(m["batch"], m["keep"], m["removed"]) for m in pruned] == [
        (b, 2, [str(out / f"ep0-ba{b - 2}"), str(out / f"huggingface/ba{b - 2}")]) for b in (3, 4, 5)
    ]
    checkpoint_3 = next(i for i, m in enumerate(lines) if m["kind"] == "checkpoint" and m["tag"] == "ep0-ba3")
    assert lines[checkpoint_3 + 1] == pruned[0]  # right after the checkpoint that made room
    assert folders(out) == (["ep1-ba4", "ep1-ba5"], ["ba4", "ba5"])
    assert os.readlink(out / LATEST) == "ep1-ba5"
    assert lines[-1] == {"kind": "finished", "batch": 5, "hf_path": str(out / "huggingface/ba5")}
    assert load_weights(out / LATEST)  # the kept checkpoint is whole


def test_early_stopping_stops_checkpoints_and_reports_why(top_k_and_stopping):
    lines, out = top_k_and_stopping.stop_lines, top_k_and_stopping.stop.output_dir
    assert list(losses(lines)) == [1, 2, 3]  # of 10 planned
    assert [m["batch"] for m in lines if m["kind"] == "eval"] == [1, 2, 3]
    assert [m["tag"] for m in lines if m["kind"] == "checkpoint"] == ["ep0-ba2", "ep0-ba3"]  # 3: the stop's
    best = next(m["loss"] for m in lines if m["kind"] == "eval")
    assert [m["kind"] for m in lines[-5:]] == ["eval", "checkpoint", "pruned", "stopped", "finished"]
    assert lines[-2] == {
        "kind": "stopped", "batch": 3, "best_loss": best, "best_batch": 1, "evals_without_improvement": 2,
        "reason": f"eval loss did not improve by more than 1e+09 for 2 evaluations (best {best:.4g} at batch 1)",
    }
    assert lines[-1] == {"kind": "finished", "batch": 3, "hf_path": str(out / "huggingface/ba3")}
    assert top_k_and_stopping.stop_folders == ((["ep0-ba3"], ["ba3"]), "ep0-ba3")  # save_top_k=1
    assert {"config.json", "model.safetensors", "tokenizer.json", RECIPE} <= set(top_k_and_stopping.stop_export)


def test_a_resumed_run_counts_on_from_the_checkpoints_early_stopping_state(top_k_and_stopping):
    lines, out = top_k_and_stopping.again, top_k_and_stopping.stop.output_dir
    assert lines[0]["resumed_from"] == "ep0-ba3"
    assert list(losses(lines)) == [4]  # two evals without improvement came back with the checkpoint: one more
    assert [(m["kind"], m["batch"], m.get("evals_without_improvement")) for m in lines[-2:]] == [
        ("stopped", 4, 3), ("finished", 4, None)]
    assert lines[-2]["best_batch"] == 1
    assert folders(out) == (["ep1-ba4"], ["ba4"]) and os.readlink(out / LATEST) == "ep1-ba4"


def test_a_run_that_stopped_early_stays_stopped_when_retried(top_k_and_stopping):
    lines, out = top_k_and_stopping.retried, top_k_and_stopping.stop.output_dir
    assert lines[0]["resumed_from"] == "ep1-ba4"
    assert [m["kind"] for m in lines] == ["started", "stopped", "finished"]
    assert lines[1:] == top_k_and_stopping.again[-2:]  # the same reason and final export
    assert folders(out) == (["ep1-ba4"], ["ba4"])
