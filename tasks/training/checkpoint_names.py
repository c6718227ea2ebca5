"""The names in a run's checkpoint folder that code without torch needs too (the API, the upload, the checks)."""

import os
import re
from pathlib import Path

from tasks.errors import InvalidInputError

LATEST = "latest-sharded-rank0.symlink"  # -> the newest complete ep*-ba* folder
TAG = re.compile(r"ep(\d+)-ba(\d+)")
# Rank 0's model-states file, in every DeepSpeed checkpoint folder; it also holds the client state (ours under
# "tessera"). ZeRO 0-2 name it for the model-parallel rank, ZeRO-3 for the data-parallel rank as well.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def tag_step(tag: str) -> int:
    """The optimizer step of a checkpoint tag: ep2-ba48 -> 48."""
    return int(TAG.fullmatch(tag).group(2))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The ep*-ba* folders up to the one the latest link names, by step: one of a later step is a save that never
    finished (the link moves only once a checkpoint is whole)."""
    link = output_dir / LATEST
    if not link.is_symlink():
        return []
    last = tag_step(Path(os.readlink(link)).name)
    found = [(int(m.group(2)), path) for path in output_dir.glob("ep*-ba*")
             if (m := TAG.fullmatch(path.name)) and path.is_dir()]
    return [path for step, path in sorted(found) if step <= last]


def latest_tag(output_dir: Path) -> str | None:
    """The tag the latest link points at, or None when the run has not checkpointed yet."""
    link = output_dir / LATEST
    if not link.is_symlink():
        return None
    tag = Path(os.readlink(link)).name
    if not (output_dir / tag).is_dir():
        raise InvalidInputError(
            f"{link} points at {tag}, which does not exist: remove the link to start over, or restore the folder"
        )
    return tag


def export_dir(output_dir: Path, step: int) -> Path:
    """The Hugging Face export of the checkpoint at `step`."""
    return output_dir / "huggingface" / f"ba{step}"


def final_export(output_dir: Path) -> Path:
    """The Hugging Face export of the checkpoint the latest link names: a finished run's model."""
    tag = latest_tag(output_dir)
    if tag is None:
        raise InvalidInputError(f"{output_dir} has no checkpoint yet: the run did not finish")
    return export_dir(output_dir, tag_step(tag))
