"""What one training run does: the contract between the train task and the worker it launches.

The train task writes a `TrainSpec` to JSON and starts `python -m tasks.training.worker --spec ...`;
the worker reads it back. Every value is checked when the spec is built, on either side, so a bad
value fails with a message that names the field instead of deep inside DeepSpeed.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from tasks.errors import InvalidInputError

DurationUnit = Literal["ep", "ba", "tok"]
DURATION_UNITS = ("ep", "ba", "tok")  # epochs over the rows, optimizer steps, tokens seen
Schedule = Literal["cosine", "linear", "constant"]
PeftMethod = Literal["lora"]
PEFT_METHODS = ("lora",)
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_MIN_LR_RATIO = 0.1  # min_lr None: the decay ends at this fraction of learning_rate


@dataclass
class TrainSpec:
    run_name: str
    model_dir: Path  # a Hugging Face model folder (config.json, weights, tokenizer)
    data_dir: Path  # a prepared dataset: input_ids.npy, labels.npy, position_ids.npy, meta.json
    output_dir: Path  # checkpoints root: ep{E}-ba{B}/, huggingface/ba{B}/, latest-sharded-rank0.symlink
    duration_value: int = 1
    duration_unit: DurationUnit = "ep"
    learning_rate: float = 5e-5  # peak, reached after warmup_steps
    warmup_steps: int = 0  # linear warmup from learning_rate / warmup_steps to the peak
    schedule: Schedule = "cosine"  # after warmup and constant_steps: cosine or linear decay to min_lr, or none
    min_lr: float | None = None  # where the decay ends; None: DEFAULT_MIN_LR_RATIO x learning_rate
    constant_steps: int = 0  # steps held at the peak after warmup, before the decay starts
    weight_decay: float = 0.0  # AdamW's, on matrices and embeddings (ndim >= 2): never on biases or norm weights
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    eps: float = 1e-8  # AdamW
    micro_batch_size: int = 1  # rows per forward/backward on each rank
    global_batch_size: int = 8  # rows per optimizer step over all ranks; accumulation makes up the rest
    seed: int = 42
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (zero_stage 1-3)
    processes: int = 1  # ranks on this machine: above 1 the train task starts the worker with the deepspeed launcher
    chunked_loss: bool = True  # the LM head's loss a chunk of rows at a time where it computes the same (see worker)
    gradient_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    attention_dropout: float = 0.0  # set on the model's config (models whose config has attention_dropout)
    hidden_dropout: float = 0.0  # on the embeddings and on each attention and MLP output, before the residual add
    ffn_dropout: float = 0.0  # inside each MLP, on the activations before its down projection
    eval_data_dir: Path | None = None  # same format as data_dir; its loss is reported as eval_every_n_batches says
    eval_every_n_batches: int | None = None  # None: eval loss at each checkpoint; N: every N steps and at the end
    eval_prompts: list[str] = field(default_factory=list)  # answered before training and at each checkpoint
    save_every_n_batches: int | None = None  # None: at the end of each epoch (and always at the end)
    save_top_k: int | None = None  # keep only the newest k checkpoints (and HF exports); None: keep them all
    early_stopping_patience: int | None = None  # stop after this many evals without improvement; None: never
    early_stopping_min_delta: float = 0.0  # an eval improves only when it beats the best by more than this
    log_every_n_batches: int = 1
    # Divergence guard, checked at each log point: a non-finite loss or grad norm always stops the run; so does a
    # logged loss over loss_spike_factor x the mean of the recent logged losses (after a few); None: no spike check.
    loss_spike_factor: float | None = 10.0
    peak_flops: float | None = None  # one device's peak FLOP/s for the MFU; None: H100 bf16 on CUDA, no MFU on CPU
    init_from: Path | None = None  # an ep*-ba* folder (or the symlink) to take the weights from
    resume: bool = True  # continue from output_dir/latest-sharded-rank0.symlink when it exists
    # Parameter-efficient fine-tuning: None trains every weight; "lora" freezes the base model and trains
    # low-rank adapters (peft's LoRA) on lora_target_modules. Exports are merged into the base weights.
    peft: PeftMethod | None = None
    lora_rank: int = 16  # r, 1-256
    lora_alpha: int = 32  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapter's input, in [0, 1)
    lora_target_modules: list[str] | str = "all-linear"  # peft's target_modules: names, a regex, or all-linear
    loraplus_lr_ratio: float = 1.0  # LoRA+: the B matrices learn at this multiple of the learning rate; 1: plain LoRA

    def __post_init__(self):
        if not isinstance(self.run_name, str) or not self.run_name.strip() or "\n" in self.run_name:
            raise InvalidInputError(f"run_name must be a non-empty single-line string, got {self.run_name!r}")
        for name in ("model_dir", "data_dir", "output_dir", "eval_data_dir", "init_from"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, Path)) or not str(value):
                    raise InvalidInputError(f"{name} must be a path, got {value!r}")
                setattr(self, name, Path(value))
        if self.duration_unit not in DURATION_UNITS:
            raise InvalidInputError(
                f"duration_unit must be one of {', '.join(DURATION_UNITS)} (epochs, batches, tokens), "
                f"got {self.duration_unit!r}"
            )
        _require_int("duration_value", self.duration_value, minimum=1)
        _require_int("warmup_steps", self.warmup_steps, minimum=0)
        _require_int("micro_batch_size", self.micro_batch_size, minimum=1)
        _require_int("global_batch_size", self.global_batch_size, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_int("log_every_n_batches", self.log_every_n_batches, minimum=1)
        _require_int("constant_steps", self.constant_steps, minimum=0)
        if self.save_every_n_batches is not None:
            _require_int("save_every_n_batches", self.save_every_n_batches, minimum=1)
        if self.eval_every_n_batches is not None:
            _require_int("eval_every_n_batches", self.eval_every_n_batches, minimum=1)
            if self.eval_data_dir is None:
                raise InvalidInputError(
                    f"eval_every_n_batches ({self.eval_every_n_batches}) needs eval_data_dir: there is no eval data "
                    "to compute a loss on"
                )
        if self.save_top_k is not None:
            _require_int("save_top_k", self.save_top_k, minimum=1)
        if self.early_stopping_patience is not None:
            _require_int("early_stopping_patience", self.early_stopping_patience, minimum=1)
            if self.eval_data_dir is None:
                raise InvalidInputError(
                    f"early_stopping_patience ({self.early_stopping_patience}) needs eval_data_dir: early stopping "
                    "watches the eval loss"
                )
        if self.loss_spike_factor is not None and (
            not _is_number(self.loss_spike_factor) or self.loss_spike_factor < 1
        ):
            raise InvalidInputError(
                f"loss_spike_factor must be a number >= 1 (e.g. 10), or null to turn the loss-spike check off; "
                f"got {self.loss_spike_factor!r}"
            )
        if self.peak_flops is not None and (not _is_number(self.peak_flops) or self.peak_flops <= 0):
            raise InvalidInputError(
                f"peak_flops must be a number > 0 (one device's peak FLOP/s, e.g. 989e12 for an H100 in bf16), "
                f"or null for the default; got {self.peak_flops!r}"
            )
        if not _is_number(self.early_stopping_min_delta) or self.early_stopping_min_delta < 0:
            raise InvalidInputError(
                f"early_stopping_min_delta must be a number >= 0 (0: any decrease counts as an improvement), "
                f"got {self.early_stopping_min_delta!r}"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise InvalidInputError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}): the difference is made up by gradient accumulation"
            )
        if not isinstance(self.zero_stage, int) or isinstance(self.zero_stage, bool) or self.zero_stage not in range(4):
            raise InvalidInputError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if not isinstance(self.offload_optimizer, bool):
            raise InvalidInputError(f"offload_optimizer must be true or false, got {self.offload_optimizer!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise InvalidInputError(
                "offload_optimizer needs zero_stage 1, 2 or 3: ZeRO-Offload moves the partitioned optimizer states to "
                "the CPU; set zero_stage: 2 (the usual choice) or turn offload_optimizer off"
            )
        _require_int("processes", self.processes, minimum=1)
        if not _is_number(self.learning_rate) or not 0 < self.learning_rate < 1:
            raise InvalidInputError(f"learning_rate must be a number in (0, 1), e.g. 5e-5; got {self.learning_rate!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidInputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.min_lr is not None and (
            not _is_number(self.min_lr) or not 0 <= self.min_lr < self.learning_rate
        ):
            raise InvalidInputError(
                f"min_lr must be a number >= 0 and below learning_rate ({self.learning_rate}), or null for "
                f"{DEFAULT_MIN_LR_RATIO:g} x learning_rate; got {self.min_lr!r}"
            )
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise InvalidInputError(f"weight_decay must be a number >= 0 (0 turns it off), got {self.weight_decay!r}")
        if (
            not isinstance(self.betas, (list, tuple))
            or len(self.betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise InvalidInputError(f"betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {self.betas!r}")
        self.betas = tuple(self.betas)  # JSON brings a list back
        if not _is_number(self.eps) or self.eps <= 0:
            raise InvalidInputError(f"eps must be a number > 0, e.g. 1e-8; got {self.eps!r}")
        if not _is_number(self.gradient_clip) or self.gradient_clip < 0:
            raise InvalidInputError(f"gradient_clip must be >= 0 (0 turns clipping off), got {self.gradient_clip!r}")
        for name in ("attention_dropout", "hidden_dropout", "ffn_dropout"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise InvalidInputError(
                    f"{name} must be a number in [0, 1) (0 turns it off), got {getattr(self, name)!r}"
                )
        if not isinstance(self.eval_prompts, list) or not all(isinstance(p, str) and p for p in self.eval_prompts):
            raise InvalidInputError(f"eval_prompts must be a list of non-empty strings, got {self.eval_prompts!r}")
        if not isinstance(self.chunked_loss, bool):
            raise InvalidInputError(f"chunked_loss must be true or false, got {self.chunked_loss!r}")
        if not isinstance(self.resume, bool):
            raise InvalidInputError(f"resume must be true or false, got {self.resume!r}")
        if self.peft is not None and self.peft not in PEFT_METHODS:
            raise InvalidInputError(
                f"peft must be one of {', '.join(PEFT_METHODS)}, or null to train every weight; got {self.peft!r}"
            )
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or not 1 <= self.lora_rank <= 256:
            raise InvalidInputError(f"lora_rank must be an integer from 1 to 256, got {self.lora_rank!r}")
        _require_int("lora_alpha", self.lora_alpha, minimum=1)
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise InvalidInputError(
                f"lora_dropout must be a number in [0, 1) (0 turns it off), got {self.lora_dropout!r}"
            )
        targets = self.lora_target_modules
        if not (isinstance(targets, str) and targets.strip()) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t.strip() for t in targets)
        ):
            raise InvalidInputError(
                "lora_target_modules must be a non-empty list of module names (e.g. [\"q_proj\", \"v_proj\"]), "
                f"a regular expression, or \"all-linear\"; got {targets!r}"
            )
        if not _is_number(self.loraplus_lr_ratio) or self.loraplus_lr_ratio < 1:
            raise InvalidInputError(
                f"loraplus_lr_ratio must be a number >= 1 (1: plain LoRA, e.g. 16 for LoRA+), "
                f"got {self.loraplus_lr_ratio!r}"
            )

    @property
    def final_lr(self) -> float:
        """The learning rate the decay ends at: min_lr, or its default."""
        return DEFAULT_MIN_LR_RATIO * self.learning_rate if self.min_lr is None else self.min_lr

    def to_json(self, path: Path | str) -> None:
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        Path(path).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path | str) -> "TrainSpec":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read the training spec {path}: {e}") from e
        if not isinstance(values, dict):
            raise InvalidInputError(f"the training spec {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(values.keys() - known):
            raise InvalidInputError(
                f"unknown field(s) {', '.join(unknown)} in {path}: known are {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as e:  # a required field is missing
            raise InvalidInputError(f"the training spec {path} is incomplete: {e}") from e


def _require_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
