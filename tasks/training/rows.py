"""Prepared rows on disk, memory-mapped with numpy alone: a run's flow process checks them (TrainSpec) without
importing torch, which only the training worker needs.

A prepared dataset folder holds three int32 arrays of shape [rows, context_length]: input_ids; labels (-100 where a
position carries no loss); position_ids (restarting at 0 at each document packed into the row, which is how the
model knows where documents begin).
"""

import json
from pathlib import Path

import numpy as np

from tasks.errors import InvalidInputError

IGNORE = -100  # the label of a position with no loss (cross_entropy's ignore_index)
ARRAYS = ("input_ids", "labels", "position_ids")


class PackedRows:
    """A prepared dataset folder, memory-mapped; `role` names it in error messages (data_dir, eval_data_dir)."""

    def __init__(self, folder: Path, role: str):
        if not folder.is_dir():
            raise InvalidInputError(f"{role} {folder} does not exist: run the data preparation step first")
        for name in [f"{a}.npy" for a in ARRAYS] + ["meta.json"]:
            if not (folder / name).is_file():
                raise InvalidInputError(
                    f"{role} {folder} has no {name}: point it at a folder written by the data preparation step"
                )
        try:
            json.loads((folder / "meta.json").read_text())
            arrays = [np.load(folder / f"{a}.npy", mmap_mode="r") for a in ARRAYS]
        except ValueError as e:
            raise InvalidInputError(f"{role} {folder} has an unreadable file: {e}") from e
        for name, array in zip(ARRAYS, arrays):
            if array.dtype != np.int32 or array.ndim != 2:
                raise InvalidInputError(
                    f"{role} {folder}: {name}.npy must be int32 [rows, context_length], "
                    f"got {array.dtype} {list(array.shape)}"
                )
        if len({a.shape for a in arrays}) != 1 or arrays[0].size == 0:
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(ARRAYS, arrays))
            raise InvalidInputError(f"{role} {folder}: the arrays must have one non-empty shape, got {shapes}")
        self.input_ids, self.labels, self.position_ids = arrays
        self.rows, self.context_length = arrays[0].shape

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """What each position predicts: the next position's label, and nothing across a document boundary.

        Shifting here (not inside the model) lets the caller count loss tokens before the forward pass.
        A document's first token has no context inside its own document, so the position before it (the
        previous document's last token) predicts nothing, as in HF's DataCollatorWithFlattening.
        """
        labels, positions = self.labels[rows], self.position_ids[rows]
        targets = np.full(labels.shape, IGNORE, dtype=np.int64)
        targets[:, :-1] = np.where(positions[:, 1:] == 0, IGNORE, labels[:, 1:])
        return targets
