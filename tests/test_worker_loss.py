"""What the loss sees: documents packed in a row stay apart, and the loss is the mean over the global
batch's loss tokens however the batch is cut into micro batches.

Runs DeepSpeed in this process (one rank, gloo), with plain SGD at lr 1 so that a step's weight change is
exactly minus the gradient.
"""

import copy
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.training.data import IGNORE, MicroBatch, PackedRows, step_batches
from test_worker import write_rows


@pytest.fixture(scope="module")
def one_rank():
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


def step_with(model, batch, micro_batch_size: int, zero_stage: int):
    """One optimizer step through the worker's train_step; returns (summed token loss, weight change)."""
    import deepspeed

    from tasks.training.worker import train_step

    model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 4 // micro_batch_size,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # SGD, for an update that is exactly the gradient
            "gradient_clipping": 0.0,
            "steps_per_print": 2**31 - 1,
        },
    )
    loss_sum, _ = train_step(engine, batch, torch.device("cpu"), world_size=1, clip=None)
    assert engine.global_steps == 1  # one optimizer step, after all micro batches
    return loss_sum.item(), {k: before[k] - v.detach() for k, v in engine.module.named_parameters()}


def test_accumulated_micro_batches_match_one_big_batch(one_rank, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = PackedRows(write_rows(tmp_path / "d", rows=4, context_length=32), "data_dir")
    batches = {
        micro: next(step_batches(data, seed=0, start_step=0, total_steps=1, batches_per_epoch=1,
                                 global_batch_size=4, micro_batch_size=micro, rank=0, world_size=1))
        for micro in (4, 1)
    }
    per_micro = [int((mb.targets != IGNORE).sum()) for mb in batches[1].micro_batches]
    assert len(set(per_micro)) > 1, "the test needs uneven loss-token counts per micro batch"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # The reference: one forward over all four rows, mean over every loss token, plain autograd.
    reference = copy.deepcopy(model)
    big = batches[4].micro_batches[0]
    logits = reference(input_ids=big.input_ids, position_ids=big.position_ids, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), big.targets.flatten(), ignore_index=IGNORE, reduction="sum")
    (loss / batches[4].loss_tokens).backward()
    gradients = {k: p.grad for k, p in reference.named_parameters()}

    one_batch_loss, one_batch_change = step_with(model, batches[4], micro_batch_size=4, zero_stage=0)
    for zero_stage in (0, 2):
        accumulated_loss, accumulated_change = step_with(model, batches[1], micro_batch_size=1, zero_stage=zero_stage)
        assert accumulated_loss == pytest.approx(one_batch_loss, rel=1e-5) == pytest.approx(loss.item(), rel=1e-5)
        for name, gradient in gradients.items():
            torch.testing.assert_close(accumulated_change[name], gradient, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(one_batch_change[name], gradient, rtol=1e-4, atol=1e-7)

    # And the test can tell: a mean of per-micro-batch means is a different loss on these rows.
    micro_losses = [
        F.cross_entropy(
            model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits.flatten(0, 1),
            mb.targets.flatten(), ignore_index=IGNORE,
        ).item()
        for mb in batches[1].micro_batches
    ]
    assert abs(np.mean(micro_losses) - one_batch_loss / batches[4].loss_tokens) > 1e-4


def test_packed_documents_do_not_see_each_other(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tasks.training.worker import logits_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first, second = torch.randint(3, 500, (1, 10)), torch.randint(3, 500, (1, 6))
    packed = MicroBatch(
        input_ids=torch.cat([first, second], 1),
        position_ids=torch.cat([torch.arange(10), torch.arange(6)])[None],
        targets=torch.full((1, 16), IGNORE),
    )
    alone = MicroBatch(input_ids=second, position_ids=torch.arange(6)[None], targets=torch.full((1, 6), IGNORE))
    torch.testing.assert_close(logits_of(model, packed)[:, 10:], logits_of(model, alone), rtol=1e-4, atol=1e-5)
