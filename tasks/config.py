"""RunConfig: one run's settings in one nested, typed config whose dict and YAML form is the recipe.

    run:              model_name_or_path, train_data_path, eval_data_path, register_to, task_type, ...
    training_config:  max_length, global_batch_size, micro_batch_size, save_steps, save_top_k, seed,
                      early_stopping {monitor, patience, min_delta},
                      deepspeed {zero_stage, offload_optimizer, processes, nodes},
                      trainer {max_epochs | max_steps | max_tokens, val_check_interval, gradient_clip_val,
                               log_every_n_steps},
                      model {attention_dropout, hidden_dropout, ffn_dropout,
                             optim {name, adam_w_mode, lr, eps, weight_decay, betas,
                                    sched {name, warmup_steps, constant_steps, min_lr}},
                             peft {peft_scheme, lora_tuning {alpha, adapter_dropout, loraplus_lr_ratio, rank,
                                                             target_modules}},
                             dpo_cfg {beta, loss_type, simpo_gamma, label_smoothing, rpo_alpha}}

Laid out key for key like Amazon Nova's SFT and DPO recipes (plus Tessera's own `deepspeed` section and `max_tokens`);
the keys of Nova's that are laid out otherwise here, or mean nothing here, are read by tasks.nova.
Ranges and allowed values live in the types, the few rules that join two settings in validators; each
field's docstring is its description in the Prefect UI's form. `tasks.recipe` builds a RunConfig from what a
user wrote (a recipe, the anchor's arguments, path overrides) and words its errors.
"""

import re
import secrets
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tasks.errors import InvalidInputError


class TaskType(StrEnum):
    CHAT_COMPLETION = "CHAT_COMPLETION"
    INSTRUCTION_FINETUNE = "INSTRUCTION_FINETUNE"
    CONTINUED_PRETRAIN = "CONTINUED_PRETRAIN"
    DPO = "DPO"  # preference pairs (Nova's DPO recipes too), trained with the DPO loss (training_config.model.dpo_cfg)


class Rule(ValueError):
    """A rule joining settings was broken. `message` has a `{}` for each of `paths` (relative to the section
    whose validator raised it), filled with each setting's name as the user wrote it."""

    def __init__(self, message: str, *paths: str):
        super().__init__(message.format(*paths))
        self.message, self.paths = message, paths


