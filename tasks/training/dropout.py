"""Hidden and FFN dropout for Hugging Face decoder models, whose configs have no such fields.

Nova's recipes take them from Megatron/NeMo, where `hidden_dropout` drops the embeddings and each attention and
MLP output before it joins the residual stream, and `ffn_dropout` drops the MLP's activations before its down
projection. Here they are forward hooks on those modules, found by their Hugging Face names (`*.self_attn`,
`*.mlp`, `*.mlp.down_proj`), so they act like the model's own dropout: only in train mode, never in eval or
generation. Register them after any LoRA wrapping, so that a dropped input feeds the adapter as well as the base.
"""

import torch
import torch.nn.functional as F

from tasks.errors import InvalidInputError


def add_dropouts(model: torch.nn.Module, hidden: float, ffn: float) -> int:
    """Hook `hidden` and `ffn` dropout onto the model's blocks; returns how many modules got a hook."""
    names = dict(model.named_modules())
    attentions = [m for n, m in names.items() if n.endswith(".self_attn")]
    mlps = [m for n, m in names.items() if n.endswith(".mlp")]
    down_projections = [m for n, m in names.items() if n.endswith(".mlp.down_proj")]
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    hooked = 0
    if hidden:
        if not attentions or len(attentions) != len(mlps):  # a partial match would drop only some of the outputs
            raise InvalidInputError(
                f"hidden_dropout ({hidden}) cannot be applied to this {model_type} model: it lacks a self_attn and "
                "an mlp module per layer to drop the outputs of; leave hidden_dropout at 0"
            )
        for module in [model.get_input_embeddings(), *attentions, *mlps]:
            module.register_forward_hook(_drop_output(hidden))
        hooked += 1 + len(attentions) + len(mlps)
    if ffn:
        if not down_projections:
            raise InvalidInputError(
                f"ffn_dropout ({ffn}) cannot be applied to this {model_type} model: it has no mlp.down_proj modules; "
                "leave ffn_dropout at 0"
            )
        for module in down_projections:
            module.register_forward_pre_hook(_drop_input(ffn))
        hooked += len(down_projections)
    return hooked


def _drop_output(p: float):
    def hook(module, args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    return hook


def _drop_input(p: float):
    def hook(module, args):
        if not module.training:
            return None
        return (F.dropout(args[0], p, training=True), *args[1:])

    return hook
