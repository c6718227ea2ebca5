"""The LM head's cross-entropy, a chunk of rows at a time, without ever holding the full [N, V] logits.

With Llama 3's 128,256-token vocabulary at context 4096, one row's fp32 logits are 4096 x 128256 x 4 B = 2 GiB, and
autograd keeps them (and their softmax, and their gradient) alive from the forward to the backward: more memory than
a 1B model's other activations, and time spent writing and reading them. Here each chunk of rows gets its logits in
fp32, its loss, and at once its gradients (softmax minus one-hot, times the weight and the hidden states); the chunk's
logits are then freed, so the extra memory is O(chunk_size x V). The forward keeps only the gradients for the
backward, which scales them by the incoming gradient: three matmuls per chunk, no recompute. Rows whose target is
ignored are dropped before any matmul: they carry no loss and no gradient, and with loss on responses only they are
a good share of a chat row. `chunked_loss_applies` says where this is what the model's own logits give.
"""

import torch

from tasks.training.rows import IGNORE

DEFAULT_CHUNK_ROWS = 1024  # 1024 x 128256 fp32 logits: 0.5 GiB, a matmul big enough to keep a GPU busy


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_ROWS, ignore_index: int = IGNORE) -> torch.Tensor:
    """Summed token loss of `hidden @ weight.T` [N, V] against `targets` [N]: an fp32 scalar, as
    F.cross_entropy(..., ignore_index=ignore_index, reduction="sum") on the upcast logits."""
    kept = _kept_rows(targets, chunk_size, ignore_index)
    return _ChunkedCrossEntropy.apply(
        hidden.index_select(0, kept), weight, targets.index_select(0, kept), chunk_size, torch.is_grad_enabled()
    )


def _kept_rows(targets: torch.Tensor, chunk_size: int, ignore_index: int) -> torch.Tensor:
    """The indices of the rows whose target counts. Indexing with them (not a boolean mask) keeps autograd's scatter
    back to [N, d] cheap."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return (targets != ignore_index).nonzero().squeeze(1)


def chunked_loss_applies(model: torch.nn.Module, zero_stage: int) -> bool:
    """Whether the model's logits are exactly its LM head applied to the decoder's output, so the chunked loss
    computes the same thing; and the head's weight is whole on this rank (ZeRO-3 partitions it)."""
    causal_lm = causal_lm_of(model)
    head = causal_lm.get_output_embeddings()
    rescaled = any(getattr(causal_lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (
        zero_stage < 3 and type(head) is torch.nn.Linear and head.bias is None and not rescaled
        and callable(getattr(causal_lm, "get_decoder", None))
    )


def causal_lm_of(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (adapters included), or the module itself."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and gradients in the forward, chunk by chunk; the backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                grad_enabled: bool):
        # needs_input_grad says True under no_grad too (an eval pass): it would compute gradients nobody reads.
        needs_hidden, needs_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # fp32 however the weight is stored: the chunks' contributions add up without bf16 rounding at each one.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            # The matmul in the inputs' dtype (fp32 accumulation on tensor cores), softmax and loss in fp32: the
            # same numbers as upcasting the full logits, as the worker does today.
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=1)
            loss += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if needs_hidden or needs_weight:
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad = grad.to(hidden.dtype)
                if needs_hidden:
                    grad_hidden[start : start + chunk_size] = grad @ weight
                if needs_weight:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is a scalar (the loss is one number): the stored gradients only need scaling.
        scale = grad_loss.float()
        return (
            None if grad_hidden is None else (grad_hidden.float() * scale).to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK_ROWS, ignore_index: int = IGNORE
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each kept target's log-probability under softmax(hidden @ weight.T), fp32 [K], and the kept rows' indices
    [K]: what DPO sums per sequence, as log_softmax(logits).gather(targets) on the upcast logits, without the [N, V]
    logits. Rows whose target is ignored skip the head, as in chunked_cross_entropy."""
    kept = _kept_rows(targets, chunk_size, ignore_index)
    logps = _ChunkedTokenLogps.apply(hidden.index_select(0, kept), weight, targets.index_select(0, kept), chunk_size)
    return logps, kept


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log-probabilities chunk by chunk. Unlike the summed loss above, each output has its own incoming
    gradient, unknown in the forward: the forward keeps each row's log-sum-exp and the backward recomputes a
    chunk's logits (one matmul more than _ChunkedCrossEntropy, the same O(chunk_size x V) memory)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ weight.T).float()
            lse[start:end] = torch.logsumexp(logits, dim=1)
            logps[start:end] = logits.gather(1, targets[start:end].unsqueeze(1)).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h, t, g = hidden[start:end], targets[start:end], grad_logps[start:end].float()
            # d logp_t / d logits = one_hot(t) - softmax, times each row's incoming gradient.
            grad = (h @ weight.T).float().sub_(lse[start:end].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
            grad[torch.arange(len(t), device=t.device), t] += g
            grad = grad.to(hidden.dtype)
            if needs_hidden:
                grad_hidden[start:end] = grad @ weight
            if needs_weight:
                grad_weight += grad.T @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None
