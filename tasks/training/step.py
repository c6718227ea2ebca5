"""One optimizer step, the objective it minimises, and the eval: what the loop runs on the engine.

An objective turns a micro batch into summed figures, the loss first (the only one with a gradient): TokenLoss's
is the token cross-entropy (SFT, continued pretraining); preference.py's PreferenceLoss is DPO's, with its rewards.
Each figure is summed over the objective's units (loss tokens, or pairs), and means are taken over the global
batch's units however it is split into micro batches and ranks.
"""

import math
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.training.chunked_loss import causal_lm_of, chunked_cross_entropy
from tasks.training.data import MicroBatch, StepBatch, eval_batches, hidden_of, logits_of
from tasks.training.rows import IGNORE, PackedRows


class Objective(Protocol):
    names: tuple[str, ...]  # the figures' names, "loss" first
    unit: str  # what the figures are summed over: "tokens" or "pairs"

    def __call__(self, engine, micro_batch: MicroBatch) -> torch.Tensor:
        """The micro batch's summed figures [len(names)], on the device; the loss carries the gradient."""

    def units(self, batch: StepBatch) -> int:
        """The global batch's units, all ranks: the loss is their mean."""

    def units_in(self, micro_batch: MicroBatch) -> torch.Tensor | int:
        """One micro batch's units (for the eval's mean)."""

    def report(self, means: list[float]) -> dict[str, float]:
        """The figures for a progress or eval line, named; derived ones added."""


class TokenLoss:
    """The mean cross-entropy over loss tokens: `chunked` picks token_loss's path."""

    names, unit = ("loss",), "tokens"

    def __init__(self, chunked: bool):
        self.chunked = chunked

    def __call__(self, engine, micro_batch: MicroBatch) -> torch.Tensor:
        return token_loss(engine, micro_batch, self.chunked).unsqueeze(0)

    def units(self, batch: StepBatch) -> int:
        return batch.loss_tokens

    def units_in(self, micro_batch: MicroBatch) -> torch.Tensor:
        return (micro_batch.targets != IGNORE).sum()

    def report(self, means: list[float]) -> dict[str, float]:
        return {"loss": means[0]}


def train_step(engine, batch: StepBatch, device: torch.device, world_size: int, clip: float | None,
               objective: Objective):
    """One optimizer step over this rank's micro batches; returns its summed figures and the grad norm.

    The loss is the mean over all units of the global batch (every micro batch, every rank), so each token (or
    pair) weighs the same however they fall into micro batches: each micro batch's summed loss is divided by the
    global count. DeepSpeed averages gradients over ranks, so multiply by world_size to get their sum, and
    scale_wrt_gas=False stops it dividing by the accumulation steps as well.
    `clip` is set when we clip ourselves (see build_engine); the figures stay on the device.
    """
    sums = torch.zeros(len(objective.names), device=device)
    grad_norm = None
    last = len(batch.micro_batches) - 1
    for i, micro_batch in enumerate(batch.micro_batches):
        figures = objective(engine, micro_batch.to(device))
        engine.backward(figures[0] * (world_size / max(1, objective.units(batch))), scale_wrt_gas=False)
        if clip is not None and i == last:  # the last backward has reduced the gradients across ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip or math.inf)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        sums += figures.detach()
    return sums, grad_norm if clip is not None else engine.get_global_grad_norm()


def token_loss(engine, micro_batch: MicroBatch, chunked: bool) -> torch.Tensor:
    """The summed cross-entropy (fp32) over a micro batch's loss tokens, each packed document attending to itself.

    chunked: the decoder's hidden states meet the LM head a chunk of rows at a time (chunked_loss.py), so the
    [tokens, vocabulary] logits are never held, and rows without loss skip the head; else the model's own logits,
    upcast. The two agree to float rounding; chunked needs what chunked_loss_applies checks.
    """
    targets = micro_batch.targets.flatten()
    if not chunked:
        return F.cross_entropy(logits_of(engine, micro_batch).flatten(0, 1), targets, ignore_index=IGNORE,
                               reduction="sum")
    causal_lm = causal_lm_of(engine.module)
    return chunked_cross_entropy(hidden_of(causal_lm, micro_batch), causal_lm.get_output_embeddings().weight, targets)


@torch.no_grad()
def evaluate(engine, data: PackedRows, micro_batch_size: int, rank: int, world_size: int, device: torch.device,
             objective: Objective) -> tuple[dict[str, float], int]:
    """The objective's figures averaged over all eval rows (the loss first), and their units; the same on every
    rank."""
    engine.eval()
    totals = torch.zeros(len(objective.names) + 1, dtype=torch.float64, device=device)  # summed figures, units
    for micro_batch in eval_batches(data, micro_batch_size, rank, world_size):
        micro_batch = micro_batch.to(device)
        totals[:-1] += objective(engine, micro_batch)
        totals[-1] += objective.units_in(micro_batch)
    if world_size > 1:
        dist.all_reduce(totals)
    engine.train()
    *sums, units = totals.tolist()
    return objective.report([total / max(1.0, units) for total in sums]), int(units)
