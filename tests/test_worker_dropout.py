"""Hidden and FFN dropout (Nova's hidden_dropout, ffn_dropout): where they act, and only in train mode."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tasks.errors import InvalidInputError
from tasks.training.dropout import add_dropouts

TOKENS = torch.arange(3, 35).reshape(2, 16)


def tiny(tiny_model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def captured(module: torch.nn.Module, inputs: bool) -> list[torch.Tensor]:
    """What `module` receives (inputs=True) or returns, every forward, seen after any earlier hooks."""
    seen = []
    if inputs:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    return seen


def test_hidden_dropout_drops_embeddings_attention_and_mlp_outputs_in_train_mode_only(tiny_model_dir):
    model, plain = tiny(tiny_model_dir), tiny(tiny_model_dir)
    assert add_dropouts(model, hidden=0.5, ffn=0.0) == 1 + 2 * 2  # embeddings, then self_attn and mlp per layer
    layer = model.model.layers[0]
    attention, mlp, embeddings = captured(layer.self_attn, False), captured(layer.mlp, False), captured(
        model.model.embed_tokens, False)
    model.train()
    model(TOKENS)
    for out in (attention[0], mlp[0], embeddings[0]):
        zeroed = (out == 0).float().mean().item()
        assert 0.4 < zeroed < 0.6, zeroed  # about half dropped, the rest scaled by 2
    model.eval(), plain.eval()
    assert torch.equal(model(TOKENS).logits, plain(TOKENS).logits)  # eval and generation: no dropout


def test_ffn_dropout_drops_the_activations_before_the_down_projection(tiny_model_dir):
    model = tiny(tiny_model_dir)
    assert add_dropouts(model, hidden=0.0, ffn=0.25) == 2
    down = captured(model.model.layers[1].mlp.down_proj, True)
    model.train()
    model(TOKENS)
    assert down[0].shape[-1] == 128  # the intermediate size: inside the MLP
    assert 0.2 < (down[0] == 0).float().mean().item() < 0.3


def test_dropout_after_lora_reaches_the_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    add_dropouts(model, hidden=0.0, ffn=0.5)
    lora_a = captured(model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"], True)
    model.train()
    model(TOKENS)
    assert 0.4 < (lora_a[0] == 0).float().mean().item() < 0.6  # the adapter sees the dropped activations


def test_a_model_without_the_modules_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(InvalidInputError, match=r"ffn_dropout \(0.1\) cannot be applied to this gpt2 model"):
        add_dropouts(gpt2, hidden=0.0, ffn=0.1)
    with pytest.raises(InvalidInputError, match=r"hidden_dropout \(0.1\) cannot be applied to this gpt2 model"):
        add_dropouts(gpt2, hidden=0.1, ffn=0.0)
    assert add_dropouts(gpt2, hidden=0.0, ffn=0.0) == 0
