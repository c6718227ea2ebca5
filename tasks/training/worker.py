"""The training worker: one process per rank, started by the train task or by the deepspeed launcher.

    python -m tasks.training.worker --run-name NAME --spec /path/spec.json

It reads a TrainSpec, trains the model with DeepSpeed, checkpoints under spec.output_dir and reports in
protocol lines on stdout; its exit code and last stderr line say how it ended (see protocol.py).
Read `train` top to bottom: `setup` builds the engine, `restore` resumes, `loop` trains, `save` checkpoints.
"""

import argparse
import math
import os
import resource
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # DeepSpeed's autotuner imports MLflow whenever it is installed: 2.5 s of CPU in every rank's start, for a
    # process that never logs to MLflow (the train task does). A None entry fails that import as DeepSpeed expects.
    sys.modules.setdefault("mlflow", None)

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tasks.config import Model, TrainingConfig
from tasks.errors import InvalidInputError, StorageError, TrainingDiverged
from tasks.ports import free_port
from tasks.training.checkpoint_names import export_dir, latest_tag
from tasks.training.checkpoints import (
    check_same_architecture,
    checkpoint_bytes,
    checkpoint_tag,
    discard_partial,
    disk_full_message,
    load_weights,
    point_latest,
    prune,
    save_huggingface,
    save_recipe,
)
from tasks.training.chunked_loss import chunked_cross_entropy
from tasks.training.data import MicroBatch, Prefetcher, StepBatch, eval_batches, logits_of, step_batches
from tasks.training.dropout import add_dropouts
from tasks.training.protocol import (
    BAD_INPUT_EXIT,
    DISK_FULL_EXIT,
    DIVERGED_EXIT,
    emit,
    say_why,
)
from tasks.training.rows import IGNORE, PackedRows
from tasks.training.schedule import learning_rate_at
from tasks.training.spec import TrainSpec

# DeepSpeed calls torch.distributed functions that torch has renamed; the warning would repeat every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

SPIKE_WARMUP = 5  # logged losses before the spike check starts, so the noisy first steps cannot trigger it
SPIKE_MIN_RISE = 1.0  # nats: how far above the mean a spike must also be
SPIKE_WINDOW = 20  # the spike check compares with the mean of at most this many of the latest logged losses
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the MFU denominator on CUDA unless the spec says otherwise


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
    chunked: bool  # the LM head's loss a chunk of rows at a time (token_loss)
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
    watch: "EvalWatch" = field(default_factory=lambda: EvalWatch())  # early stopping
    guard: "DivergenceGuard | None" = None  # the divergence guard and its window of recent losses
    resumed_from: str | None = None  # the checkpoint this process started from


