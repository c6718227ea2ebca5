"""Writing a checkpoint: DeepSpeed's state with the run's own beside it, the Hugging Face export and the recipe,
then the latest link and save_top_k's pruning. The folder's layout and its helpers are in checkpoints.py."""

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.errors import StorageError
from tasks.training.checkpoint_names import export_dir
from tasks.training.checkpoints import (
    checkpoint_bytes,
    checkpoint_tag,
    discard_partial,
    disk_full_message,
    point_latest,
    prune,
    save_huggingface,
    save_recipe,
)
from tasks.training.protocol import emit
from tasks.training.spec import TrainSpec


def save(engine, tokenizer, spec: TrainSpec, output_dir: Path, step: int, carried: dict, total_params: int,
         master: bool) -> None:
    """The checkpoint `ep{E}-ba{B}` and its Hugging Face export, each with the run's recipe beside it; then the
    latest link, and save_top_k's pruning. `carried` is what resuming reads back besides the engine's own state.

    Every rank calls it. On a disk without room for it the run stops with a StorageError, the latest link still
    on the last complete checkpoint and nothing half-written left behind."""
    tag = checkpoint_tag(step, spec.plan.batches_per_epoch)
    need = checkpoint_bytes(output_dir, total_params)
    short = torch.tensor([int(shutil.disk_usage(output_dir).free < need)])
    dist.all_reduce(short, op=dist.ReduceOp.MAX)  # every rank stops, or none: a lone rank would hang the others
    if short.item():
        raise StorageError(disk_full_message(output_dir, need))
    try:
        write_checkpoint(engine, tokenizer, spec, output_dir, tag, step, carried, master)
    except Exception:
        if shutil.disk_usage(output_dir).free >= need:
            raise
        if master:  # the disk filled under the save (another writer): what it began is not a checkpoint
            discard_partial(output_dir, tag, step)
        raise StorageError(disk_full_message(output_dir, need)) from None


def write_checkpoint(engine, tokenizer, spec: TrainSpec, output_dir: Path, tag: str, step: int, carried: dict,
                     master: bool) -> None:
    training = spec.config.training_config
    lora = training.model.peft
    engine.save_checkpoint(
        output_dir,
        tag=tag,
        client_state={"tessera": {
            **carried,
            # What init_from needs to merge the adapters into the base weights later.
            "lora": {"rank": lora.lora_tuning.rank, "alpha": lora.lora_tuning.alpha} if lora.peft_scheme else None,
        }},
        save_latest=False,  # the latest link below is ours, moved only once the export is written too
    )
    hf_path = export_dir(output_dir, step)
    save_huggingface(engine, tokenizer, hf_path, training.deepspeed.zero_stage, master,
                     lora=lora.peft_scheme == "lora", config=spec.config)
    if master:
        save_recipe(output_dir / tag, spec.config)
    dist.barrier()  # every rank's shard is on disk before the link says the checkpoint exists
    if master:
        point_latest(output_dir, tag)
        emit("checkpoint", tag=tag, path=str(output_dir / tag), hf_path=str(hf_path))
        # Only now, with the new checkpoint complete and linked and no save under way, and only here on rank 0:
        # the other ranks never touch older folders.
        if training.save_top_k and (removed := prune(output_dir, training.save_top_k)):
            emit("pruned", batch=step, keep=training.save_top_k, removed=[str(p) for p in removed])
