"""The checkpoint folder of a run, and loading weights from one.

output_dir/
  ep{E}-ba{B}/                   DeepSpeed's checkpoint: weights, optimizer, step, data position, RNG
  huggingface/ba{B}/             save_pretrained of the model and tokenizer at that step; for a LoRA run the
                                 adapters merged into the base weights, and the adapter alone in adapter/
  */recipe.yaml                  in each of them: the run's resolved config, a recipe that runs it again
  latest-sharded-rank0.symlink   -> the newest complete ep*-ba* folder (relative, replaced atomically)

With save_top_k, `prune` removes all but the newest k of each once a new checkpoint is complete.
"""

import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from tasks.config import RunConfig
from tasks.errors import InvalidInputError
from tasks.training.checkpoint_names import LATEST, MODEL_STATES, TAG, export_dir, latest_tag, tag_step

EXPORT = re.compile(r"ba(\d+)")
DELETING = ".deleting"  # a folder renamed to .{name}.deleting is on its way out
ADAPTER = "adapter"  # a LoRA run's export holds its adapter here, beside the merged model
RECIPE = "recipe.yaml"  # the run's resolved config, beside every checkpoint and export (as litgpt keeps its own)


def checkpoint_tag(step: int, batches_per_epoch: int) -> str:
    """Named like the anchor's checkpoints: completed epochs, then optimizer steps."""
    return f"ep{step // batches_per_epoch}-ba{step}"


def _staging(path: Path) -> Path:
    """Where a folder is written before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def point_latest(output_dir: Path, tag: str) -> None:
    """Repoint the latest link at `tag` in one rename, so a reader never sees it missing or half-written."""
    staging = output_dir / f".{LATEST}.partial"
    staging.unlink(missing_ok=True)
    staging.symlink_to(tag)
    os.replace(staging, output_dir / LATEST)


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints, and all but the newest `keep` HF exports; rank 0 only.

    Call it only once the newest checkpoint is complete and the latest link points at it, with no save under
    way. Counting stops at the link's step: the folder it names is always kept, and anything of a later step
    (left half-written by a run that died before moving the link, rewritten when this run gets there) is not
    this function's to judge. Each folder is renamed out of the ep*-ba* / ba* namespace first, so a reader
    (resume, init_from, the upload) never sees half of one. Returns what was removed.
    """
    current = latest_tag(output_dir)
    if current is None:
        return []
    step = tag_step(current)
    removed = []
    for folder, pattern in ((output_dir, TAG), (output_dir / "huggingface", EXPORT)):
        if not folder.is_dir():
            continue
        for leftover in folder.glob(f".*{DELETING}"):  # from a run killed while removing
            shutil.rmtree(leftover, ignore_errors=True)
        found = sorted(  # by step, the link's own folder last among its step
            (int(m.group(m.re.groups)), folder == output_dir and path.name == current, path)
            for path in folder.iterdir()
            if (m := pattern.fullmatch(path.name)) and path.is_dir() and not path.is_symlink()
        )
        older = [path for s, _, path in found if s <= step]
        for path in older[: max(0, len(older) - keep)]:
            doomed = path.with_name(f".{path.name}{DELETING}")
            try:
                os.replace(path, doomed)
            except OSError as e:  # a disk problem should not end a training run: the next prune tries again
                print(f"could not remove old checkpoint {path}: {e}", flush=True)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def checkpoint_bytes(output_dir: Path, params: int) -> int:
    """The room the next checkpoint and its export take: the last complete pair's size, or before the first an
    estimate of 5 fp32 copies of the weights (module, master, Adam's two moments, export)."""
    tag = latest_tag(output_dir)
    if tag is None:
        return 5 * 4 * params
    export = export_dir(output_dir, tag_step(tag))
    return sum(f.stat().st_size for folder in (output_dir / tag, export) for f in folder.rglob("*") if f.is_file())


def disk_full_message(output_dir: Path, need: int) -> str:
    free = shutil.disk_usage(output_dir).free
    tag = latest_tag(output_dir)
    kept = (f"the latest complete checkpoint, {output_dir / tag}, is intact: free space, then train on from it with "
            f"custom_weights_path={output_dir / tag}" if tag else "the run had no checkpoint yet: free space and "
            "create it again")
    return (f"the disk holding {output_dir} is full: the next checkpoint needs about {need / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free; {kept}")


def discard_partial(output_dir: Path, tag: str, step: int) -> None:
    """Remove what a failed save began (the checkpoint folder, the export and its staging), never a complete one."""
    if latest_tag(output_dir) == tag:
        return
    for path in (output_dir / tag, export_dir(output_dir, step), _staging(export_dir(output_dir, step))):
        shutil.rmtree(path, ignore_errors=True)


def save_recipe(folder: Path, config: RunConfig) -> None:
    """The run's resolved config as a recipe, into a checkpoint folder: `create(recipe=...)` runs it again."""
    (folder / RECIPE).write_text(yaml.safe_dump(config.to_recipe(), sort_keys=False))