class Section(BaseModel):
    """A recipe section: unknown keys refused, values of the declared type only (no "5" for 5, no 1.0 for 1), no
    NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_their_defaults(cls, data: Any) -> Any:
        """`peft:` with nothing under it (YAML's null) means the section's defaults, as if it were left out."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if not (v is None and k in cls.model_fields and _section_of(cls.model_fields[k].annotation))}


def _section_of(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _no_control_characters(allowed: str = ""):
    """A check that the text holds no control characters but `allowed`: they hide in names and paths, and break
    file names, logs and tags."""

    def check(text: str) -> str:
        at = next((i for i, c in enumerate(text) if unicodedata.category(c) == "Cc" and c not in allowed), None)
        if at is not None:
            raise PydanticCustomError("control_character", "must not hold control characters ({char} at position "
                                      "{at})", {"char": repr(text[at]), "at": at})
        return text

    return AfterValidator(check)


def _workspace_path(path: str) -> str:
    """An MLflow experiment path as Databricks takes one: absolute, without `.` or `..` segments (with a local store
    the experiment's artifact folder is named from it)."""
    segments = path.split("/")
    if segments[0] or any(s in ("", ".", "..") for s in segments[1:]):
        raise PydanticCustomError("workspace_path", "must be an absolute workspace path without empty, '.' or '..' "
                                  "segments, e.g. '/Users/<you>/<name>'")
    return path


Name = Annotated[str, Field(min_length=1, max_length=255), _no_control_characters()]
"""A name (a model's, a run's, a module's)."""
PathText = Annotated[str, Field(min_length=1, max_length=4096), _no_control_characters()]
"""A file, folder, URI or table name; 4096 is Linux's longest path."""
ExperimentPath = Annotated[str, Field(min_length=2, max_length=500), _no_control_characters(), # MLflow's limit
                           AfterValidator(_workspace_path)]


def _tracking_server(url: str) -> str:
    """An MLflow tracking server's URL, without a login in it: the URL is logged with the run's parameters."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PydanticCustomError("tracking_server", "must be an MLflow tracking server's http(s) URL, e.g. "
                                  "'http://mlflow.internal:5000' (Tessera's own store is MLFLOW_TRACKING_URI, set "
                                  "where its services and workers run)")
    if parsed.username or parsed.password:
        raise PydanticCustomError("tracking_server_login", "must not hold a login (the URL is logged with the run's "
                                  "parameters): put it in ~/.netrc on the machines that run workers")
    return url.rstrip("/")


TrackingServer = Annotated[str, Field(max_length=2048), _no_control_characters(), AfterValidator(_tracking_server)]
Prompt = Annotated[str, Field(max_length=20_000), _no_control_characters(allowed="\n\r\t")]
# catalog.schema(.model): Unity Catalog's names, each at most 255 characters.
REGISTERED_MODEL = r"^[A-Za-z0-9_]{1,255}\.[A-Za-z0-9_]{1,255}\.[A-Za-z0-9_-]{1,255}$"
REGISTER_TO = r"^[A-Za-z0-9_]{1,255}\.[A-Za-z0-9_]{1,255}(\.[A-Za-z0-9_-]{1,255})?$"


class Run(Section):
    """What to train, on what, and where the result goes: the anchor's create() arguments."""

    name: Name | None = None
    """Describes the job (Nova's run.name); Tessera names each run itself."""
    model_name_or_path: PathText = Field(examples=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    """A catalog name (fm.get_models()) or a local Hugging Face model folder."""
    train_data_path: PathText = Field(validation_alias=AliasChoices("train_data_path", "data_s3_path"),
                                 examples=["examples/data/tessera_chat.jsonl"])
    """A .jsonl file, s3://, dbfs:/Volumes/..., a Hugging Face dataset <name>/<split> or a Delta table
    <catalog>.<schema>.<table>; .txt files for CONTINUED_PRETRAIN (Nova's data_s3_path also works)."""
    eval_data_path: PathText | None = Field(None, validation_alias=AliasChoices("eval_data_path",
                                                                                "validation_data_s3_path"))
    """Held-out data, any form train_data_path takes; its loss is reported at each checkpoint."""
    register_to: str = Field(pattern=REGISTER_TO, examples=["main.demo"])
    """catalog.schema (registered as catalog.schema.<run name>) or catalog.schema.model_name, in letters, digits
    and underscores, each at most 255."""
    task_type: TaskType = Field(TaskType.CHAT_COMPLETION, strict=False)
    """CHAT_COMPLETION, INSTRUCTION_FINETUNE, CONTINUED_PRETRAIN or DPO (preference pairs; case-sensitive)."""
    experiment_path: ExperimentPath | None = Field(None, examples=["/Users/me/assistant"])
    """The MLflow experiment, an absolute workspace path; default /Users/<user>/<run name>."""
    eval_prompts: list[Prompt] | None = Field(None, max_length=100, examples=[["What is Tessera?"]])
    """Prompts answered before training and at each checkpoint, logged to MLflow."""
    custom_weights_path: PathText | None = None
    """An earlier run's checkpoint to start from, as get_checkpoints() names it (an ep*-ba* folder or its
    latest-sharded-rank0.symlink; local, file://, s3:// or an MLflow artifact URI)."""
    allow_percentage_invalid_samples: float = Field(0.0, ge=0, le=100, examples=[5])
    """The share of invalid records (0-100) to skip instead of failing the run."""
    mlflow_run_name: Name | None = None
    """The MLflow run's display name (Nova's key); null: the run's name."""
    mlflow_tracking_uri: TrackingServer | None = None
    """An MLflow tracking server of yours that the run's parameters, metrics and end are logged to as well (Nova's
    key); Tessera's own store keeps its checkpoints and registered model."""

    @model_validator(mode="after")
    def _prompts_say_something(self) -> Self:
        if self.eval_prompts is not None and not all(p.strip() for p in self.eval_prompts):
            raise Rule("{} must be non-empty strings, e.g. ['What is Tessera?']", "eval_prompts")
        return self


class EarlyStopping(Section):
    """Stop when the eval loss stops improving (needs run.eval_data_path)."""

    monitor: Literal["val_loss"] = "val_loss"
    """What is watched; only the eval loss can be."""
    patience: int | None = Field(None, ge=1, le=10**6, examples=[3])
    """Evaluations without improvement before the run stops; null: never stop early."""
    min_delta: float = Field(0.0, ge=0)
    """How much an eval loss must beat the best so far to count as an improvement."""


class DeepSpeed(Section):
    """How the DeepSpeed engine runs (Tessera's own section; in Nova the service decides)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 1 partitions optimizer states over the processes, 2 gradients too, 3 the weights too."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer states and their step on the CPU (needs zero_stage 1-3)."""
    processes: int | None = Field(None, ge=1, le=1024)
    """DeepSpeed ranks on each machine; null: one per GPU, 1 without a GPU."""
    nodes: int = Field(1, ge=1, le=64)
    """Machines the run trains on at once, each a worker of the work pool (DeepSpeed's multi-node launch)."""

    @model_validator(mode="after")
    def _offload_needs_partitions(self) -> Self:
        if self.offload_optimizer and self.zero_stage == 0:
            raise Rule("{} needs {} 1, 2 or 3: ZeRO-Offload moves the partitioned optimizer states to the CPU; "
                       "set zero_stage 2 (the usual choice)", "offload_optimizer", "zero_stage")
        return self

    @model_validator(mode="after")
    def _nodes_need_processes(self) -> Self:
        if self.nodes > 1 and self.processes is None:
            raise Rule(f"{{}} {self.nodes} needs {{}}: the ranks on each machine, the same on every one "
                       "(its number of GPUs; 1 on the CPU)", "nodes", "processes")
        return self


DURATION_KEYS = {"ep": "max_epochs", "ba": "max_steps", "tok": "max_tokens"}


class Trainer(Section):
    """How long to train, and how often to evaluate and log."""

    max_epochs: int | None = Field(None, ge=1, le=10_000, examples=[2])
    """Passes over the training data. Give one of max_epochs, max_steps, max_tokens; none: 1 epoch."""
    max_steps: int | None = Field(None, ge=1, le=10**9, examples=[200])
    """Optimizer steps."""
    max_tokens: int | None = Field(None, ge=1, le=10**15, examples=[1_000_000])
    """Token positions (rows x context length), rounded up to whole steps (Tessera's own key)."""
    val_check_interval: int | None = Field(None, ge=1, le=10**9, examples=[50])
    """Eval loss every this many steps and at the end (needs run.eval_data_path); null: at each checkpoint."""
    gradient_clip_val: float = Field(1.0, ge=0)
    """Largest global gradient norm; 0 turns clipping off."""
    log_every_n_steps: int = Field(1, ge=1, le=10**9)
    """Steps between progress reports (a TRAIN_UPDATED event and MLflow metrics)."""

    @model_validator(mode="after")
    def _one_duration(self) -> Self:
        given = [key for key in DURATION_KEYS.values() if getattr(self, key) is not None]
        if len(given) == 2:
            raise Rule("give {} or {}, not both", *given)
        if len(given) == 3:
            raise Rule("give only one of {}, {} and {}", *given)
        return self


class Sched(Section):
    """The learning-rate schedule: linear warmup, an optional plateau, then decay to min_lr."""

    name: Literal["cosine", "linear", "constant"] = "cosine"
    """The decay after warmup and constant_steps; constant: none."""
    warmup_steps: int | None = Field(None, ge=1, le=10**9, examples=[15])
    """Steps of linear warmup (Nova 2.0 advises about 15% of max_steps; one as long as the run never reaches lr);
    null: 10% of the run, at most 20."""
    constant_steps: int = Field(0, ge=0, le=10**9)
    """Steps held at the peak after warmup, before the decay starts."""
    min_lr: float | None = Field(None, ge=0, examples=[3e-5])
    """Where the decay ends, below lr; null: a tenth of lr."""


DEFAULT_MIN_LR_RATIO = 0.1  # min_lr null: the decay ends at this fraction of lr


class Optim(Section):
    """The optimizer: AdamW, whichever of Nova's names is given."""

    name: Literal["adamw", "distributed_fused_adam", "fused_adam"] = "adamw"
    """Nova's optimizer names; all train with AdamW here."""
    adam_w_mode: Literal[True] = True
    """Decoupled weight decay (AdamW); the only mode Tessera trains in."""
    lr: float = Field(5e-5, ge=1e-6, le=1e-3, examples=[5e-5])
    """The peak learning rate, reached after warmup: 1e-6 to 1e-3, the range full fine-tuning trains in (larger
    diverges, smaller barely moves)."""
    eps: float = Field(1e-8, gt=0, lt=1)
    """AdamW's epsilon."""
    weight_decay: float = Field(0.0, ge=0, le=1, examples=[0.01])
    """AdamW's decoupled weight decay, on weight matrices and embeddings only."""
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field([0.9, 0.95], min_length=2, max_length=2,
                                                             examples=[[0.9, 0.95]])
    """AdamW's two betas, each in [0, 1)."""
    sched: Sched = Sched()

    @model_validator(mode="after")
    def _rates_fit(self) -> Self:
        if self.sched.min_lr is not None and self.sched.min_lr >= self.lr:
            raise Rule(f"{{}} {self.sched.min_lr:g} must be below {{}} ({self.lr:g}), where the decay starts",
                       "sched.min_lr", "lr")
        return self

    @property
    def final_lr(self) -> float:
        """The learning rate the decay ends at."""
        return DEFAULT_MIN_LR_RATIO * self.lr if self.sched.min_lr is None else self.sched.min_lr


class LoraTuning(Section):
    """LoRA adapters (peft): rank, scale, dropout, where they go, and LoRA+."""

    alpha: Literal[32, 64, 96, 128, 160, 192] = 32
    """The adapters' output is scaled by alpha / rank; 32 to 192 in steps of 32 (Nova's)."""
    adapter_dropout: float = Field(0.0, ge=0, lt=1, examples=[0.01])
    """Dropout on each adapter's input."""
    loraplus_lr_ratio: float = Field(0.0, ge=0, le=100, examples=[8.0])
    """LoRA+: the B matrices learn this many times faster than the A matrices; 0 turns it off (Nova's)."""
    rank: int = Field(16, ge=1, le=256)
    """The adapters' rank r, 1-256."""
    target_modules: Literal["all-linear"] | list[Name] = Field("all-linear", examples=[["q_proj", "v_proj"]])
    """all-linear, or a list of module names, e.g. [q_proj, v_proj]."""

    @model_validator(mode="after")
    def _named_modules(self) -> Self:
        if isinstance(self.target_modules, list) and not (self.target_modules and all(self.target_modules)):
            raise Rule("{} must be all-linear or a non-empty list of module names, e.g. [q_proj, v_proj]",
                       "target_modules")
        return self

    @property
    def b_lr_scale(self) -> float:
        """The multiple of the learning rate the B matrices learn at: the ratio, 1 when LoRA+ is off."""
        return self.loraplus_lr_ratio or 1.0


class Peft(Section):
    """Parameter-efficient fine-tuning: null trains every weight; lora trains adapters only."""

    peft_scheme: Literal["lora"] | None = None
    """null: full fine-tuning; lora: freeze the model and train LoRA adapters, merged into the export."""
    lora_tuning: LoraTuning = LoraTuning()


class DpoCfg(Section):
    """Direct preference optimization (Nova's dpo_cfg), for task_type DPO."""

    beta: float = Field(0.1, ge=0.001, le=10)
    """How strongly the preferences are enforced against the starting model: 0.001-0.1 (Nova's range); with simpo,
    the scale of the answers' length-averaged log-probabilities, up to 10 (SimPO's authors use 2-2.5)."""
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO's own loss (Rafailov et al. 2023); ipo: IPO's squared loss on length-averaged log-probabilities
    (Azar et al. 2023), as TRL's loss_type; simpo: SimPO (Meng et al. 2024), length-averaged and with no reference
    model at all, as TRL's CPO trainer with loss_type simpo."""
    simpo_gamma: float = Field(0.5, ge=0, le=10)
    """simpo only: the margin the chosen answer's reward must beat the rejected one's by (TRL's simpo_gamma)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, examples=[0.1])
    """sigmoid and simpo: the assumed share of pairs whose labels are flipped (conservative DPO); 0 turns it off."""
    rpo_alpha: float = Field(0.0, ge=0, le=10, examples=[1.0])
    """The weight of the chosen answers' own loss (mean token negative log-likelihood) added to the preference loss
    (RPO, Pang et al. 2024; TRL's rpo_alpha), so the policy learns to write the chosen answers, not only to rank them
    above the rejected; 0 turns it off."""

    @model_validator(mode="after")
    def _beta_and_smoothing_fit_the_loss(self) -> Self:
        if self.beta > 0.1 and self.loss_type != "simpo":
            raise Rule(f"{{}} {self.beta:g} must be at most 0.1 (Nova's range, 0.001-0.1) with {{}} {self.loss_type}; "
                       "only simpo takes up to 10", "beta", "loss_type")
        if self.label_smoothing and self.loss_type == "ipo":
            raise Rule(f"{{}} {self.label_smoothing:g} applies to {{}} sigmoid or simpo, not ipo: set it to 0",
                       "label_smoothing", "loss_type")
        return self

    @property
    def reference_free(self) -> bool:
        """SimPO needs no reference log-probabilities: no pass computes them."""
        return self.loss_type == "simpo"


class Model(Section):
    """Dropouts (training only), the optimizer, PEFT and DPO."""

    attention_dropout: float = Field(0.0, ge=0, lt=1, examples=[0.1])
    """On the attention probabilities (the model's own)."""
    hidden_dropout: float = Field(0.0, ge=0, lt=1, examples=[0.1])
    """On the embeddings and on each attention and MLP output, before the residual add (Megatron's)."""
    ffn_dropout: float = Field(0.0, ge=0, lt=1, examples=[0.1])
    """On the MLP activations before the down projection (Megatron's)."""
    optim: Optim = Optim()
    peft: Peft = Peft()
    dpo_cfg: DpoCfg = DpoCfg()


class TrainingConfig(Section):
    """How to train: context length, batches, checkpoints, the engine, the model's knobs."""

    max_length: int | None = Field(None, ge=8, le=2**20, examples=[4096])
    """The context length, at most the model's; null: min(8192, the model's maximum)."""
    global_batch_size: int = Field(8, ge=1, le=2**20)
    """Rows per optimizer step over all processes; gradient accumulation makes up what micro batches do not."""
    micro_batch_size: int = Field(4, ge=1, le=2**20)
    """Rows per forward and backward pass on each process."""
    save_steps: int | None = Field(None, ge=1, le=10**9, examples=[100])
    """A checkpoint every this many steps (and at the end); null: one per epoch."""
    save_top_k: int | None = Field(None, ge=1, le=10**6, examples=[2])
    """Keep only the newest k checkpoints; null: keep them all."""
    seed: int = Field(17, ge=0, le=2**32 - 1)
    """Seeds the data order, dropout and the eval prompts' sampling."""
    early_stopping: EarlyStopping = EarlyStopping()
    deepspeed: DeepSpeed = DeepSpeed()
    trainer: Trainer = Trainer()
    model: Model = Model()

    @model_validator(mode="after")
    def _batches_divide(self) -> Self:
        if self.global_batch_size % self.micro_batch_size:
            raise Rule(f"{{}} {self.global_batch_size} must be a multiple of {{}} {self.micro_batch_size}: gradient "
                       "accumulation takes whole micro batches", "global_batch_size", "micro_batch_size")
        processes, nodes = self.deepspeed.processes, self.deepspeed.nodes
        if processes and self.global_batch_size % (self.micro_batch_size * processes * nodes):
            across = (f" x {{}} {nodes}", ("deepspeed.nodes",)) if nodes > 1 else ("", ())
            raise Rule(f"{{}} {self.global_batch_size} must be a multiple of {{}} {self.micro_batch_size} x {{}} "
                       f"{processes}{across[0]}: each step every process takes whole micro batches",
                       "global_batch_size", "micro_batch_size", "deepspeed.processes", *across[1])
        return self


@dataclass(frozen=True)
class Duration:
    """The anchor's training_duration: `3ep`, `200ba` or `1_000_000tok`."""

    value: int
    unit: Literal["ep", "ba", "tok"]

    @classmethod
    def parse(cls, text: str, name: str = "training_duration") -> "Duration":
        match = re.fullmatch(r"(\d[\d_]*)(ep|ba|tok)", str(text).strip())
        if not match or int(match.group(1).replace("_", "")) <= 0:
            raise InvalidInputError(
                f"{name} {text!r} is not a duration: write a positive integer followed by ep (epochs), ba (batches) "
                "or tok (tokens), e.g. '3ep', '200ba' or '1_000_000tok'"
            )
        return cls(int(match.group(1).replace("_", "")), match.group(2))

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


class RunConfig(Section):
    """One fine-tuning run: a recipe laid out like Amazon Nova's SFT recipes."""

    run: Run
    training_config: TrainingConfig = TrainingConfig()
    _names: dict[str, str] = PrivateAttr(default_factory=dict)  # path -> what the user wrote for it (tasks.recipe)
    _amazon_only: tuple[str, ...] = PrivateAttr(default=())  # the recipe's keys ignored here (tasks.nova)

    @model_validator(mode="after")
    def _eval_settings_need_eval_data(self) -> Self:
        if self.run.eval_data_path is None:
            for path in ("training_config.trainer.val_check_interval", "training_config.early_stopping.patience"):
                if _get(self, path) is not None:
                    raise Rule("{} needs {}: give held-out data to evaluate on", path, "run.eval_data_path")
        return self

    def __eq__(self, other: object) -> bool:  # the settings, whichever way each was given
        return isinstance(other, RunConfig) and self.to_recipe() == other.to_recipe()

    __hash__ = None

    @property
    def duration(self) -> Duration:
        trainer = self.training_config.trainer
        return next((Duration(getattr(trainer, key), unit) for unit, key in DURATION_KEYS.items()
                     if getattr(trainer, key) is not None), Duration(1, "ep"))

    def registered_model_name(self, run_name: str) -> str:
        """`catalog.schema.<run_name>` unless register_to names the model itself."""
        register_to = self.run.register_to
        return register_to if register_to.count(".") == 2 else f"{register_to}.{run_name}"

    @property
    def amazon_only(self) -> tuple[str, ...]:
        """The recipe's keys that mean something only on Amazon's service: accepted, ignored, named to the user."""
        return self._amazon_only

    def name_of(self, path: str) -> str:
        """How an error should name a setting: as the user wrote it (an argument's name or the path)."""
        return self._names.get(path, path)

    def replace(self, updates: dict[str, Any]) -> Self:
        """A copy with values set at dotted paths, checked like the original (names kept)."""
        data = self.to_recipe()
        for path, value in updates.items():
            set_path(data, path, value)
        try:
            config = type(self).model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
            raise InvalidInputError(f"cannot set {', '.join(updates)}: {problems}") from None
        config._names, config._amazon_only = self._names, self._amazon_only
        return config

    def to_recipe(self) -> dict[str, Any]:
        """The config as a recipe reads it: JSON types, every key, nulls included."""
        return self.model_dump(mode="json", by_alias=True)

    def params(self) -> dict[str, Any]:
        """Flat `path: value` pairs of every set value, for MLflow's params."""
        return {path: value for path, value in _leaves(self.to_recipe(), "") if value is not None}


def set_path(data: dict, path: str, value: Any) -> None:
    """Set `value` at a dotted path in nested dicts, making the sections on the way."""
    *sections, key = path.split(".")
    for section in sections:
        if not isinstance(data.get(section), dict):
            data[section] = {}
        data = data[section]
    data[key] = value


def leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of each value in nested dicts that is not itself a non-empty dict."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1], data


def _get(config: BaseModel, path: str) -> Any:
    for key in path.split("."):
        config = getattr(config, key)
    return config


def _leaves(data: Any, prefix: str):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], data


def run_name_for(model: str, task_type: str, prefix: str | None = None) -> str:
    """The anchor's names: `ift-<model>-<6 chars>` or `contd-pretrain-<model>-<6 chars>` (or `<prefix>-...`, e.g. a
    sweep's), RFC 1123, <= 63 chars."""
    prefix = prefix or ("contd-pretrain" if task_type == TaskType.CONTINUED_PRETRAIN else "ift")
    base = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-") or "model"
    suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
    base = base[: 63 - len(prefix) - len(suffix) - 2].strip("-")
    return f"{prefix}-{base}-{suffix}"
