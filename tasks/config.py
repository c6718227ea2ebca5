"""RunConfig: everything one run needs, checked on construction so bad input fails before any compute."""

import re
import secrets
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from tasks.errors import InvalidInputError


class TaskType(StrEnum):
    CHAT_COMPLETION = "CHAT_COMPLETION"
    INSTRUCTION_FINETUNE = "INSTRUCTION_FINETUNE"
    CONTINUED_PRETRAIN = "CONTINUED_PRETRAIN"


DURATION_UNITS = {"ep": "epochs", "ba": "batches", "tok": "tokens"}
_DURATION = re.compile(r"^(\d[\d_]*)(ep|ba|tok)$")
# Unity Catalog style: catalog.schema or catalog.schema.model; run names (with '-') are valid model names.
LR_RANGE = (1e-6, 1e-3)  # Nova's range for full-rank fine-tuning
LR_SCHEDULES = ("cosine", "linear", "constant")
LORA_ALPHAS = tuple(range(32, 193, 32))
_REGISTER_TO = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?$")


@dataclass(frozen=True)
class Duration:
    value: int
    unit: str  # "ep" | "ba" | "tok"

    @classmethod
    def parse(cls, text: str) -> "Duration":
        """`3ep`, `200ba` or `1_000_000tok`, as the anchor writes them."""
        match = _DURATION.match(str(text).strip())
        if not match or int(match.group(1).replace("_", "")) <= 0:
            raise InvalidInputError(
                f"training_duration {text!r} is not a duration: write a positive integer followed by "
                "ep (epochs), ba (batches) or tok (tokens), e.g. '3ep', '200ba' or '1_000_000tok'"
            )
        return cls(int(match.group(1).replace("_", "")), match.group(2))

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


