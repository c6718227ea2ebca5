"""One optimizer step, the token loss it minimises, and the eval loss: what the loop runs on the engine."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.training.chunked_loss import causal_lm_of, chunked_cross_entropy
from tasks.training.data import MicroBatch, StepBatch, eval_batches, logits_of
from tasks.training.rows import IGNORE, PackedRows


def train_step(engine, batch: StepBatch, device: torch.device, world_size: int, clip: float | None, chunked: bool):
    """One optimizer step over this rank's micro batches; returns its summed token loss and the grad norm.

    The loss is the mean over all loss tokens of the global batch (every micro batch, every rank), so each
    token weighs the same however tokens fall into micro batches: each micro batch's summed token loss is
    divided by the global count. DeepSpeed averages gradients over ranks, so multiply by world_size to get
    their sum, and scale_wrt_gas=False stops it dividing by the accumulation steps as well.
    `clip` is set when we clip ourselves (see build_engine); `chunked` picks token_loss's path; the loss stays on
    the device.
    """
    loss_sum = torch.zeros((), device=device)
    grad_norm = None
    last = len(batch.micro_batches) - 1
    for i, micro_batch in enumerate(batch.micro_batches):
        loss = token_loss(engine, micro_batch.to(device), chunked)
        engine.backward(loss * (world_size / max(1, batch.loss_tokens)), scale_wrt_gas=False)
        if clip is not None and i == last:  # the last backward has reduced the gradients across ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip or math.inf)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        loss_sum += loss.detach()
    return loss_sum, grad_norm if clip is not None else engine.get_global_grad_norm()


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
    hidden = causal_lm.get_decoder()(
        input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids, use_cache=False
    ).last_hidden_state
    return chunked_cross_entropy(hidden.flatten(0, 1), causal_lm.get_output_embeddings().weight, targets)


@torch.no_grad()
def evaluate(engine, data: PackedRows, micro_batch_size: int, rank: int, world_size: int, device: torch.device,
             chunked: bool):
    """Mean token loss over all eval rows (and their loss-token count), the same on every rank."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, loss tokens
    for micro_batch in eval_batches(data, micro_batch_size, rank, world_size):
        micro_batch = micro_batch.to(device)
        totals[0] += token_loss(engine, micro_batch, chunked)
        totals[1] += (micro_batch.targets != IGNORE).sum()
    if world_size > 1:
        dist.all_reduce(totals)
    engine.train()
    loss, tokens = totals.tolist()
    return loss / max(1.0, tokens), int(tokens)
