"""What the loss sees: documents packed in a row stay apart, and the loss is the mean over the global
batch's loss tokens however the batch is cut into micro batches. And what the optimizer and the model's
modes do: weight decay spares biases and norm weights, dropout acts in training steps only.

Runs DeepSpeed in this process (one rank, gloo), with plain SGD at lr 1 so that a step's weight change is
exactly minus the gradient, or with the worker's AdamW and zero gradients, so that the change is the decay.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.errors import InvalidInputError
from tasks.ports import free_port
from tasks.training.data import MicroBatch, step_batches
from tasks.training.rows import IGNORE, PackedRows
from tasks.recipe import configure
from test_worker import write_rows


@pytest.fixture(scope="module")
def one_rank():
    import deepspeed

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


def step_with(model, batch, micro_batch_size: int, zero_stage: int, chunked: bool = False):
    """One optimizer step through the worker's train_step; returns (summed token loss, weight change)."""
    import deepspeed

    from tasks.training.step import TokenLoss, train_step

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
    loss_sum, _ = train_step(engine, batch, torch.device("cpu"), world_size=1, clip=None, objective=TokenLoss(chunked))
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
    # Both loss paths: the model's full logits, and the LM head's loss in chunks (the worker's default).
    for zero_stage, chunked in ((0, False), (2, False), (0, True), (2, True)):
        accumulated_loss, accumulated_change = step_with(model, batches[1], micro_batch_size=1, zero_stage=zero_stage,
                                                         chunked=chunked)
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

    from tasks.training.data import logits_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first, second = torch.randint(3, 500, (1, 10)), torch.randint(3, 500, (1, 6))
    packed = MicroBatch(
        input_ids=torch.cat([first, second], 1),
        position_ids=torch.cat([torch.arange(10), torch.arange(6)])[None],
        targets=torch.full((1, 16), IGNORE),
    )
    alone = MicroBatch(input_ids=second, position_ids=torch.arange(6)[None], targets=torch.full((1, 6), IGNORE))
    torch.testing.assert_close(logits_of(model, packed)[:, 10:], logits_of(model, alone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_weight_decay_shrinks_matrices_but_not_biases_or_norm_weights(one_rank, tmp_path, zero_stage):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.training.engine import build_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attention_bias=True, mlp_bias=True,  # biases too, which Llama leaves out by default
    ))
    settings = configure(shorthands=dict(model="m", train_data_path="t", register_to="main.test", learning_rate=1e-3),
                         overrides={"training_config.model.optim.weight_decay": 0.5,
                                    "training_config.model.optim.betas": [0.8, 0.9],
                                    "training_config.model.optim.eps": 1e-6}).training_config.model
    optimizer = build_optimizer(model, settings, offloaded_from_gpu=False, cuda=False)
    decayed, spared = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert (decayed["weight_decay"], spared["weight_decay"]) == (0.5, 0.0)
    assert all((g["betas"], g["eps"]) == ((0.8, 0.9), 1e-6) for g in optimizer.param_groups)
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decayed["params"])
    spared_names = sorted(names[id(p)] for p in spared["params"])
    assert any(n.endswith("_proj.bias") for n in spared_names) and "model.norm.weight" in spared_names
    assert len(decayed["params"]) + len(spared["params"]) == len(names)

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config={"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1},
    )
    # Zero gradients: Adam's update is 0, so a step changes a weight only by decay, p * (1 - lr * weight_decay).
    engine.backward(sum(p.sum() for p in engine.module.parameters()) * 0.0)
    engine.step()
    for name, after in engine.module.named_parameters():
        expected = before[name] * (1 - 1e-3 * 0.5) if after.ndim >= 2 else before[name]
        torch.testing.assert_close(after.detach(), expected, rtol=1e-6, atol=0, msg=name)


def test_attention_dropout_is_set_on_the_config_and_acts_in_train_mode_only(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from tasks.training.engine import model_config

    config = model_config(tiny_model_dir, 0.5)
    assert config.attention_dropout == 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, dtype=torch.float32)
    inputs = dict(input_ids=torch.randint(3, 500, (1, 16)), use_cache=False)
    model.eval()
    torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits)
    model.train()
    assert not torch.allclose(model(**inputs).logits, model(**inputs).logits)  # dropped different attention weights
    assert model_config(tiny_model_dir, 0.0).attention_dropout == 0.0

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)  # dropout under other names: attn_pdrop
    with pytest.raises(InvalidInputError, match="attention_dropout .0.1. cannot be set on this gpt2 model"):
        model_config(tmp_path, 0.1)
    assert model_config(tmp_path, 0.0).model_type == "gpt2"  # 0: nothing to set, nothing refused


def test_steps_run_in_train_mode_and_eval_and_generation_in_eval_mode(one_rank, tiny_model_dir, tmp_path):
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.training.generation import answer
    from tasks.training.step import TokenLoss, evaluate, train_step

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    modes = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters()),
        config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1},
    )
    data = PackedRows(write_rows(tmp_path / "d", rows=2, context_length=16), "data_dir")
    batch = next(step_batches(data, seed=0, start_step=0, total_steps=1, batches_per_epoch=1, global_batch_size=2,
                              micro_batch_size=1, rank=0, world_size=1))
    cpu = torch.device("cpu")

    engine.train()  # as the worker does before its loop
    train_step(engine, batch, cpu, world_size=1, clip=1.0, objective=TokenLoss(chunked=True))
    assert modes == [True, True]
    modes.clear()
    evaluate(engine, data, micro_batch_size=1, rank=0, world_size=1, device=cpu, objective=TokenLoss(chunked=True))
    assert modes == [False, False] and engine.training and engine.module.training  # back to training
    modes.clear()
    answer(engine, AutoTokenizer.from_pretrained(tiny_model_dir), ["Hi"], seed=0, device=cpu, synced=False)
    assert modes and not any(modes) and engine.training and engine.module.training


def test_the_chunked_loss_is_used_only_where_it_computes_the_models_own_logits(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from tasks.training.chunked_loss import chunked_loss_applies

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert chunked_loss_applies(llama, zero_stage=2)
    assert not chunked_loss_applies(llama, zero_stage=3)  # the head's weight is partitioned over the ranks
    assert chunked_loss_applies(get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules="all-linear")), 0)
    # An adapter on the head itself: its output is no longer hidden @ weight.T.
    assert not chunked_loss_applies(get_peft_model(llama, LoraConfig(r=4, target_modules=["lm_head"])), 0)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert not chunked_loss_applies(gemma2, zero_stage=0)  # logits soft-capped after the head