def setup(spec: TrainSpec) -> Session:
    """Check the inputs, join the process group and build the DeepSpeed engine around the model and AdamW."""
    training, model_settings = spec.config.training_config, spec.config.training_config.model
    # Inputs first: a wrong folder should fail before the model loads and DeepSpeed starts.
    data = PackedRows(spec.data_dir, "data_dir")
    eval_data = PackedRows(spec.eval_data_dir, "eval_data_dir") if spec.eval_data_dir else None
    if not (spec.model_dir / "config.json").is_file():
        raise InvalidInputError(f"model_dir {spec.model_dir} has no config.json: pass a Hugging Face model folder")
    config = model_config(spec.model_dir, model_settings.attention_dropout)
    output_dir = spec.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    # One process per rank; the deepspeed launcher sets these variables, a lone worker is rank 0 of 1.
    _single_process_defaults()
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    rows_per_micro_step = training.micro_batch_size * world_size
    if training.global_batch_size % rows_per_micro_step:
        raise InvalidInputError(
            f"global_batch_size ({training.global_batch_size}) must be a multiple of micro_batch_size "
            f"({training.micro_batch_size}) x processes ({world_size}) = {rows_per_micro_step}"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # The same seed on every rank keeps their RNG streams identical, so rank 0's state stands for all in a checkpoint.
    torch.manual_seed(training.seed)

    # The model, from the base folder or, for a fresh run, with the weights of another run's checkpoint.
    # Loaded in fp32 on every rank; with bf16, DeepSpeed keeps fp32 master weights in the optimizer.
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, config=config, dtype=torch.float32)
    if spec.init_from and not (spec.resume and latest_tag(output_dir)):
        weights = load_weights(spec.init_from)
        check_same_architecture(weights, model, spec.init_from, spec.model_dir)
        model.load_state_dict(weights)
        del weights
    if model_settings.peft.peft_scheme == "lora":
        model = wrap_lora(model, model_settings)
    # After LoRA, so the adapters see the dropped inputs.
    add_dropouts(model, model_settings.hidden_dropout, model_settings.ffn_dropout)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    token_flops = flops_per_token(
        total_params, trainable_params, getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0),
        data.context_length,
    )
    zero_stage = training.deepspeed.zero_stage
    chunked = spec.chunked_loss and chunked_loss_applies(model, zero_stage)
    model.to(device)
    optimizer = build_optimizer(model, model_settings, training.deepspeed.offload_optimizer and cuda, cuda)
    # DeepSpeed reports the grad norm only from its ZeRO and mixed-precision optimizers; in plain fp32
    # stage 0 we clip ourselves (clip_grad_norm_ returns the norm).
    clip_here = zero_stage == 0 and not bf16
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_batch_size": training.global_batch_size,
            "train_micro_batch_size_per_gpu": training.micro_batch_size,
            "gradient_accumulation_steps": training.global_batch_size // rows_per_micro_step,
            "zero_optimization": {
                "stage": zero_stage,
                **({"offload_optimizer": {"device": "cpu", "pin_memory": cuda}}
                   if training.deepspeed.offload_optimizer else {}),
            },
            # Offloaded, the optimizer steps on CPU tensors: DeepSpeedCPUAdam on a GPU machine (see build_optimizer),
            # torch's AdamW where everything is on the CPU anyway.
            "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": 0.0 if clip_here else training.trainer.gradient_clip_val,
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1,  # progress is ours to report
        },
    )
    session = Session(
        spec=spec, training=training, data=data, eval_data=eval_data, engine=engine, optimizer=optimizer,
        tokenizer=tokenizer, device=device, rank=rank, world_size=world_size, clip_here=clip_here, chunked=chunked,
        token_flops=token_flops, peak_flops=spec.peak_flops or (H100_BF16_FLOPS if cuda else None),  # CPU: no MFU
        output_dir=output_dir, trainable_params=trainable_params, total_params=total_params,
    )
    if session.master:
        lora = model_settings.peft.lora_tuning
        print(
            f"tessera worker {spec.run_name}: {data.rows} rows x {data.context_length} tokens, {world_size} "
            f"process(es) on {device.type}{' bf16' if bf16 else ''}, ZeRO {zero_stage}, "
            f"{training.micro_batch_size} rows x {training.global_batch_size // rows_per_micro_step} accumulation "
            f"steps per rank; training {trainable_params:,} of {total_params:,} parameters"
            f"{f' (LoRA rank {lora.rank})' if model_settings.peft.peft_scheme else ''}; "
            f"{'chunked' if chunked else 'full-logits'} loss",
            flush=True,
        )
    return session


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
    stopped = state.step < plan.total_batches and state.watch.exhausted(patience)
    if prompts and state.step == 0:
        generate(s, 0, prompts)
    batches = iter(Prefetcher(
        step_batches(s.data, seed=training.seed, start_step=state.step, total_steps=plan.total_batches,
                     batches_per_epoch=plan.batches_per_epoch, global_batch_size=training.global_batch_size,
                     micro_batch_size=training.micro_batch_size, rank=s.rank, world_size=s.world_size),
        pin_memory=s.device.type == "cuda",
    ))
    s.engine.train()
    loop_start = time.time()
    window = Window(s.device, loop_start)

    while state.step < plan.total_batches and not stopped:
        lr = learning_rate_at(state.step, optim.lr, spec.warmup_steps, plan.total_batches, optim.sched.name,
                              optim.final_lr, optim.sched.constant_steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+: the B matrices' groups learn faster
        batch = next(batches)
        loss_sum, grad_norm = train_step(s.engine, batch, s.device, s.world_size,
                                         trainer.gradient_clip_val if s.clip_here else None, s.chunked)
        window.add(loss_sum, batch.loss_tokens)
        state.step += 1

        if state.step % trainer.log_every_n_steps == 0 or state.step == plan.total_batches:
            report(s, state, window, lr, grad_norm, loop_start)

        checkpoint_now = checkpoint_due(state.step, plan.batches_per_epoch, plan.total_batches, training.save_steps)
        eval_now = s.eval_data is not None and eval_due(state.step, plan.total_batches, trainer.val_check_interval,
                                                        checkpoint_now)
        if checkpoint_now and window.steps:  # steps since the last log point: check them before anything is saved
            stop_if_diverged(s, state, window.mean_loss(s.world_size, keep=True), _number(grad_norm), record=False)
        if not (checkpoint_now or eval_now):
            continue
        pause_start = time.time()  # tokens_per_s measures training, not evals, checkpoints or generation
        if eval_now:  # before the checkpoint, so that its early-stopping state counts this eval
            eval_loss, eval_tokens = evaluate(s.engine, s.eval_data, training.micro_batch_size, s.rank,
                                              s.world_size, s.device, s.chunked)
            state.watch.update(eval_loss, state.step, training.early_stopping.min_delta)
            if s.master:
                emit("eval", batch=state.step, loss=eval_loss, tokens=eval_tokens)
            # The eval loss is all-reduced, so every rank takes the same decision and stops at the same step.
            stopped = state.step < plan.total_batches and state.watch.exhausted(patience)
            if stopped:
                checkpoint_now = True  # the final checkpoint and export, as at the planned end
                if window.steps:
                    report(s, state, window, lr, grad_norm, loop_start, now=pause_start)
        if checkpoint_now:
            save(s, state, state.elapsed_s + pause_start - loop_start)
            if prompts:
                generate(s, state.step, prompts)
        window.start += time.time() - pause_start

    if stopped and s.master:
        emit("stopped", batch=state.step, best_loss=state.watch.best_loss, best_batch=state.watch.best_batch,
             evals_without_improvement=state.watch.evals_without_improvement,
             reason=state.watch.reason(training.early_stopping.min_delta))
    if s.master:
        emit("finished", batch=state.step, hf_path=str(export_dir(s.output_dir, state.step)))


def _number(value) -> float | None:
    """A tensor or float as a float (reading a device tensor waits for the device: only at log points)."""
    return None if value is None else float(value)


class Window:
    """The steps since the last progress line: their summed token loss (kept on the device, so reading it is the
    loop's only host sync), their loss tokens, how many, and when the window started."""

    def __init__(self, device: torch.device, start: float):
        self.loss, self.tokens, self.steps, self.start = torch.zeros((), device=device), 0, 0, start

    def add(self, loss_sum: torch.Tensor, loss_tokens: int) -> None:
        self.loss += loss_sum
        self.tokens += loss_tokens
        self.steps += 1

    def mean_loss(self, world_size: int, keep: bool = False) -> float:
        """The mean over the window's loss tokens of every rank (a collective: all ranks call it)."""
        total = self.loss.clone() if keep else self.loss
        if world_size > 1:
            dist.all_reduce(total)
        return total.item() / max(1, self.tokens)

    def reset(self, now: float) -> None:
        self.loss.zero_()
        self.tokens, self.steps, self.start = 0, 0, now


def report(s: Session, state: State, window: Window, lr: float, grad_norm, loop_start: float,
           now: float | None = None) -> None:
    """The progress line for the window's steps, then the divergence check; every rank calls it.

    `now` ends the window; by default the time once the loss has been read, i.e. once its steps have run."""
    plan = s.spec.plan
    loss, norm = window.mean_loss(s.world_size), _number(grad_norm)
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
            loss=loss,
            lr=lr,
            grad_norm=norm,
            tokens_per_s=tokens_per_s,
            elapsed_s=state.elapsed_s + now - loop_start,
            peak_memory_mb=peak_memory_mb(s.device),
            mfu=tokens_per_s * s.token_flops / (s.peak_flops * s.world_size) if s.peak_flops else None,
        )
    window.reset(now)
    stop_if_diverged(s, state, loss, norm, record=True)


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


