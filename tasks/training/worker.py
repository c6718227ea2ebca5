"""The training worker: one process per rank, started by the train task or by the deepspeed launcher.

    python -m tasks.training.worker --run-name NAME --spec /path/spec.json

It reads a TrainSpec, trains the model with DeepSpeed, checkpoints under spec.output_dir and reports in
protocol lines on stdout; its exit code and last stderr line say how it ended (see protocol.py).
Read `train` top to bottom: `setup` builds the engine (engine.py) and the objective (DPO's, with its reference
pass: preference.py), `restore` resumes, `loop` trains. The loop stands on step.py (the step and its objective),
stopping.py (when to checkpoint, evaluate or stop), metrics.py (the progress figures) and saving.py (writing a
checkpoint).
"""

import argparse
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # DeepSpeed's autotuner imports MLflow whenever it is installed: 2.5 s of CPU in every rank's start, for a
    # process that never logs to MLflow (the train task does). A None entry fails that import as DeepSpeed expects.
    sys.modules.setdefault("mlflow", None)

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from tasks.config import TaskType, TrainingConfig
from tasks.errors import InvalidInputError, StorageError, TrainingDiverged
from tasks.ports import free_port
from tasks.training.checkpoint_names import export_dir, latest_tag
from tasks.training.chunked_loss import chunked_loss_applies
from tasks.training.data import Prefetcher, StepBatch, step_batches
from tasks.training.engine import (
    accumulation_steps,
    build_engine,
    join_process_group,
    load_model,
    model_config,
    set_learning_rate,
)
from tasks.training.generation import answer
from tasks.training.metrics import H100_BF16_FLOPS, Window, flops_per_token, peak_memory_mb
from tasks.training.preference import PreferenceLoss, reference_logps
from tasks.training.protocol import BAD_INPUT_EXIT, DISK_FULL_EXIT, DIVERGED_EXIT, emit, say_why
from tasks.training.rows import PackedRows
from tasks.training.saving import save
from tasks.training.schedule import learning_rate_at
from tasks.training.spec import TrainSpec
from tasks.training.step import Objective, TokenLoss, evaluate, train_step
from tasks.training.stopping import DivergenceGuard, EvalWatch, checkpoint_due, eval_due


def train(spec: TrainSpec) -> None:
    session = setup(spec)
    state = restore(session)
    loop(session, state)
    dist.destroy_process_group()


@dataclass
class Session:
    """What setup builds and the loop reads: the engine, the data, and where this rank stands."""

    spec: TrainSpec
    training: TrainingConfig  # spec.config.training_config
    data: PackedRows
    eval_data: PackedRows | None
    engine: deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    tokenizer: object
    device: torch.device
    rank: int
    world_size: int
    clip_here: bool  # fp32 ZeRO-0 reports no grad norm: the step clips and measures it itself
    chunked: bool  # the LM head's loss a chunk of rows at a time (token_loss, side_logps)
    objective: Objective  # what a step minimises: the token loss, or DPO's on preference rows
    eval_objective: Objective  # the same on the eval rows (DPO: against their own reference log-probabilities)
    token_flops: int  # training FLOPs per token, for the MFU
    peak_flops: float | None
    output_dir: Path
    trainable_params: int  # LoRA trains only its adapters
    total_params: int

    @property
    def master(self) -> bool:
        """Rank 0: the one that reports and writes the Hugging Face exports."""
        return self.rank == 0


@dataclass
class State:
    """Where training stands: what a checkpoint carries besides the engine's own state, and resume restores."""

    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0  # training seconds before this process started (the run's, across resumes)
    watch: EvalWatch = field(default_factory=EvalWatch)  # early stopping
    guard: DivergenceGuard | None = None  # the divergence guard and its window of recent losses
    resumed_from: str | None = None  # the checkpoint this process started from


