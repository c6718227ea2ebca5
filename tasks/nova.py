"""Amazon Nova's recipe keys, read as a Nova user means them, so that Nova's published recipes load unchanged.

    translate(data) -> Translation(data in Tessera's layout, where each key came from, keys ignored, problems)

- `${recipes.run.name}` is resolved against the recipe itself, as HyperPod's launcher (which nests the recipe under
  `recipes`) resolves it, with OmegaConf;
- keys laid out otherwise here move to Tessera's (MOVED: NeMo's exp_manager callbacks; Nova 2.0's flatter layout,
  whose max_steps, lr_scheduler, optim_config and peft sit directly under training_config), and values that say
  "unset" or name a thing differently are rewritten (`max_epochs: -1`, `sched.name: CosineAnnealing`, `task_type:
  sft`, `peft_scheme: 'null'`, `adam_beta1` and `adam_beta2` as one `betas`);
- keys that mean something only on Amazon's service (AMAZON_ONLY) are dropped and named, never silently: the run's
  config keeps them in `amazon_only`, and create() says them once, in a warning and a WARNING event.

A run's resolved config stays Tessera's own layout: nothing of Nova's survives translation but its meaning.
"""

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

from tasks.config import DURATION_KEYS, Optim, TaskType, leaves, set_path

_EXP = "training_config.exp_manager"
_CHECKPOINT = f"{_EXP}.checkpoint_callback_params"
_STOPPING = f"{_EXP}.early_stopping_callback_params"
# Sections only Nova's layouts have: what is left in them once MOVED has moved what it knows is a typo.
_NOVA_SECTIONS = (_EXP, *(f"training_config.{s}" for s in ("lr_scheduler", "optim_config", "peft")))
_OPTIM = "training_config.model.optim"
_LORA = "training_config.model.peft.lora_tuning"
_BETAS = {"training_config.optim_config.adam_beta1": 0, "training_config.optim_config.adam_beta2": 1}  # Nova 2.0's
MOVED = {  # Nova's path -> Tessera's
    f"{_CHECKPOINT}.save_top_k": "training_config.save_top_k",
    f"{_CHECKPOINT}.every_n_train_steps": "training_config.save_steps",
    f"{_STOPPING}.monitor": "training_config.early_stopping.monitor",
    f"{_STOPPING}.patience": "training_config.early_stopping.patience",
    f"{_STOPPING}.min_delta": "training_config.early_stopping.min_delta",
    "run.mlflow_experiment_name": "run.experiment_path",
    "run.data_s3_path": "run.train_data_path",  # (aliases too: renamed, an argument given beside them replaces them)
    "run.validation_data_s3_path": "run.eval_data_path",
    # Nova 2.0's recipes
    "training_config.max_steps": "training_config.trainer.max_steps",
    "training_config.lr_scheduler.warmup_steps": f"{_OPTIM}.sched.warmup_steps",
    "training_config.lr_scheduler.min_lr": f"{_OPTIM}.sched.min_lr",
    "training_config.optim_config.lr": f"{_OPTIM}.lr",
    "training_config.optim_config.weight_decay": f"{_OPTIM}.weight_decay",
    "training_config.peft.peft_scheme": "training_config.model.peft.peft_scheme",
    "training_config.peft.lora_tuning.alpha": f"{_LORA}.alpha",
    "training_config.peft.lora_tuning.lora_plus_lr_ratio": f"{_LORA}.loraplus_lr_ratio",
}
UNSET = {f"{_CHECKPOINT}.save_top_k": -1, f"{_CHECKPOINT}.every_n_train_steps": 0,  # NeMo's "keep all", "not by step"
         "training_config.peft.peft_scheme": "null"}  # Nova 2.0's full rank, as a string