def save(s: Session, state: State, elapsed_s: float) -> None:
    """The checkpoint `ep{E}-ba{B}` and its Hugging Face export, each with the run's recipe beside it; then the
    latest link, and save_top_k's pruning. Every rank calls it. On a disk without room for it the run stops with a
    StorageError, the latest link still on the last complete checkpoint and nothing half-written left behind."""
    tag = checkpoint_tag(state.step, s.spec.plan.batches_per_epoch)
    need = checkpoint_bytes(s.output_dir, s.total_params)
    short = torch.tensor([int(shutil.disk_usage(s.output_dir).free < need)])
    dist.all_reduce(short, op=dist.ReduceOp.MAX)  # every rank stops, or none: a lone rank would hang the others
    if short.item():
        raise StorageError(disk_full_message(s.output_dir, need))
    try:
        write_checkpoint(s, state, tag, elapsed_s)
    except Exception:
        if shutil.disk_usage(s.output_dir).free >= need:
            raise
        if s.master:  # the disk filled under the save (another writer): what it began is not a checkpoint
            discard_partial(s.output_dir, tag, state.step)
        raise StorageError(disk_full_message(s.output_dir, need)) from None


def write_checkpoint(s: Session, state: State, tag: str, elapsed_s: float) -> None:
    training = s.training
    cuda = s.device.type == "cuda"
    lora = training.model.peft
    s.engine.save_checkpoint(
        s.output_dir,
        tag=tag,
        client_state={"tessera": {
            "step": state.step, "elapsed_s": elapsed_s,
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
            "rows": s.data.rows, "global_batch_size": training.global_batch_size, "seed": training.seed,
            "eval_watch": asdict(state.watch), "recent_losses": state.guard.recent,
            # What init_from needs to merge the adapters into the base weights later.
            "lora": {"rank": lora.lora_tuning.rank, "alpha": lora.lora_tuning.alpha} if lora.peft_scheme else None,
        }},
        save_latest=False,  # the latest link below is ours, moved only once the export is written too
    )
    hf_path = export_dir(s.output_dir, state.step)
    save_huggingface(s.engine, s.tokenizer, hf_path, training.deepspeed.zero_stage, s.master,
                     lora=lora.peft_scheme == "lora", config=s.spec.config)
    if s.master:
        save_recipe(s.output_dir / tag, s.spec.config)
    dist.barrier()  # every rank's shard is on disk before the link says the checkpoint exists
    if s.master:
        point_latest(s.output_dir, tag)
        emit("checkpoint", tag=tag, path=str(s.output_dir / tag), hf_path=str(hf_path))
        # Only now, with the new checkpoint complete and linked and no save under way, and only here on rank 0:
        # the other ranks never touch older folders.
        if training.save_top_k and (removed := prune(s.output_dir, training.save_top_k)):
            emit("pruned", batch=state.step, keep=training.save_top_k, removed=[str(p) for p in removed])


