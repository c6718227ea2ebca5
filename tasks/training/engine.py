"""Building what trains: this rank's place in the process group, the model (with its dropouts and LoRA adapters),
AdamW's parameter groups, and the DeepSpeed engine around them."""

import warnings
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from tasks.config import Model, TrainingConfig
from tasks.errors import InvalidInputError
from tasks.training.checkpoints import check_same_architecture, load_weights
from tasks.training.dropout import add_dropouts

# DeepSpeed calls torch.distributed functions that torch has renamed; the warning would repeat every step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def accumulation_steps(training: TrainingConfig, world_size: int) -> int:
    """Micro batches per optimizer step on each rank.

    config.py refuses a global batch the processes cannot share only when deepspeed.processes is given; left null
    (one per GPU) the count is known once the ranks have started, so this is the check that always applies."""
    rows_per_micro_step = training.micro_batch_size * world_size
    if training.global_batch_size % rows_per_micro_step:
        raise InvalidInputError(
            f"global_batch_size ({training.global_batch_size}) must be a multiple of micro_batch_size "
            f"({training.micro_batch_size}) x processes ({world_size}) = {rows_per_micro_step}"
        )
    return training.global_batch_size // rows_per_micro_step


def join_process_group(local_rank: int, seed: int) -> tuple[torch.device, bool]:
    """Join the process group; returns this rank's device (its GPU, or the CPU) and whether it trains in bf16."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # The same seed on every rank keeps their RNG streams identical, so rank 0's state stands for all in a checkpoint.
    torch.manual_seed(seed)
    return device, bf16


def model_config(model_dir: Path, attention_dropout: float) -> PreTrainedConfig:
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


def load_model(model_dir: Path, config: PreTrainedConfig, settings: Model, init_from: Path | None) -> torch.nn.Module:
    """The model from the base folder, with the weights of another run's checkpoint when `init_from` is given, then
    its LoRA adapters and dropouts. Loaded in fp32 on every rank; with bf16, DeepSpeed keeps fp32 master weights in
    the optimizer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    if init_from:
        weights = load_weights(init_from)
        check_same_architecture(weights, model, init_from, model_dir)
        model.load_state_dict(weights)
        del weights
    if settings.peft.peft_scheme == "lora":
        model = wrap_lora(model, settings)
    # After LoRA, so the adapters see the dropped inputs.
    add_dropouts(model, settings.hidden_dropout, settings.ffn_dropout)
    return model


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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate on every parameter group, times the group's lr_scale (see build_optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+: the B matrices' groups learn faster


def build_engine(model: torch.nn.Module, training: TrainingConfig, device: torch.device, bf16: bool,
                 accumulation: int) -> tuple[deepspeed.DeepSpeedEngine, torch.optim.Optimizer, bool]:
    """The DeepSpeed engine around the model, moved to `device`, and AdamW; and whether the step clips (and
    measures) the gradients itself."""
    cuda, zero_stage = device.type == "cuda", training.deepspeed.zero_stage
    model.to(device)
    optimizer = build_optimizer(model, training.model, training.deepspeed.offload_optimizer and cuda, cuda)
    # DeepSpeed reports the grad norm only from its ZeRO and mixed-precision optimizers; in plain fp32
    # stage 0 we clip ourselves (clip_grad_norm_ returns the norm).
    clip_here = zero_stage == 0 and not bf16
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_batch_size": training.global_batch_size,
            "train_micro_batch_size_per_gpu": training.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
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
    return engine, optimizer, clip_here
