"""Prepared rows on disk, memory-mapped with numpy alone: a run's flow process checks them (TrainSpec) without
importing torch, which only the training worker needs.

A prepared dataset folder holds three int32 arrays of shape [rows, context_length]: input_ids; labels (-100 where a
position carries no loss); position_ids (restarting at 0 at each document packed into the row, which is how the
model knows where documents begin). Preference pairs' folders (task_type DPO) add sequence_ids: 2 x pair + side (0
chosen, 1 rejected) at each position of a side, -1 on padding; a pair's two sides always lie in one row.
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
            meta = json.loads((folder / "meta.json").read_text())
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
        self.sequence_ids, self.pairs = self._sequence_ids(folder, role, meta)

    def _sequence_ids(self, folder: Path, role: str, meta: dict) -> tuple[np.ndarray | None, int]:
        """Preference rows' sequence ids and their pair count (meta.json's num_examples: no pass over the ids);
        (None, 0) for other rows."""
        if not (folder / "sequence_ids.npy").is_file():
            return None, 0
        ids = np.load(folder / "sequence_ids.npy", mmap_mode="r")
        if ids.dtype != np.int32 or ids.shape != self.input_ids.shape:
            raise InvalidInputError(f"{role} {folder}: sequence_ids.npy must be int32 {list(self.input_ids.shape)} "
                                    f"like input_ids.npy, got {ids.dtype} {list(ids.shape)}")
        return ids, meta["num_examples"] if "num_examples" in meta else int(ids.max()) // 2 + 1

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