def generate(s: Session, step: int, prompts: list[str]) -> None:
    """Answer the eval prompts with the current weights; ZeRO-3 generation is a collective (every rank steps until
    the longest answer is done)."""
    synced = s.training.deepspeed.zero_stage == 3 and s.world_size > 1
    responses = answer(s.engine, s.tokenizer, prompts, s.training.seed, s.device, synced)
    if s.master:
        emit("generations", batch=step, prompts=prompts, responses=responses)


@dataclass
class DivergenceGuard:
    """Decides, at each log point, whether training has diverged; `recent` holds the latest logged losses."""

    spike_factor: float | None  # None: only non-finite values count
    recent: list[float] = field(default_factory=list)

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Why training has diverged (a phrase, e.g. `loss nan (not a number)`), or None when it has not."""
        for name, value in (("loss", loss), ("grad norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                return f"{name} {value} ({'not a number' if math.isnan(value) else 'infinite'})"
        if self.spike_factor is not None and len(self.recent) >= SPIKE_WARMUP:
            mean = sum(self.recent) / len(self.recent)
            # Near zero, a tenfold jump is noise (0.02 -> 0.2): a spike must also rise SPIKE_MIN_RISE above the mean.
            if loss > self.spike_factor * mean and loss > mean + SPIKE_MIN_RISE:
                return (
                    f"loss {loss:.4g} is over {self.spike_factor:g}x the mean of the last {len(self.recent)} "
                    f"logged losses ({mean:.4g})"
                )
        return None

    def record(self, loss: float) -> None:
        self.recent = [*self.recent, loss][-SPIKE_WINDOW:]


def flops_per_token(params: int, trainable: int, layers: int, hidden_size: int, context_length: int) -> int:
    """Training FLOPs per token, as PaLM's MFU counts them: 2N forward, 2N for the backward through the activations,
    2N more for the weight gradients (only of the weights that train: a LoRA run skips the frozen ones), and
    12·L·d·T for attention."""
    return 4 * params + 2 * trainable + 12 * layers * hidden_size * context_length


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held, in MiB: allocated tensors on a GPU, the peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class EvalWatch:
    """Early stopping's state: the best eval loss so far, its step, and the evals since that did not beat it."""

    best_loss: float | None = None
    best_batch: int | None = None
    evals_without_improvement: int = 0

    def update(self, loss: float, batch: int, min_delta: float) -> None:
        """An eval improves when it is below the best by more than min_delta; only then does it become the best."""
        if self.best_loss is None or loss < self.best_loss - min_delta:
            self.best_loss, self.best_batch, self.evals_without_improvement = loss, batch, 0
        else:
            self.evals_without_improvement += 1

    def exhausted(self, patience: int | None) -> bool:
        return patience is not None and self.evals_without_improvement >= patience

    def reason(self, min_delta: float) -> str:
        """E.g. `eval loss did not improve by more than 0.001 for 3 evaluations (best 1.234 at batch 6)`."""
        n = self.evals_without_improvement
        by = f" by more than {min_delta:g}" if min_delta else ""
        return (
            f"eval loss did not improve{by} for {n} evaluation{'s' * (n != 1)} "
            f"(best {self.best_loss:.4g} at batch {self.best_batch})"
        )