# Keys (or whole sections) that only Amazon's service acts on: its instances, its S3 output, its Megatron engine,
# its multimodal stack and validation loader, NeMo's logging and checkpoint plumbing; Nova 2.0's reasoning traces
# (Tessera's data checks refuse reasoningContent blocks) and its merge of the result back into the base model.
AMAZON_ONLY = (
    "run.model_type", "run.replicas", "run.output_s3_path",
    "training_config.model.sequence_parallel", "training_config.model.mm_cfg", "training_config.training_validation",
    f"{_OPTIM}.bucket_cap_mb", f"{_OPTIM}.overlap_grad_sync", f"{_OPTIM}.overlap_param_sync",
    f"{_OPTIM}.contiguous_grad_buffer", f"{_OPTIM}.contiguous_param_buffer",
    f"{_EXP}.exp_dir", f"{_EXP}.name", f"{_EXP}.explicit_log_dir", f"{_EXP}.create_tensorboard_logger",
    f"{_EXP}.create_checkpoint_callback", f"{_EXP}.create_early_stopping_callback", f"{_EXP}.resume_if_exists",
    f"{_EXP}.resume_ignore_no_checkpoint", f"{_CHECKPOINT}.monitor", f"{_CHECKPOINT}.mode", f"{_CHECKPOINT}.save_last",
    f"{_CHECKPOINT}.filename", f"{_CHECKPOINT}.always_save_nemo", f"{_CHECKPOINT}.save_nemo_on_train_end",
    f"{_CHECKPOINT}.save_best_model", f"{_CHECKPOINT}.model_parallel_size", f"{_STOPPING}.mode", f"{_STOPPING}.verbose",
    f"{_STOPPING}.strict", "training_config.reasoning_enabled", "training_config.model_importance_score",
)
# Nova's names, "" (unset) or an Amazon resource where Tessera has its own.
_EMPTY_MEANS_UNSET = ("run.data_s3_path", "run.validation_data_s3_path", "run.mlflow_tracking_uri",
                      "run.mlflow_experiment_name", "run.mlflow_run_name")
_SCHEDULERS = {"CosineAnnealing": "cosine"}  # NeMo's scheduler names
_TASK_TYPES = {"sft": TaskType.CHAT_COMPLETION, "dpo": TaskType.DPO}  # Nova's lower-case task types


class AmazonOnlyKeys(UserWarning):
    """A recipe held keys that mean something only on Amazon's service; they were accepted and ignored."""


@dataclass
class Translation:
    data: dict  # the recipe in Tessera's layout
    names: dict[str, str] = field(default_factory=dict)  # Tessera's path -> the recipe's key it came from
    amazon_only: list[str] = field(default_factory=list)  # the recipe's keys ignored here, as written
    problems: list[str] = field(default_factory=list)  # one line each, naming the recipe's key
    open_ended: bool = False  # max_epochs -1 given: some other duration must be

    def duration_problems(self, merged: dict) -> list[str]:
        """`max_epochs: -1` (Nova's "stop at max_steps") needs a duration in the merged config."""
        trainer = _get(merged, "training_config.trainer")
        trainer = trainer if isinstance(trainer, dict) else {}
        if self.open_ended and all(trainer.get(key) is None for key in DURATION_KEYS.values()):
            return ["training_config.trainer.max_epochs -1 means 'stop at max_steps' (Nova's): set "
                    "training_config.trainer.max_steps, e.g. 100"]
        return []


def translate(data: dict) -> Translation:
    """The recipe's keys in Tessera's layout (a copy); nothing to do for a recipe of Tessera's own."""
    resolved, problems = _resolved(data)
    t = Translation(resolved, problems=problems)
    for path, value in list(leaves(t.data)):
        if path in _EMPTY_MEANS_UNSET and value == "":
            _pop(t.data, path)
        elif key := _amazon_only(path, value):
            _pop(t.data, key)  # a whole section (mm_cfg) at once
            if key not in t.amazon_only:
                t.amazon_only.append(key)
    _rewrite_values(t)
    _move(t)
    _drop_the_store_in_use(t)
    _infer_dpo(t)
    return t


def keys_under(section: str) -> list[str]:
    """The keys of Nova's that a recipe may hold directly under `section` (for "did you mean")."""
    prefix = f"{section}." if section else ""
    return sorted({path[len(prefix):].split(".")[0] for path in (*MOVED, *_BETAS, *AMAZON_ONLY)
                   if path.startswith(prefix)})