def setup(spec: TrainSpec) -> Session:
    """Check the inputs, join the process group and build the DeepSpeed engine around the model and AdamW."""
    training, settings = spec.config.training_config, spec.config.training_config.model
    # Inputs first: a wrong folder should fail before the model loads and DeepSpeed starts.
    data = PackedRows(spec.data_dir, "data_dir")
    eval_data = PackedRows(spec.eval_data_dir, "eval_data_dir") if spec.eval_data_dir else None
    preference = spec.config.run.task_type == TaskType.DPO
    for role, rows in (("data_dir", data), ("eval_data_dir", eval_data)):
        if rows and preference and rows.sequence_ids is None:
            raise InvalidInputError(f"{role} {getattr(spec, role)} holds no preference pairs (sequence_ids.npy), "
                                    "which task_type DPO trains on: prepare the data with task_type DPO")
    if not (spec.model_dir / "config.json").is_file():
        raise InvalidInputError(f"model_dir {spec.model_dir} has no config.json: pass a Hugging Face model folder")
    config = model_config(spec.model_dir, settings.attention_dropout)
    output_dir = spec.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    # One process per rank; the deepspeed launcher sets these variables, a lone worker is rank 0 of 1.
    _single_process_defaults()
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    accumulation = accumulation_steps(training, world_size)
    device, bf16 = join_process_group(local_rank, training.seed)

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    # Another run's weights start a fresh run only: a resumed one has weights of its own.
    resuming = bool(spec.resume and latest_tag(output_dir))
    init_from = None if resuming else spec.init_from
    model = load_model(spec.model_dir, config, settings, init_from)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    token_flops = flops_per_token(total_params, trainable_params, getattr(config, "num_hidden_layers", 0),
                                  getattr(config, "hidden_size", 0), data.context_length)
    chunked = spec.chunked_loss and chunked_loss_applies(model, training.deepspeed.zero_stage)
    engine, optimizer, clip_here = build_engine(model, training, device, bf16, accumulation)
    peak_flops = spec.peak_flops or (H100_BF16_FLOPS if device.type == "cuda" else None)  # CPU: no MFU
    session = Session(
        spec=spec, training=training, data=data, eval_data=eval_data, engine=engine, optimizer=optimizer,
        tokenizer=tokenizer, device=device, rank=rank, world_size=world_size, clip_here=clip_here, chunked=chunked,
        objective=TokenLoss(chunked), eval_objective=TokenLoss(chunked), token_flops=token_flops,
        peak_flops=peak_flops, output_dir=output_dir, trainable_params=trainable_params, total_params=total_params,
    )
    if preference:
        prefer(session, resuming)
    if session.master:
        _say_ready(session, bf16, accumulation)
    return session


def _say_ready(s: Session, bf16: bool, accumulation: int) -> None:
    """The worker log's line on what trains, and how."""
    settings, dpo = s.training.model, s.training.model.dpo_cfg
    rpo = f", rpo_alpha {dpo.rpo_alpha:g}" if dpo.rpo_alpha else ""
    objective = f"; DPO ({dpo.loss_type}, beta {dpo.beta:g}{rpo})" if isinstance(s.objective, PreferenceLoss) else ""
    print(
        f"tessera worker {s.spec.run_name}: {s.data.rows} rows x {s.data.context_length} tokens, {s.world_size} "
        f"process(es) on {s.device.type}{' bf16' if bf16 else ''}, ZeRO {s.training.deepspeed.zero_stage}, "
        f"{s.training.micro_batch_size} rows x {accumulation} accumulation "
        f"steps per rank; training {s.trainable_params:,} of {s.total_params:,} parameters"
        f"{f' (LoRA rank {settings.peft.lora_tuning.rank})' if settings.peft.peft_scheme else ''}; "
        f"{'chunked' if s.chunked else 'full-logits'} loss{objective}",
        flush=True,
    )


def prefer(s: Session, resuming: bool) -> None:
    """DPO's objective on the train and eval rows, each against the reference log-probabilities of its pairs: read
    back on resume, else computed now, with the weights as loaded, before the first step (SimPO has none)."""
    started = time.time()
    settings = s.training.model.dpo_cfg

    def objective(data: PackedRows, split: str) -> PreferenceLoss:
        reference = None if settings.reference_free else reference_logps(
            s.engine, data, split, s.output_dir, s.training.micro_batch_size, s.rank, s.world_size, s.device,
            s.chunked, resuming)
        return PreferenceLoss(settings, reference, s.chunked)

    s.objective = objective(s.data, "train")
    if s.eval_data is not None:
        s.eval_objective = objective(s.eval_data, "eval")
    if s.master and not settings.reference_free:
        pairs = s.data.pairs + (s.eval_data.pairs if s.eval_data is not None else 0)
        print(f"tessera worker {s.spec.run_name}: reference log-probabilities of {pairs} pairs "
              f"{'read back' if resuming else 'computed'} in {time.time() - started:.1f} s", flush=True)


def restore(s: Session) -> State:
    """A fresh state, or the latest checkpoint's: weights, optimizer, step, RNG, early stopping and the divergence
    guard's window; the data order follows from the step."""
    tag = latest_tag(s.output_dir) if s.spec.resume else None
    if tag is None:
        return State(guard=DivergenceGuard(s.spec.loss_spike_factor))
    loaded, client_state = s.engine.load_checkpoint(s.output_dir, tag=tag)
    if loaded is None:  # DeepSpeed logs why and returns None rather than raising
        raise InvalidInputError(
            f"cannot resume from {s.output_dir / tag}: DeepSpeed could not load it (see the log above)"
        )
    saved = client_state["tessera"]
    ours = {"rows": s.data.rows, "global_batch_size": s.training.global_batch_size, "seed": s.training.seed}
    if changed := {k: (saved[k], v) for k, v in ours.items() if saved[k] != v}:
        said = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in changed.items())
        raise InvalidInputError(
            f"cannot resume from {s.output_dir / tag}: the data order has changed ({said}); "
            "use the original settings, or start a fresh run"
        )
    torch.set_rng_state(saved["rng"])
    if s.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"])
    return State(step=saved["step"], elapsed_s=saved["elapsed_s"], watch=EvalWatch(**saved.get("eval_watch", {})),
                 guard=DivergenceGuard(s.spec.loss_spike_factor, saved.get("recent_losses", [])), resumed_from=tag)