def train_step(engine, batch: StepBatch, device: torch.device, world_size: int, clip: float | None, chunked: bool):
    """One optimizer step over this rank's micro batches; returns its summed token loss and the grad norm.

    The loss is the mean over all loss tokens of the global batch (every micro batch, every rank), so each
    token weighs the same however tokens fall into micro batches: each micro batch's summed token loss is
    divided by the global count. DeepSpeed averages gradients over ranks, so multiply by world_size to get
    their sum, and scale_wrt_gas=False stops it dividing by the accumulation steps as well.
    `clip` is set when we clip ourselves (see train); `chunked` picks token_loss's path; the loss stays on the device.
    """
    loss_sum = torch.zeros((), device=device)
    grad_norm = None
    last = len(batch.micro_batches) - 1
    for i, micro_batch in enumerate(batch.micro_batches):
        loss = token_loss(engine, micro_batch.to(device), chunked)
        engine.backward(loss * (world_size / max(1, batch.loss_tokens)), scale_wrt_gas=False)
        if clip is not None and i == last:  # the last backward has reduced the gradients across ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip or math.inf)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        loss_sum += loss.detach()
    return loss_sum, grad_norm if clip is not None else engine.get_global_grad_norm()


def token_loss(engine, micro_batch: MicroBatch, chunked: bool) -> torch.Tensor:
    """The summed cross-entropy (fp32) over a micro batch's loss tokens, each packed document attending to itself.

    chunked: the decoder's hidden states meet the LM head a chunk of rows at a time (chunked_loss.py), so the
    [tokens, vocabulary] logits are never held, and rows without loss skip the head; else the model's own logits,
    upcast. The two agree to float rounding; chunked needs what chunked_loss_applies checks.
    """
    targets = micro_batch.targets.flatten()
    if not chunked:
        return F.cross_entropy(logits_of(engine, micro_batch).flatten(0, 1), targets, ignore_index=IGNORE,
                               reduction="sum")
    causal_lm = causal_lm_of(engine.module)
    hidden = causal_lm.get_decoder()(
        input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids, use_cache=False
    ).last_hidden_state
    return chunked_cross_entropy(hidden.flatten(0, 1), causal_lm.get_output_embeddings().weight, targets)