def nearest(key: str, known: list[str]) -> str:
    """`; did you mean <key>?` for the closest known key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def warn_amazon_only(keys: tuple[str, ...]) -> str | None:
    """Say once which keys were ignored (a Python warning); returns the message, None when there were none."""
    if not keys:
        return None
    message = (f"{', '.join(keys)}: mean{'s' if len(keys) == 1 else ''} something only on Amazon's service "
               "(SageMaker HyperPod or training jobs); accepted and ignored here")
    warnings.warn(message, AmazonOnlyKeys, stacklevel=3)
    return message


def _resolved(data: dict) -> tuple[dict, list[str]]:
    """The recipe with `${...}` resolved: `${recipes.run.name}` against the recipe (HyperPod nests it under
    `recipes`), `${oc.select:training_config.max_steps}` and the like against its top."""
    if not any(isinstance(v, str) and "${" in v for _, v in leaves(data)):
        return data, []
    from omegaconf import OmegaConf  # only for the recipes that interpolate: every configure() would pay its import
    from omegaconf.errors import OmegaConfBaseException

    try:
        root = OmegaConf.create({**data, "recipes": data})
        resolved = OmegaConf.to_container(root, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f"{key}: " if key else ""
        return data, [f"{where}{str(e).splitlines()[0]}: a ${{...}} must name a key of the recipe, e.g. "
                      "${recipes.run.name}"]
    resolved.pop("recipes")
    return resolved, []


def _amazon_only(path: str, value: Any) -> str | None:
    """The key of AMAZON_ONLY that `path` is or is in, or None."""
    if path == "run.mlflow_tracking_uri":  # a SageMaker managed MLflow server, by its ARN
        return path if isinstance(value, str) and value.startswith("arn:aws") else None
    return next((key for key in AMAZON_ONLY if path == key or path.startswith(f"{key}.")), None)


def _rewrite_values(t: Translation) -> None:
    trainer = _get(t.data, "training_config.trainer")
    if isinstance(trainer, dict):
        epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
        if steps == -1:  # Lightning's "no step limit": the epochs decide
            trainer.pop("max_steps")
        if epochs == -1:  # Lightning's "no epoch limit": the steps decide
            trainer.pop("max_epochs")
            t.open_ended = True
    sched = _get(t.data, f"{_OPTIM}.sched")
    if isinstance(sched, dict) and sched.get("name") in _SCHEDULERS:
        sched["name"] = _SCHEDULERS[sched["name"]]
    run = t.data.get("run")
    if isinstance(run, dict) and isinstance(run.get("task_type"), str) and run["task_type"] in _TASK_TYPES:
        run["task_type"] = _TASK_TYPES[run["task_type"]].value


def _move(t: Translation) -> None:
    """Nova's keys to Tessera's paths (Tessera's own key, when given too, wins); other keys left in a section only
    Nova has are typos, said with the nearest key."""
    betas = {i: value for nova, i in _BETAS.items() if (value := _pop(t.data, nova)) is not None}
    if betas and _get(t.data, f"{_OPTIM}.betas") is None:
        default = list(Optim.model_fields["betas"].default)
        set_path(t.data, f"{_OPTIM}.betas", [betas.get(i, default[i]) for i in range(2)])
        t.names |= {f"{_OPTIM}.betas[{i}]": nova for nova, i in _BETAS.items() if i in betas}
    for nova, tessera in MOVED.items():
        value = _pop(t.data, nova)
        if value is None or _get(t.data, tessera) is not None:
            continue
        if nova == "run.mlflow_experiment_name":
            value = _experiment_path(value)
        set_path(t.data, tessera, None if UNSET.get(nova) == value else value)
        t.names[tessera] = nova
    for nova_only in _NOVA_SECTIONS:
        left = _pop(t.data, nova_only)
        if left is not None and not isinstance(left, dict):
            t.problems.append(f"{nova_only} {left!r} must be a mapping with the keys {', '.join(keys_under(nova_only))}")
        for path, _ in leaves(left, f"{nova_only}.") if isinstance(left, dict) and left else ():
            section, _, key = path.rpartition(".")
            t.problems.append(f"{path} is not a recipe key{nearest(key, keys_under(section))}")


def _experiment_path(name: Any) -> Any:
    """Nova's experiment name as Tessera's workspace path: `/Users/<user>/<name>` unless it is one already."""
    from tasks.run_record import current_user  # the caller of create(), or of `tessera serve`

    return name if not isinstance(name, str) or name.startswith("/") else f"/Users/{current_user()}/{name}"


def _drop_the_store_in_use(t: Translation) -> None:
    """Nova's mlflow_tracking_uri naming Tessera's own store says nothing more: every run is tracked there. Any other
    server stays run.mlflow_tracking_uri: the run is logged there too (tasks/tracking_mirror.py)."""
    from tasks.tracking import is_the_store

    uri = _get(t.data, "run.mlflow_tracking_uri")
    if isinstance(uri, str) and is_the_store(uri):
        _pop(t.data, "run.mlflow_tracking_uri")


def _infer_dpo(t: Translation) -> None:
    """Nova's DPO recipes say DPO by their dpo_cfg alone."""
    run = t.data.get("run")
    if _get(t.data, "training_config.model.dpo_cfg") is not None and not (isinstance(run, dict) and "task_type" in run):
        set_path(t.data, "run.task_type", TaskType.DPO.value)
        t.names["run.task_type"] = "training_config.model.dpo_cfg"


def _get(data: dict, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _pop(data: dict, path: str) -> Any:
    """Remove the key at `path` (and sections it leaves empty); its value, or None."""
    *sections, key = path.split(".")
    parent = _get(data, ".".join(sections)) if sections else data
    if not isinstance(parent, dict) or key not in parent:
        return None
    value = parent.pop(key)
    if sections and not parent:
        _pop(data, ".".join(sections))
    return value
