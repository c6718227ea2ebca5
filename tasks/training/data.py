"""Prepared rows (tasks/training/rows.py) -> the micro batches of each optimizer step, prefetched on a background
thread."""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tasks.training.rows import IGNORE, PackedRows


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