def carried(s: Session, state: State, elapsed_s: float) -> dict:
    """What a checkpoint carries for `restore` besides the engine's own state (saving.py adds the LoRA settings)."""
    return {
        "step": state.step, "elapsed_s": elapsed_s,
        "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if s.device.type == "cuda" else None,
        "rows": s.data.rows, "global_batch_size": s.training.global_batch_size, "seed": s.training.seed,
        "eval_watch": asdict(state.watch), "recent_losses": state.guard.recent,
    }


def loop(s: Session, state: State) -> None:
    """Optimizer steps until the plan's end or early stopping, with progress, evals and checkpoints when due."""
    plan, training, spec = s.spec.plan, s.training, s.spec
    trainer, optim, patience = training.trainer, training.model.optim, training.early_stopping.patience
    prompts = spec.config.run.eval_prompts or []
    if s.master:
        print(f"tessera worker {spec.run_name}: starting at step {state.step}", flush=True)
        emit("started", epochs=plan.epochs, batches_per_epoch=plan.batches_per_epoch, total_batches=plan.total_batches,
             total_tokens=plan.total_tokens, resumed_from=state.resumed_from, trainable_params=s.trainable_params,
             total_params=s.total_params)
    # A run that stopped early checkpointed where it stopped: resumed there, it stays stopped (unless patience grew).
    stopped = state.watch.stops(state.step, plan.total_batches, patience)
    if prompts and state.step == 0:
        generate(s, 0, prompts)
    batches = _batches(s, state.step)
    s.engine.train()
    loop_start = time.time()
    window = Window(s.device, loop_start, len(s.objective.names))

    while state.step < plan.total_batches and not stopped:
        lr = learning_rate_at(state.step, optim.lr, spec.warmup_steps, plan.total_batches, optim.sched.name,
                              optim.final_lr, optim.sched.constant_steps)
        set_learning_rate(s.optimizer, lr)
        batch = next(batches)
        sums, grad_norm = train_step(s.engine, batch, s.device, s.world_size,
                                     trainer.gradient_clip_val if s.clip_here else None, s.objective)
        window.add(sums, s.objective.units(batch))
        state.step += 1
        if state.step % trainer.log_every_n_steps == 0 or state.step == plan.total_batches:
            report(s, state, window, lr, grad_norm, loop_start)

        checkpoint_now = checkpoint_due(state.step, plan.batches_per_epoch, plan.total_batches, training.save_steps)
        eval_now = s.eval_data is not None and eval_due(state.step, plan.total_batches, trainer.val_check_interval,
                                                        checkpoint_now)
        if checkpoint_now and window.steps:  # steps since the last log point: check them before anything is saved
            stop_if_diverged(s, state, window.means(s.world_size, keep=True)[0], _number(grad_norm), record=False)
        if not (checkpoint_now or eval_now):
            continue
        with window.paused() as pause_start:  # tokens_per_s measures training, not evals, checkpoints or generation
            if eval_now:  # before the checkpoint, so that its early-stopping state counts this eval
                stopped = evaluate_and_watch(s, state)
                if stopped and window.steps:  # the progress line of the steps since the last one, before the end
                    report(s, state, window, lr, grad_norm, loop_start, now=pause_start)
            if checkpoint_now or stopped:  # stopping early saves and exports, as the planned end does
                checkpoint(s, state, state.elapsed_s + pause_start - loop_start, prompts)

    if stopped and s.master:
        emit("stopped", batch=state.step, best_loss=state.watch.best_loss, best_batch=state.watch.best_batch,
             evals_without_improvement=state.watch.evals_without_improvement,
             reason=state.watch.reason(training.early_stopping.min_delta))
    if s.master:
        emit("finished", batch=state.step, hf_path=str(export_dir(s.output_dir, state.step)))


def _batches(s: Session, start_step: int) -> Iterator[StepBatch]:
    """This rank's share of each step's batch from `start_step` on, read ahead of the step that needs it."""
    plan, training = s.spec.plan, s.training
    return iter(Prefetcher(
        step_batches(s.data, seed=training.seed, start_step=start_step, total_steps=plan.total_batches,
                     batches_per_epoch=plan.batches_per_epoch, global_batch_size=training.global_batch_size,
                     micro_batch_size=training.micro_batch_size, rank=s.rank, world_size=s.world_size),
        pin_memory=s.device.type == "cuda",
    ))


