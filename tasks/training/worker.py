"""The training worker: one process per rank, started by the train task or by the deepspeed launcher.

    python -m tasks.training.worker --run-name NAME --spec /path/spec.json

It reads a TrainSpec, trains the model with DeepSpeed, checkpoints under spec.output_dir and reports on
stdout in protocol lines (see protocol.py). Exit 0 on success; otherwise the last stderr line says why:
2 for a bad input, DIVERGED_EXIT when the loss diverged (after a `diverged` line), 1 for anything else.
"""

import argparse
import math
import os
import resource
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tasks.errors import InvalidInputError
from tasks.training.checkpoints import (
    check_same_architecture,
    checkpoint_tag,
    latest_tag,
    load_weights,
    point_latest,
    prune,
    save_huggingface,
)
from tasks.training.chunked_loss import chunked_cross_entropy
from tasks.training.data import IGNORE, MicroBatch, PackedRows, Prefetcher, StepBatch, eval_batches, step_batches
from tasks.training.dropout import add_dropouts
from tasks.training.protocol import emit
from tasks.training.schedule import learning_rate_at, plan_duration
from tasks.training.spec import TrainSpec

# DeepSpeed calls torch.distributed functions that torch has renamed; the warning would repeat every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

DIVERGED_EXIT = 3  # the exit code after a `diverged` line: retrying would only diverge again
SPIKE_WARMUP = 5  # logged losses before the spike check starts, so the noisy first steps cannot trigger it
SPIKE_MIN_RISE = 1.0  # nats: how far above the mean a spike must also be
SPIKE_WINDOW = 20  # the spike check compares with the mean of at most this many of the latest logged losses
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the MFU denominator on CUDA unless the spec says otherwise


class TrainingDiverged(Exception):
    """The loss or grad norm went non-finite or the loss spiked: stop without checkpointing."""