def save_huggingface(engine, tokenizer, path: Path, zero_stage: int, master: bool, config: RunConfig,
                     lora: bool = False) -> None:
    """A plain HF folder (loadable with from_pretrained) of the current weights; every rank must call it.

    With `lora`, engine.module is a peft model: the folder holds the adapters merged into the base weights,
    so that it loads without peft, and `adapter/` the adapter alone (PeftModel.from_pretrained(base, it)).
    The merge is computed on CPU copies of the merged matrices; the training model is left as it was.
    The run's recipe goes beside it.
    """
    # ZeRO-3 splits each weight over the ranks: gathering them is a collective, so all ranks take part.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if not master:
        return
    staging = _staging(path)
    shutil.rmtree(staging, ignore_errors=True)
    if lora:
        peft_model = engine.module
        full = peft_model.state_dict() if state_dict is None else state_dict
        peft_model.save_pretrained(staging / ADAPTER, state_dict=full)
        peft_model.get_base_model().save_pretrained(staging, state_dict=merge_lora(full, lora_scaling(peft_model)))
    else:
        engine.module.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    save_recipe(staging, config)
    shutil.rmtree(path, ignore_errors=True)  # left by a run that died before it moved the latest link
    staging.rename(path)


def merge_lora(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A base model's state dict (its own key names) from a peft LoRA model's, each adapter merged in, on CPU.

    `state_dict` holds base_model.model.<name>.base_layer.weight, <name>.lora_A.default.weight, ... : each merged
    weight is W + scaling x B @ A, computed in fp32 and stored in W's dtype, as peft's own merge does.
    """
    prefix = "base_model.model."
    merged, on_cpu = {}, {}  # on_cpu: one copy per storage, so tied weights stay tied
    for key, tensor in state_dict.items():
        if ".lora_" in key:
            continue
        name, _, leaf = key.rpartition(".base_layer.")
        if name:
            if leaf == "weight":
                if f"{name}.lora_A.default.weight" not in state_dict:
                    raise InvalidInputError(f"cannot merge the LoRA adapter of {name}: only Linear layers merge")
                a = state_dict[f"{name}.lora_A.default.weight"].to("cpu", torch.float32)
                b = state_dict[f"{name}.lora_B.default.weight"].to("cpu", torch.float32)
                tensor = (tensor.to("cpu", torch.float32) + (b @ a) * scaling).to(tensor.dtype)
            key = f"{name}.{leaf}"
        if tensor.device.type != "cpu":
            tensor = on_cpu.setdefault((tensor.data_ptr(), tensor.dtype, tensor.shape), tensor.to("cpu"))
        merged[key.removeprefix(prefix)] = tensor
    return merged


def lora_scaling(peft_model) -> float:
    """The one scaling (alpha / rank) of a peft model trained with a single plain LoRA adapter."""
    config = peft_model.peft_config["default"]
    if len(peft_model.peft_config) != 1 or config.use_rslora or config.rank_pattern or config.alpha_pattern:
        raise InvalidInputError("cannot merge these LoRA adapters: only one adapter with one rank and alpha merges")
    return config.lora_alpha / config.r


def load_weights(source: Path) -> dict[str, torch.Tensor]:
    """The model weights of an ep*-ba* checkpoint folder (or the latest link), whatever its ZeRO stage.

    A LoRA run's checkpoint holds the base weights and the adapters: they come back merged, as the run's export.
    """
    folder = source.resolve()
    model_states = next((folder / name for name in MODEL_STATES if (folder / name).is_file()), None)
    if model_states is None:
        raise InvalidInputError(
            f"init_from {source} is not a DeepSpeed checkpoint folder (no {' or '.join(MODEL_STATES)}): "
            f"pass an ep*-ba* folder or a {LATEST}"
        )
    states = torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)
    if any(folder.glob("zero_pp_rank_*_optim_states.pt")):
        # ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer states: merge them.
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # ZeRO 0: the whole model in the model states file
        weights = states["module"]
    lora = states.get("tessera", {}).get("lora")
    return merge_lora(weights, lora["alpha"] / lora["rank"]) if lora else weights


def check_same_architecture(
    weights: dict[str, torch.Tensor], model: torch.nn.Module, source: Path, model_dir: Path
) -> None:
    """Refuse weights that do not fit the model, naming what differs, before load_state_dict fails cryptically."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [
        f"{k} is {list(have[k])} there but {list(want[k])} here"
        for k in sorted(want.keys() & have.keys())
        if want[k] != have[k]
    ]
    problems += [f"{k} is missing" for k in sorted(want.keys() - have.keys())]
    problems += [f"{k} is unexpected" for k in sorted(have.keys() - want.keys())]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InvalidInputError(
            f"init_from {source} holds another architecture than model_dir {model_dir} ({shown}): "
            "initialise from a checkpoint of a run on the same base model"
        )