@dataclass
class RunConfig:
    """The arguments of `create()` (the anchor's), plus the engine knobs a recipe may set."""

    model: str
    train_data_path: str
    register_to: str
    task_type: str = TaskType.CHAT_COMPLETION.value
    experiment_path: str = ""
    eval_data_path: str | None = None
    eval_prompts: list[str] | None = None
    custom_weights_path: str | None = None
    training_duration: str | None = "1ep"
    learning_rate: float | None = 5e-5
    context_length: int | None = None  # None: min(8192, the model's maximum), filled in by validate_paths
    allow_percentage_invalid_samples: float = 0.0  # Nova's: skip invalid records up to this share of the data
    # Engine knobs: not in the anchor's signature; recipes set them (tasks/recipe.py maps Nova's keys here).
    micro_batch_size: int = 4
    global_batch_size: int = 8
    warmup_steps: int | None = None  # None: 10% of the run, at most 20 steps
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr: float | None = None  # the floor the schedule decays to; None: 10% of learning_rate
    constant_steps: int = 0  # steps held at the peak after warmup, before decay
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    gradient_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # on the embeddings and each attention and MLP output (Megatron's)
    ffn_dropout: float = 0.0  # on the MLP activations before its down projection
    eval_every_n_steps: int | None = None  # None: eval loss at each checkpoint
    save_every_n_steps: int | None = None  # None: a checkpoint per epoch and at the end
    save_top_k: int | None = None  # keep only the newest k checkpoints; None keeps all
    early_stopping_patience: int | None = None  # stop after this many evals without improvement; None: never
    early_stopping_min_delta: float = 0.0  # what counts as an improvement of the eval loss
    log_every_n_steps: int = 1
    peft_scheme: str | None = None  # None: full fine-tuning; "lora"
    lora_rank: int = 16
    lora_alpha: int = 32  # Nova's: 32 to 192 in steps of 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"  # peft's target_modules
    loraplus_lr_ratio: float = 0.0  # LoRA+: the B matrices learn this many times faster; 0 turns it off
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU; needs zero_stage 1-3
    processes: int | None = None  # DeepSpeed ranks on this machine; None: one per GPU, 1 without a GPU
    seed: int = 17

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInputError("model is empty: pass a catalog name (see get_models()) or a local model folder")
        if not isinstance(self.train_data_path, str) or not self.train_data_path.strip():
            raise InvalidInputError("train_data_path is empty: pass the path of a .jsonl file")
        if self.task_type not in TaskType.__members__:
            raise InvalidInputError(
                f"task_type {self.task_type!r} is unknown: use one of {', '.join(TaskType)} (case-sensitive)"
            )
        if not _REGISTER_TO.match(self.register_to or ""):
            raise InvalidInputError(
                f"register_to {self.register_to!r} is malformed: write catalog.schema "
                "(the model is registered as catalog.schema.<run_name>) or catalog.schema.model_name, "
                "using letters, digits and underscores"
            )
        self.training_duration = str(Duration.parse(self.training_duration or "1ep"))
        if self.learning_rate is None:
            self.learning_rate = 5e-5
        if not _number(self.learning_rate) or not self.learning_rate > 0:
            raise InvalidInputError(f"learning_rate {self.learning_rate!r} must be a positive number, e.g. 5e-5")
        if not LR_RANGE[0] <= self.learning_rate <= LR_RANGE[1]:
            raise InvalidInputError(
                f"learning_rate {self.learning_rate!r} is outside {LR_RANGE[0]:g} to {LR_RANGE[1]:g}, the range full "
                "fine-tuning trains in (larger diverges, smaller barely moves): e.g. 5e-5"
            )
        self.learning_rate = float(self.learning_rate)
        if self.context_length is not None and (
            isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 8
        ):
            raise InvalidInputError(f"context_length {self.context_length!r} must be an integer of at least 8 tokens")
        share = self.allow_percentage_invalid_samples
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 100:
            raise InvalidInputError(
                f"allow_percentage_invalid_samples {share!r} must be a percentage from 0 (any invalid record fails "
                "the run) to 100"
            )
        self.allow_percentage_invalid_samples = float(share)
        if self.eval_prompts is not None and (
            not isinstance(self.eval_prompts, list) or not all(isinstance(p, str) and p for p in self.eval_prompts)
        ):
            raise InvalidInputError("eval_prompts must be a list of non-empty strings")
        for knob in ("micro_batch_size", "global_batch_size"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
                raise InvalidInputError(f"{knob} {getattr(self, knob)!r} must be a positive integer")
        if self.global_batch_size % self.micro_batch_size:
            raise InvalidInputError(
                f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                f"{self.micro_batch_size} (gradient accumulation takes whole micro batches)"
            )
        self._check_engine_knobs()
        self._check_deepspeed()

    def _check_deepspeed(self) -> None:
        if _int(self.zero_stage) is None or self.zero_stage not in (0, 1, 2, 3):
            raise InvalidInputError(f"zero_stage {self.zero_stage!r} must be 0, 1, 2 or 3")
        if not isinstance(self.offload_optimizer, bool):
            raise InvalidInputError(f"offload_optimizer {self.offload_optimizer!r} must be true or false")
        if self.offload_optimizer and self.zero_stage == 0:
            raise InvalidInputError(
                "offload_optimizer needs zero_stage 1, 2 or 3: ZeRO-Offload moves the partitioned optimizer states "
                "to the CPU; set zero_stage 2 (the usual choice)"
            )
        if self.processes is not None:
            if _int(self.processes) is None or self.processes < 1:
                raise InvalidInputError(f"processes {self.processes!r} must be a positive integer, or null for auto")
            if self.global_batch_size % (self.micro_batch_size * self.processes):
                raise InvalidInputError(
                    f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                    f"{self.micro_batch_size} x processes {self.processes}: each step every process takes whole "
                    "micro batches"
                )

    def _check_engine_knobs(self) -> None:
        """Nova's ranges, and what the engine can do; each message names the field."""
        if self.warmup_steps is not None and (_int(self.warmup_steps) is None or not 1 <= self.warmup_steps <= 20):
            raise InvalidInputError(f"warmup_steps {self.warmup_steps!r} must be an integer from 1 to 20")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidInputError(f"lr_schedule {self.lr_schedule!r} is unknown: use one of {', '.join(LR_SCHEDULES)}")
        if self.min_lr is not None and (not _number(self.min_lr) or not 0 <= self.min_lr < self.learning_rate):
            raise InvalidInputError(
                f"min_lr {self.min_lr!r} must be at least 0 and below learning_rate ({self.learning_rate:g})"
            )
        for name in ("constant_steps", "log_every_n_steps", "eval_every_n_steps", "save_every_n_steps", "save_top_k",
                     "early_stopping_patience"):
            value, least = getattr(self, name), 0 if name == "constant_steps" else 1
            if value is not None and (_int(value) is None or value < least):
                raise InvalidInputError(f"{name} {value!r} must be an integer of at least {least}")
        if self.eval_every_n_steps is not None and not self.eval_data_path:
            raise InvalidInputError(
                f"eval_every_n_steps {self.eval_every_n_steps} needs eval_data_path: give held-out data to evaluate on"
            )
        if self.early_stopping_patience is not None and not self.eval_data_path:
            raise InvalidInputError("early_stopping_patience needs eval_data_path: it watches the eval loss")
        if not _number(self.early_stopping_min_delta) or self.early_stopping_min_delta < 0:
            raise InvalidInputError(f"early_stopping_min_delta {self.early_stopping_min_delta!r} must be at least 0")
        self._check_lora()
        if not _number(self.weight_decay) or not 0 <= self.weight_decay <= 1:
            raise InvalidInputError(f"weight_decay {self.weight_decay!r} must be from 0 to 1, e.g. 0.01")
        betas = self.adam_betas
        if not isinstance(betas, list | tuple) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            raise InvalidInputError(f"adam_betas {betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        self.adam_betas = [float(b) for b in betas]
        if not _number(self.adam_eps) or not 0 < self.adam_eps < 1:
            raise InvalidInputError(f"adam_eps {self.adam_eps!r} must be a small positive number, e.g. 1e-8")
        if not _number(self.gradient_clip) or self.gradient_clip < 0:
            raise InvalidInputError(f"gradient_clip {self.gradient_clip!r} must be at least 0 (0 turns clipping off)")
        for name in ("attention_dropout", "hidden_dropout", "ffn_dropout"):
            if not _number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise InvalidInputError(f"{name} {getattr(self, name)!r} must be from 0 to below 1, e.g. 0.1")

    def _check_lora(self) -> None:
        if self.peft_scheme not in (None, "lora"):
            raise InvalidInputError(f"peft_scheme {self.peft_scheme!r} is unknown: use null (full fine-tuning) or lora")
        if _int(self.lora_rank) is None or not 1 <= self.lora_rank <= 256:
            raise InvalidInputError(f"lora_rank {self.lora_rank!r} must be an integer from 1 to 256, e.g. 16")
        if _int(self.lora_alpha) is None or self.lora_alpha not in LORA_ALPHAS:
            raise InvalidInputError(
                f"lora_alpha {self.lora_alpha!r} must be one of {', '.join(map(str, LORA_ALPHAS))} (Nova's range)"
            )
        if not _number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise InvalidInputError(f"lora_dropout {self.lora_dropout!r} must be from 0 to below 1, e.g. 0.01")
        targets = self.lora_target_modules
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise InvalidInputError(
                f"lora_target_modules {targets!r} must be 'all-linear' or a list of module names, e.g. [q_proj, v_proj]"
            )
        if not _number(self.loraplus_lr_ratio) or not 0 <= self.loraplus_lr_ratio <= 100:
            raise InvalidInputError(
                f"loraplus_lr_ratio {self.loraplus_lr_ratio!r} must be from 0 (LoRA+ off) to 100, e.g. 8"
            )

    @property
    def duration(self) -> Duration:
        return Duration.parse(self.training_duration)

    def registered_model_name(self, run_name: str) -> str:
        """`catalog.schema.<run_name>` unless register_to names the model itself."""
        return self.register_to if self.register_to.count(".") == 2 else f"{self.register_to}.{run_name}"

    def to_params(self) -> dict:
        """The flow's parameters: JSON, so `prefect deployment run --params` can send the same."""
        return asdict(self)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_name_for(model: str, task_type: str) -> str:
    """The anchor's names: `ift-<model>-<6 chars>` or `contd-pretrain-<model>-<6 chars>`, RFC 1123, <= 63 chars."""
    prefix = "contd-pretrain" if task_type == TaskType.CONTINUED_PRETRAIN else "ift"
    base = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-") or "model"
    suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
    base = base[: 63 - len(prefix) - len(suffix) - 2].strip("-")
    return f"{prefix}-{base}-{suffix}"