def train(spec: TrainSpec) -> None:
    # Inputs first: a wrong folder should fail before the model loads and DeepSpeed starts.
    data = PackedRows(spec.data_dir, "data_dir")
    eval_data = PackedRows(spec.eval_data_dir, "eval_data_dir") if spec.eval_data_dir else None
    if not (spec.model_dir / "config.json").is_file():
        raise InvalidInputError(f"model_dir {spec.model_dir} has no config.json: pass a Hugging Face model folder")
    config = model_config(spec.model_dir, spec.attention_dropout)
    plan = plan_duration(
        spec.duration_value, spec.duration_unit, data.rows, data.context_length, spec.global_batch_size
    )
    output_dir = spec.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    # One process per rank; the deepspeed launcher sets these variables, a lone worker is rank 0 of 1.
    _single_process_defaults()
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    master = rank == 0  # the one rank that reports and writes the Hugging Face exports
    rows_per_micro_step = spec.micro_batch_size * world_size
    if spec.global_batch_size % rows_per_micro_step:
        raise InvalidInputError(
            f"global_batch_size ({spec.global_batch_size}) must be a multiple of micro_batch_size "
            f"({spec.micro_batch_size}) x processes ({world_size}) = {rows_per_micro_step}"
        )
    grad_accum = spec.global_batch_size // rows_per_micro_step
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # The same seed on every rank keeps their RNG streams identical, so rank 0's state stands for all in a checkpoint.
    torch.manual_seed(spec.seed)

    # The model, from the base folder or, for a fresh run, with the weights of another run's checkpoint.
    # Loaded in fp32 on every rank; with bf16, DeepSpeed keeps fp32 master weights in the optimizer.
    resume_tag = latest_tag(output_dir) if spec.resume else None
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, config=config, dtype=torch.float32)
    if spec.init_from and not resume_tag:
        weights = load_weights(spec.init_from)
        check_same_architecture(weights, model, spec.init_from, spec.model_dir)
        model.load_state_dict(weights)
        del weights
    if spec.peft == "lora":
        model = wrap_lora(model, spec)
    add_dropouts(model, spec.hidden_dropout, spec.ffn_dropout)  # after LoRA, so the adapters see the dropped inputs
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    token_flops = flops_per_token(
        total_params, trainable_params, getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0),
        data.context_length,
    )
    peak_flops = spec.peak_flops or (H100_BF16_FLOPS if cuda else None)  # CPU: no meaningful peak, no MFU
    chunked = spec.chunked_loss and chunked_loss_applies(model, spec.zero_stage)
    model.to(device)
    optimizer = build_optimizer(model, spec, cuda)  # the learning rate is set every step below
    # DeepSpeed reports the grad norm only from its ZeRO and mixed-precision optimizers; in plain fp32
    # stage 0 we clip ourselves (clip_grad_norm_ returns the norm).
    clip_here = spec.zero_stage == 0 and not bf16
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_batch_size": spec.global_batch_size,
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {
                "stage": spec.zero_stage,
                **({"offload_optimizer": {"device": "cpu", "pin_memory": cuda}} if spec.offload_optimizer else {}),
            },
            # Offloaded, the optimizer steps on CPU tensors: DeepSpeedCPUAdam on a GPU machine (see build_optimizer),
            # torch's AdamW where everything is on the CPU anyway.
            "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": 0.0 if clip_here else spec.gradient_clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1,  # progress is ours to report
        },
    )

    # Resume: weights, optimizer, step and RNG from the latest checkpoint; the data order follows from the step.
    step, elapsed_before = 0, 0.0  # elapsed_s counts the run's training time across resumes
    watch = EvalWatch()  # early stopping's state, carried across resumes
    recent_losses: list[float] = []  # the divergence guard's window, carried across resumes too
    if resume_tag:
        loaded, client_state = engine.load_checkpoint(output_dir, tag=resume_tag)
        if loaded is None:  # DeepSpeed logs why and returns None rather than raising
            raise InvalidInputError(
                f"cannot resume from {output_dir / resume_tag}: DeepSpeed could not load it (see the log above)"
            )
        saved = client_state["tessera"]
        ours = {"rows": data.rows, "global_batch_size": spec.global_batch_size, "seed": spec.seed}
        if changed := {k: (saved[k], v) for k, v in ours.items() if saved[k] != v}:
            said = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in changed.items())
            raise InvalidInputError(
                f"cannot resume from {output_dir / resume_tag}: the data order has changed ({said}); "
                "use the original settings, or set resume=false with a fresh output_dir"
            )
        step, elapsed_before = saved["step"], saved["elapsed_s"]
        watch = EvalWatch(**saved.get("eval_watch", {}))
        recent_losses = saved.get("recent_losses", [])
        torch.set_rng_state(saved["rng"])
        if cuda:
            torch.cuda.set_rng_state(saved["cuda_rng"])

    if master:
        print(
            f"tessera worker {spec.run_name}: {data.rows} rows x {data.context_length} tokens, {world_size} "
            f"process(es) on {device.type}{' bf16' if bf16 else ''}, ZeRO {spec.zero_stage}, "
            f"{spec.micro_batch_size} rows x {grad_accum} accumulation steps per rank, starting at step {step}; "
            f"training {trainable_params:,} of {total_params:,} parameters"
            f"{f' (LoRA rank {spec.lora_rank})' if spec.peft else ''}; {'chunked' if chunked else 'full-logits'} loss",
            flush=True,
        )
        emit(
            "started",
            epochs=plan.epochs,
            batches_per_epoch=plan.batches_per_epoch,
            total_batches=plan.total_batches,
            total_tokens=plan.total_tokens,
            resumed_from=resume_tag,
            trainable_params=trainable_params,
            total_params=total_params,
        )
    # A run that stopped early checkpointed where it stopped: resumed there, it stays stopped (unless the
    # spec's patience has grown since).
    stopped = step < plan.total_batches and watch.exhausted(spec.early_stopping_patience)
    # ZeRO-3 generation is a collective: ranks must keep stepping until the longest answer is done.
    synced_generate = spec.zero_stage == 3 and world_size > 1
    if spec.eval_prompts and step == 0:
        responses = answer(engine, tokenizer, spec.eval_prompts, spec.seed, device, synced_generate)
        if master:
            emit("generations", batch=0, prompts=spec.eval_prompts, responses=responses)

    batches = iter(
        Prefetcher(
            step_batches(
                data,
                seed=spec.seed,
                start_step=step,
                total_steps=plan.total_batches,
                batches_per_epoch=plan.batches_per_epoch,
                global_batch_size=spec.global_batch_size,
                micro_batch_size=spec.micro_batch_size,
                rank=rank,
                world_size=world_size,
            ),
            pin_memory=cuda,
        )
    )
    engine.train()
    # Loss accumulates on the device between log points: reading it is the loop's only host sync.
    window_loss, window_tokens, window_steps = torch.zeros((), device=device), 0, 0
    loop_start = window_start = time.time()
    guard = DivergenceGuard(spec.loss_spike_factor, recent_losses)

    def check_divergence(loss: float, norm: float | None, record: bool) -> None:
        """Raise TrainingDiverged (rank 0 says so in a `diverged` line) before anything more is saved.

        Every rank decides alike: the loss is all-reduced and the grad norm is global.
        """
        if reason := guard.check(loss, norm):
            if master:
                emit("diverged", batch=step, loss=loss, grad_norm=norm, reason=reason,
                     checkpoint=latest_tag(output_dir))
            raise TrainingDiverged(f"training diverged at batch {step}: {reason}")
        if record:
            guard.record(loss)

    def report_progress(now: float | None = None) -> None:
        """The progress line for the steps since the last one; every rank calls it (the loss is all-reduced).

        `now` ends the window; by default the time once the loss has been read, i.e. once its steps have run."""
        nonlocal window_tokens, window_steps, window_start
        if world_size > 1:
            dist.all_reduce(window_loss)
        loss = window_loss.item() / max(1, window_tokens)  # mean over the window's loss tokens
        now = time.time() if now is None else now
        norm = None if grad_norm is None else float(grad_norm)
        tokens_per_s = window_steps * plan.tokens_per_batch / (now - window_start)
        if master:
            emit(
                "progress",
                epoch=(step - 1) // plan.batches_per_epoch + 1,
                epochs=plan.epochs,
                batch=step,
                total_batches=plan.total_batches,
                tokens=step * plan.tokens_per_batch,
                total_tokens=plan.total_tokens,
                loss=loss,
                lr=lr,
                grad_norm=norm,
                tokens_per_s=tokens_per_s,
                elapsed_s=elapsed_before + now - loop_start,
                peak_memory_mb=peak_memory_mb(device),
                mfu=tokens_per_s * token_flops / (peak_flops * world_size) if peak_flops else None,
            )
        window_loss.zero_()
        window_tokens, window_steps, window_start = 0, 0, now
        check_divergence(loss, norm, record=True)

    while step < plan.total_batches and not stopped:
        lr = learning_rate_at(
            step, spec.learning_rate, spec.warmup_steps, plan.total_batches, spec.schedule, spec.final_lr,
            spec.constant_steps,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+: the B matrices' groups learn faster
        batch = next(batches)
        loss_sum, grad_norm = train_step(
            engine, batch, device, world_size, spec.gradient_clip if clip_here else None, chunked
        )
        window_loss += loss_sum
        window_tokens += batch.loss_tokens
        window_steps += 1
        step += 1

        if step % spec.log_every_n_batches == 0 or step == plan.total_batches:
            report_progress()

        checkpoint_now = checkpoint_due(step, plan.batches_per_epoch, plan.total_batches, spec.save_every_n_batches)
        eval_now = eval_data is not None and eval_due(
            step, plan.total_batches, spec.eval_every_n_batches, checkpoint_now
        )
        if checkpoint_now and window_steps:  # steps since the last log point: check them before anything is saved
            pending = window_loss.clone()
            if world_size > 1:
                dist.all_reduce(pending)
            check_divergence(
                pending.item() / max(1, window_tokens), None if grad_norm is None else float(grad_norm), record=False
            )
        if checkpoint_now or eval_now:
            pause_start = time.time()
            if eval_now:  # before the checkpoint, so that its early-stopping state counts this eval
                eval_loss, eval_tokens = evaluate(
                    engine, eval_data, spec.micro_batch_size, rank, world_size, device, chunked
                )
                watch.update(eval_loss, step, spec.early_stopping_min_delta)
                if master:
                    emit("eval", batch=step, loss=eval_loss, tokens=eval_tokens)
                # The eval loss is all-reduced, so every rank takes the same decision and stops at the same step.
                stopped = step < plan.total_batches and watch.exhausted(spec.early_stopping_patience)
                if stopped:
                    checkpoint_now = True  # the final checkpoint and export, as at the planned end
                    if window_steps:
                        report_progress(pause_start)
            if checkpoint_now:
                tag = checkpoint_tag(step, plan.batches_per_epoch)
                rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if cuda else None}
                engine.save_checkpoint(
                    output_dir,
                    tag=tag,
                    client_state={"tessera": {
                        "step": step, "elapsed_s": elapsed_before + pause_start - loop_start, **rng,
                        "rows": data.rows, "global_batch_size": spec.global_batch_size, "seed": spec.seed,
                        "eval_watch": asdict(watch), "recent_losses": guard.recent,
                        "lora": lora_settings(spec),
                    }},
                    save_latest=False,  # the latest link below is ours, moved only once the export is written too
                )
                hf_path = output_dir / "huggingface" / f"ba{step}"
                save_huggingface(engine, tokenizer, hf_path, spec.zero_stage, master, lora=spec.peft == "lora")
                dist.barrier()  # every rank's shard is on disk before the link says the checkpoint exists
                if master:
                    point_latest(output_dir, tag)
                    emit("checkpoint", tag=tag, path=str(output_dir / tag), hf_path=str(hf_path))
                    # Only now, with the new checkpoint complete and linked and no save under way, and only
                    # here on rank 0: the other ranks never touch older folders.
                    if spec.save_top_k and (removed := prune(output_dir, spec.save_top_k)):
                        emit("pruned", batch=step, keep=spec.save_top_k, removed=[str(p) for p in removed])
            if checkpoint_now and spec.eval_prompts:
                responses = answer(engine, tokenizer, spec.eval_prompts, spec.seed, device, synced_generate)
                if master:
                    emit("generations", batch=step, prompts=spec.eval_prompts, responses=responses)
            window_start += time.time() - pause_start  # tokens_per_s measures training, not checkpoints or evals

    if stopped and master:
        emit(
            "stopped",
            batch=step,
            best_loss=watch.best_loss,
            best_batch=watch.best_batch,
            evals_without_improvement=watch.evals_without_improvement,
            reason=watch.reason(spec.early_stopping_min_delta),
        )
    if master:
        emit("finished", batch=step, hf_path=str(output_dir / "huggingface" / f"ba{step}"))
    dist.destroy_process_group()


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