def _number(value) -> float | None:
    """A tensor or float as a float (reading a device tensor waits for the device: only at log points)."""
    return None if value is None else float(value)


def report(s: Session, state: State, window: Window, lr: float, grad_norm, loop_start: float,
           now: float | None = None) -> None:
    """The progress line for the window's steps, then the divergence check; every rank calls it.

    `now` ends the window; by default the time once the loss has been read, i.e. once its steps have run."""
    plan = s.spec.plan
    figures, norm = s.objective.report(window.means(s.world_size)), _number(grad_norm)
    now = time.time() if now is None else now
    tokens_per_s = window.steps * plan.tokens_per_batch / (now - window.start)
    if s.master:
        emit(
            "progress",
            epoch=(state.step - 1) // plan.batches_per_epoch + 1,
            epochs=plan.epochs,
            batch=state.step,
            total_batches=plan.total_batches,
            tokens=state.step * plan.tokens_per_batch,
            total_tokens=plan.total_tokens,
            **figures,  # loss, and DPO's rewards
            lr=lr,
            grad_norm=norm,
            tokens_per_s=tokens_per_s,
            elapsed_s=state.elapsed_s + now - loop_start,
            peak_memory_mb=peak_memory_mb(s.device),
            mfu=tokens_per_s * s.token_flops / (s.peak_flops * s.world_size) if s.peak_flops else None,
        )
    window.reset(now)
    stop_if_diverged(s, state, figures["loss"], norm, record=True)


def stop_if_diverged(s: Session, state: State, loss: float, norm: float | None, record: bool) -> None:
    """Raise TrainingDiverged (rank 0 says so in a `diverged` line) before anything more is saved.

    Every rank decides alike: the loss is all-reduced and the grad norm is global."""
    if reason := state.guard.check(loss, norm):
        if s.master:
            emit("diverged", batch=state.step, loss=loss, grad_norm=norm, reason=reason,
                 checkpoint=latest_tag(s.output_dir))
        raise TrainingDiverged(f"training diverged at batch {state.step}: {reason}")
    if record:
        state.guard.record(loss)


def evaluate_and_watch(s: Session, state: State) -> bool:
    """The eval loss (DPO: with its rewards), in an `eval` line and counted by early stopping; returns whether
    training stops here.

    The eval loss is all-reduced, so every rank takes the same decision and stops at the same step."""
    training = s.training
    figures, units = evaluate(s.engine, s.eval_data, training.micro_batch_size, s.rank, s.world_size, s.device,
                              s.eval_objective)
    state.watch.update(figures["loss"], state.step, training.early_stopping.min_delta)
    if s.master:
        emit("eval", batch=state.step, **figures, **{s.eval_objective.unit: units})
    return state.watch.stops(state.step, s.spec.plan.total_batches, training.early_stopping.patience)


def checkpoint(s: Session, state: State, elapsed_s: float, prompts: list[str]) -> None:
    """The checkpoint and its export (saving.py), then the eval prompts answered with its weights."""
    save(s.engine, s.tokenizer, s.spec, s.output_dir, state.step, carried(s, state, elapsed_s), s.total_params,
         s.master)
    if prompts:
        generate(s, state.step, prompts)


def generate(s: Session, step: int, prompts: list[str]) -> None:
    """Answer the eval prompts with the current weights; ZeRO-3 generation is a collective (every rank steps until
    the longest answer is done)."""
    synced = s.training.deepspeed.zero_stage == 3 and s.world_size > 1
    responses = answer(s.engine, s.tokenizer, prompts, s.training.seed, s.device, synced)
    if s.master:
        emit("generations", batch=step, prompts=prompts, responses=responses)


def _single_process_defaults() -> None:
    """Launched alone rather than by the deepspeed launcher: be rank 0 of 1, on a free local port."""
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.training.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True, help="the run this process trains (shown by ps)")
    parser.add_argument("--spec", required=True, type=Path, help="the TrainSpec JSON written by the train task")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        spec = TrainSpec.load(args.spec)
        if spec.run_name != args.run_name:
            raise InvalidInputError(f"--run-name {args.run_name} does not match run_name {spec.run_name} in {args.spec}")
        train(spec)
    except InvalidInputError as e:
        return _fail(str(e), BAD_INPUT_EXIT)
    except TrainingDiverged as e:
        return _fail(str(e), DIVERGED_EXIT)
    except StorageError as e:
        return _fail(str(e), DISK_FULL_EXIT)
    except Exception as e:
        traceback.print_exc()
        return _fail(f"training failed: {type(e).__name__}: {e}", 1)
    return 0


def _fail(reason: str, code: int) -> int:
    if dist.is_initialized():
        dist.destroy_process_group()
    say_why(reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