def causal_lm_of(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (adapters included), or the module itself."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def chunked_loss_applies(model: torch.nn.Module, zero_stage: int) -> bool:
    """Whether the model's logits are exactly its LM head applied to the decoder's output, so the chunked loss
    computes the same thing; and the head's weight is whole on this rank (ZeRO-3 partitions it)."""
    causal_lm = causal_lm_of(model)
    head = causal_lm.get_output_embeddings()
    rescaled = any(getattr(causal_lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (
        zero_stage < 3 and type(head) is torch.nn.Linear and head.bias is None and not rescaled
        and callable(getattr(causal_lm, "get_decoder", None))
    )


def checkpoint_due(step: int, batches_per_epoch: int, total_batches: int, every: int | None) -> bool:
    if step == total_batches:
        return True
    return step % batches_per_epoch == 0 if every is None else step % every == 0


def eval_due(step: int, total_batches: int, every: int | None, checkpointed: bool) -> bool:
    """Eval loss at each checkpoint, or every `every` steps and at the end."""
    if every is None:
        return checkpointed
    return step % every == 0 or step == total_batches


def model_config(model_dir: Path, attention_dropout: float):
    """The model's config with the spec's attention dropout on it, read before any weights load.

    Set whenever the config has the field, 0 included, so the spec decides rather than the model folder.
    The model applies it only in train mode.
    """
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = attention_dropout
    elif attention_dropout:
        raise InvalidInputError(
            f"attention_dropout ({attention_dropout}) cannot be set on this {config.model_type} model: its config "
            "has no attention_dropout field; leave attention_dropout at 0"
        )
    return config


def wrap_lora(model: torch.nn.Module, settings: Model) -> torch.nn.Module:
    """The model with peft's LoRA adapters on lora_tuning.target_modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lora = settings.peft.lora_tuning
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.adapter_dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise InvalidInputError(f"cannot put LoRA adapters on this model: {e}") from e


def build_optimizer(model: torch.nn.Module, settings: Model, offloaded_from_gpu: bool,
                    cuda: bool) -> torch.optim.Optimizer:
    """AdamW with the recipe's settings over the parameters that train (with LoRA, only the adapters).

    Weight decay only on weight matrices and embeddings (ndim >= 2), never on biases or norm weights.
    Each group carries an `lr_scale`, the multiple of the step's learning rate it learns at: 1, and LoRA+'s
    ratio for the LoRA B matrices (Hayou et al. 2024).
    """
    optim, b_scale = settings.optim, settings.peft.lora_tuning.b_lr_scale
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lora_b = b_scale != 1 and ".lora_B." in name
            groups.setdefault((parameter.ndim >= 2, lora_b), []).append(parameter)
    param_groups = [
        {
            "params": groups[decay, lora_b],
            "weight_decay": optim.weight_decay if decay else 0.0,
            "lr_scale": b_scale if lora_b else 1.0,
        }
        for decay, lora_b in ((True, False), (False, False), (True, True), (False, True))
        if groups.get((decay, lora_b))
    ]
    betas = tuple(optim.betas)
    if offloaded_from_gpu:
        # The offloaded step runs on the CPU: DeepSpeed's vectorised CPU Adam is several times torch's there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=cuda)


@torch.no_grad()
def evaluate(engine, data: PackedRows, micro_batch_size: int, rank: int, world_size: int, device: torch.device,
             chunked: bool):
    """Mean token loss over all eval rows (and their loss-token count), the same on every rank."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, loss tokens
    for micro_batch in eval_batches(data, micro_batch_size, rank, world_size):
        micro_batch = micro_batch.to(device)
        totals[0] += token_loss(engine, micro_batch, chunked)
        totals[1] += (micro_batch.targets != IGNORE).sum()
    if world_size > 1:
        dist.all_reduce(totals)
    engine.train()
    loss, tokens = totals.tolist()
    return loss / max(1.0, tokens), int(tokens)


@torch.no_grad()
def answer(engine, tokenizer, prompts: list[str], seed: int, device: torch.device, synced: bool) -> list[str]:
    """Sample an answer to each prompt with the anchor's settings, seeded, leaving the training RNG untouched.

    The same seed at every checkpoint makes answers differ only because the weights did.
    """
    engine.eval()
    responses = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            if tokenizer.chat_template:
                messages = [{"role": "user", "content": prompt}]
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tokenizer(prompt, return_tensors="pt")
            inputs = inputs.to(device)
            output = engine.module.generate(
                **inputs,
                max_new_tokens=100,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=0.95,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                synced_gpus=synced,
            )
            responses.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    engine.train()
    return responses


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