def logits_of(model, micro_batch: MicroBatch) -> torch.Tensor:
    """fp32 logits of packed rows, each document attending only to itself.

    Given position_ids and no attention_mask, HF builds per-document masks from where the positions
    restart, but only without a KV cache: with use_cache left at the config's True it silently falls back
    to one causal mask over the whole row.
    """
    output = model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids, use_cache=False)
    return output.logits.float()


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


def lora_settings(spec: TrainSpec) -> dict | None:
    """What a checkpoint records of its LoRA adapters: enough to merge them into the base weights later (init_from)."""
    return {"rank": spec.lora_rank, "alpha": spec.lora_alpha} if spec.peft == "lora" else None


def wrap_lora(model: torch.nn.Module, spec: TrainSpec) -> torch.nn.Module:
    """The model with peft's LoRA adapters on spec.lora_target_modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise InvalidInputError(f"cannot put LoRA adapters on this model: {e}") from e


def build_optimizer(model: torch.nn.Module, spec: TrainSpec, cuda: bool) -> torch.optim.Optimizer:
    """AdamW with the spec's settings over the parameters that train (with LoRA, only the adapters).

    Weight decay only on weight matrices and embeddings (ndim >= 2), never on biases or norm weights.
    Each group carries an `lr_scale`, the multiple of the step's learning rate it learns at: 1, and
    loraplus_lr_ratio for the LoRA B matrices (LoRA+, Hayou et al. 2024).
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lora_b = spec.loraplus_lr_ratio != 1 and ".lora_B." in name
            groups.setdefault((parameter.ndim >= 2, lora_b), []).append(parameter)
    param_groups = [
        {
            "params": groups[decay, lora_b],
            "weight_decay": spec.weight_decay if decay else 0.0,
            "lr_scale": float(spec.loraplus_lr_ratio) if lora_b else 1.0,
        }
        for decay, lora_b in ((True, False), (False, False), (True, True), (False, True))
        if groups.get((decay, lora_b))
    ]
    if spec.offload_optimizer and cuda:
        # The offloaded step runs on the CPU: DeepSpeed's vectorised CPU Adam is several times torch's there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps, adamw_mode=True)
    return torch.optim.AdamW(param_groups, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps, fused=cuda)


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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
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
        spec = TrainSpec.from_json(args.spec)
        if spec.run_name != args.run_name:
            raise InvalidInputError(
                f"--run-name {args.run_name} does not match run_name {spec.run_name} in {args.spec}"
            )
        train(spec)
    except InvalidInputError as e:
        return _fail(str(e), 2)
    except TrainingDiverged as e:
        return _fail(str(e), DIVERGED_EXIT)
    except Exception as e:
        traceback.print_exc()
        return _fail(f"training failed: {type(e).__name__}: {e}", 1)
    return 0


def _fail(reason: str, code: int) -> int:
    """Make the reason the last line on stderr, where the train task looks for it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    print(" ".join(reason.split()), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
