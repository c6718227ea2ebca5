"""Prepared rows (tasks/training/rows.py) -> the micro batches of each optimizer step, prefetched on a background
thread."""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from tasks.training.rows import IGNORE, PackedRows


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [micro_batch_size, context_length] int64
    position_ids: torch.Tensor
    targets: torch.Tensor  # IGNORE where no loss
    # Preference rows only: each target's side, numbered 2 x pair + side over this micro batch's pairs (-1: none),
    # and each of those pairs' number in the data set (its row of the reference log-probabilities).
    sides: torch.Tensor | None = None
    pairs: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in fields(self) if (t := getattr(self, f.name)) is not None}

    def to(self, device: torch.device) -> "MicroBatch":
        return replace(self, **{name: t.to(device, non_blocking=True) for name, t in self.tensors().items()})


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]  # this rank's share of the global batch
    loss_tokens: int  # loss tokens in the whole global batch, all ranks: the token loss is their mean
    pairs: int = 0  # preference pairs in the whole global batch: the DPO loss is their mean


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
        pairs = _pair_count(data.sequence_ids[batch_rows]) if data.pairs else 0
        mine = slice(rank, None, world_size)  # strided, like DistributedSampler
        rows, targets = batch_rows[mine], targets[mine]
        yield StepBatch(
            micro_batches=[
                _micro_batch(data, rows[i : i + micro_batch_size], targets[i : i + micro_batch_size])
                for i in range(0, len(rows), micro_batch_size)
            ],
            loss_tokens=loss_tokens,
            pairs=pairs,
        )


def logits_of(model, micro_batch: MicroBatch) -> torch.Tensor:
    """fp32 logits of packed rows, each document attending only to itself.

    Given position_ids and no attention_mask, HF builds per-document masks from where the positions
    restart, but only without a KV cache: with use_cache left at the config's True it silently falls back
    to one causal mask over the whole row.
    """
    output = model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids, use_cache=False)
    return output.logits.float()


def hidden_of(causal_lm, micro_batch: MicroBatch) -> torch.Tensor:
    """The decoder's last hidden states [rows * length, hidden] of packed rows (per-document attention, as
    logits_of), for a loss that meets the LM head itself (chunked_loss.py)."""
    output = causal_lm.get_decoder()(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids,
                                     use_cache=False)
    return output.last_hidden_state.flatten(0, 1)


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
            yield _micro_batch(data, np.array([0]), np.full((1, data.context_length), IGNORE), filler=True)


def _micro_batch(data: PackedRows, rows: np.ndarray, targets: np.ndarray, filler: bool = False) -> MicroBatch:
    batch = MicroBatch(
        input_ids=torch.from_numpy(data.input_ids[rows].astype(np.int64)),
        position_ids=torch.from_numpy(data.position_ids[rows].astype(np.int64)),
        targets=torch.from_numpy(targets),
    )
    if data.pairs:
        sequences = np.full(targets.shape, -1, np.int32) if filler else data.sequence_ids[rows]
        batch.sides, batch.pairs = _sides(sequences, targets)
    return batch


def _pair_count(sequences: np.ndarray) -> int:
    return len(np.unique(sequences[sequences >= 0])) // 2  # -1: padding


def _sides(sequences: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target position's side, numbered over the pairs in these rows (so a micro batch's log-probabilities
    fill a [pairs, 2] tensor), and those pairs' numbers in the data set. A target belongs to its position's side:
    targets never cross a document boundary."""
    ids = np.unique(sequences[sequences >= 0])  # both sides of every pair here, as they share a row: 2p, 2p + 1, ...
    local = np.where((sequences >= 0) & (targets != IGNORE), np.searchsorted(ids, sequences), -1)
    return torch.from_numpy(local.astype(np.int64)), torch.from_numpy(ids[0::2] // 2)


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
                    batch.micro_batches = [replace(mb, **{name: t.pin_memory() for name, t in mb.tensors().items()})
                                           for mb in batch.micro_batches]
                self._queue.put(batch)
            self._queue.put(self._DONE)
        except BaseException as e:  # surfaces in the training loop, not lost on this thread
            self._queue.put(e)

    def __iter__(self) -> Iterator[StepBatch]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
