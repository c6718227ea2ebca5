"""Prepared rows on disk -> the micro batches of each optimizer step, prefetched on a background thread.

A prepared dataset folder holds three int32 arrays of shape [rows, context_length], memory-mapped:
input_ids; labels (-100 where a position carries no loss); position_ids (restarting at 0 at each
document packed into the row, which is how the model knows where documents begin).
"""

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [micro_batch_size, context_length] int64
    position_ids: torch.Tensor
    targets: torch.Tensor  # IGNORE where no loss

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.targets)))


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]  # this rank's share of the global batch
    loss_tokens: int  # loss tokens in the whole global batch, all ranks: the loss is their mean


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a fresh shuffle per epoch, the same on every rank and every resume."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def step_batches(
    data: PackedRows,
    *,
    seed: int,
    start_step: int,
    total_steps: int,
    batches_per_epoch: int,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
) -> Iterator[StepBatch]:
    """The batches of optimizer steps start_step..total_steps-1; step s is the same wherever the run resumes."""
    order = None
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, batches_per_epoch)
        if index == 0 or order is None:
            order = epoch_order(data.rows, seed, epoch)
        batch_rows = order[index * global_batch_size : (index + 1) * global_batch_size]
        # Targets of the whole global batch, so every rank knows the loss-token count without a collective.
        targets = data.targets(batch_rows)
        loss_tokens = int((targets != IGNORE).sum())
        mine = slice(rank, None, world_size)  # strided, like DistributedSampler
        rows, targets = batch_rows[mine], targets[mine]
        yield StepBatch(
            micro_batches=[
                _micro_batch(data, rows[i : i + micro_batch_size], targets[i : i + micro_batch_size])
                for i in range(0, len(rows), micro_batch_size)
            ],
            loss_tokens=loss_tokens,
        )


def logits_of(model, micro_batch: MicroBatch) -> torch.Tensor:
    """fp32 logits of packed rows, each document attending only to itself.

    Given position_ids and no attention_mask, HF builds per-document masks from where the positions
    restart, but only without a KV cache: with use_cache left at the config's True it silently falls back
    to one causal mask over the whole row.
    """
    output = model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids, use_cache=False)
    return output.logits.float()


def eval_batches(data: PackedRows, micro_batch_size: int, rank: int, world_size: int) -> Iterator[MicroBatch]:
    """All eval rows once, strided over ranks; every rank yields the same number of micro batches.

    ZeRO-3 gathers parameters collectively inside forward, so a rank that runs out of rows must still
    run a forward: it repeats row 0 with no loss tokens.
    """
    mine = np.arange(data.rows)[rank::world_size]
    count = -(-data.rows // (world_size * micro_batch_size))
    for i in range(count):
        rows = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
        if len(rows):
            yield _micro_batch(data, rows, data.targets(rows))
        else:
            yield _micro_batch(data, np.array([0]), np.full((1, data.context_length), IGNORE))


def _micro_batch(data: PackedRows, rows: np.ndarray, targets: np.ndarray) -> MicroBatch:
    return MicroBatch(
        input_ids=torch.from_numpy(data.input_ids[rows].astype(np.int64)),
        position_ids=torch.from_numpy(data.position_ids[rows].astype(np.int64)),
        targets=torch.from_numpy(targets),
    )


class Prefetcher:
    """Iterates `source` on a background thread, `depth` items ahead, so reading rows overlaps compute.

    On CUDA the tensors are pinned there too, so the copy to the GPU can be asynchronous.
    """

    _DONE = object()

    def __init__(self, source: Iterator[StepBatch], pin_memory: bool, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._pin = pin_memory
        threading.Thread(target=self._fill, args=(source,), daemon=True, name="prefetch").start()

    def _fill(self, source: Iterator[StepBatch]) -> None:
        try:
            for batch in source:
                if self._pin:
                    for mb in batch.micro_batches:
                        mb.input_ids, mb.position_ids, mb.targets = (
                            t.pin_memory() for t in (mb.input_ids, mb.position_ids, mb.targets)
                        )
                self._queue.put(batch)
            self._queue.put(self._DONE)
        except BaseException as e:  # surfaces in the training loop, not lost on this thread
            self._queue.put(e)

    def __iter__(self) -> Iterator[StepBatch]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
