"""DPO: the objective the loop runs on preference rows, and the reference log-probabilities it is measured against.

A row holds whole pairs, prompt + chosen and prompt + rejected side by side with per-document attention, so one
forward gives both sides' log-probabilities (a side's: the sum over its answer tokens). The reference model's are
computed once, before the first step, by the policy as it starts (with LoRA: the base, adapters off), kept in the
checkpoints folder, and read back on resume: no second model is held while training. SimPO has no reference.
"""

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.config import DpoCfg
from tasks.errors import InvalidInputError
from tasks.training.chunked_loss import causal_lm_of, chunked_token_logps
from tasks.training.data import MicroBatch, StepBatch, eval_batches, hidden_of, logits_of
from tasks.training.rows import IGNORE, PackedRows

REFERENCE_DIR = "reference"  # under the checkpoints folder: uploaded with them, found by a resumed run


def side_logps(engine, micro_batch: MicroBatch, chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's summed log-probabilities of its chosen and rejected answers, fp32 [pairs, 2], in the order of
    micro_batch.pairs, and each side's answer tokens [pairs, 2] (for IPO's averages).

    chunked: from the decoder's hidden states through the LM head a chunk of answer tokens at a time, never the
    full logits (chunked_loss.py); else from the model's own logits."""
    targets = micro_batch.targets.flatten()
    if chunked:
        causal_lm = causal_lm_of(engine.module)
        logps, kept = chunked_token_logps(hidden_of(causal_lm, micro_batch),
                                          causal_lm.get_output_embeddings().weight, targets)
    else:
        kept = (targets != IGNORE).nonzero().squeeze(1)
        logits = logits_of(engine, micro_batch).flatten(0, 1).index_select(0, kept)
        logps = logits.log_softmax(-1).gather(1, targets[kept].unsqueeze(1)).squeeze(1)
    sides = micro_batch.sides.flatten()[kept]
    slots = 2 * len(micro_batch.pairs)
    sums = torch.zeros(slots, device=logps.device).index_add(0, sides, logps)
    tokens = torch.zeros(slots, device=logps.device).index_add_(0, sides, torch.ones_like(logps))
    return sums.view(-1, 2), tokens.view(-1, 2)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor | None, tokens: torch.Tensor,
             settings: DpoCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's loss [pairs] and both sides' implicit rewards, beta x (policy - reference) [pairs, 2], from
    summed log-probabilities [pairs, 2] (chosen, rejected).

    sigmoid: -log sigmoid(beta x h), h the chosen side's log-ratio minus the rejected side's (Rafailov et al.
    2023); label_smoothing eps mixes in the flipped pair: (1 - eps) x that + eps x -log sigmoid(-beta x h).
    ipo: (h - 1 / (2 beta))^2 on log-probabilities averaged over each side's tokens (Azar et al. 2023, as TRL).
    simpo: -log sigmoid(beta x h - gamma), h the difference of the sides' averaged log-probabilities themselves, no
    reference (Meng et al. 2024, as TRL's CPO trainer); label smoothing as for sigmoid.
    rpo_alpha adds that weight times the chosen answer's mean token negative log-likelihood (RPO)."""
    chosen_nll = -policy[:, 0] / tokens[:, 0].clamp(min=1)
    if settings.loss_type in ("ipo", "simpo"):  # compared per token, not summed over the answer
        policy = policy / tokens.clamp(min=1)
        reference = None if reference is None else reference / tokens.clamp(min=1)
    ratios = policy if settings.reference_free else policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    beta, eps = settings.beta, settings.label_smoothing
    if settings.loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        z = beta * h - (settings.simpo_gamma if settings.loss_type == "simpo" else 0)
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return losses + settings.rpo_alpha * chosen_nll, beta * ratios.detach()


class PreferenceLoss:
    """The DPO loss against `reference` ([pairs, 2] on the device, rows numbered as the data set's pairs; None for
    SimPO), with the rewards TRL reports: chosen, rejected, and the share of pairs whose chosen answer earns more
    (accuracy)."""

    names, unit = ("loss", "reward_chosen", "reward_rejected", "reward_accuracy"), "pairs"

    def __init__(self, settings: DpoCfg, reference: torch.Tensor | None, chunked: bool):
        self.settings, self.reference, self.chunked = settings, reference, chunked

    def __call__(self, engine, micro_batch: MicroBatch) -> torch.Tensor:
        policy, tokens = side_logps(engine, micro_batch, self.chunked)
        reference = None if self.reference is None else self.reference[micro_batch.pairs]
        losses, rewards = dpo_loss(policy, reference, tokens, self.settings)
        chosen, rejected = rewards.unbind(1)
        return torch.stack([losses.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).float().sum()])

    def units(self, batch: StepBatch) -> int:
        return batch.pairs

    def units_in(self, micro_batch: MicroBatch) -> int:
        return len(micro_batch.pairs)

    def report(self, means: list[float]) -> dict[str, float]:
        loss, chosen, rejected, accuracy = means
        return {"loss": loss, "reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": chosen - rejected, "reward_accuracy": accuracy}


def reference_logps(engine, data: PackedRows, split: str, output_dir: Path, micro_batch_size: int, rank: int,
                    world_size: int, device: torch.device, chunked: bool, resumed: bool) -> torch.Tensor:
    """The reference model's [pairs, 2] log-probabilities of `data`: read from output_dir/reference/<split>.npy, or
    computed now by the engine's model as it starts (a run that has checkpointed has moved on from it) and kept
    there. Every rank calls it."""
    path = output_dir / REFERENCE_DIR / f"{split}.npy"
    if path.is_file():
        kept = np.load(path)
        if kept.shape != (data.pairs, 2):
            raise InvalidInputError(f"{path} holds {kept.shape[0]} pairs' reference log-probabilities, but the "
                                    f"{split} data has {data.pairs}: start a fresh run for the new data")
        return torch.from_numpy(kept).to(device)
    if resumed:
        raise InvalidInputError(f"{output_dir} has checkpoints but no {path.relative_to(output_dir)}: the reference "
                                "log-probabilities cannot be computed once training has moved on; start a fresh run")
    computed = _reference_pass(engine, data, micro_batch_size, rank, world_size, device, chunked)
    if rank == 0:  # written whole before any checkpoint can exist
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, computed.cpu().numpy())
        os.replace(partial, path)
    return computed


@torch.no_grad()
def _reference_pass(engine, data: PackedRows, micro_batch_size: int, rank: int, world_size: int,
                    device: torch.device, chunked: bool) -> torch.Tensor:
    """One pass over every row in eval mode, each rank a share (eval_batches), summed over the ranks."""
    engine.eval()
    totals = torch.zeros(data.pairs, 2, device=device)
    adapters_off = engine.module.disable_adapter() if hasattr(engine.module, "disable_adapter") else nullcontext()
    with adapters_off:
        for micro_batch in eval_batches(data, micro_batch_size, rank, world_size):
            micro_batch = micro_batch.to(device)
            totals.index_add_(0, micro_batch.pairs, side_logps(engine, micro_batch, chunked)[0])
    if world_size > 1:
        dist.all_reduce(totals)
    engine.train()
    return totals
