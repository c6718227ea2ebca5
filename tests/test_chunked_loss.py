"""chunked_cross_entropy against F.cross_entropy on the full logits, and chunked_token_logps (DPO's per-token
log-probabilities) against log_softmax: the values and both gradients, on CPU."""

import pytest
import torch
import torch.nn.functional as F

from tasks.training.chunked_loss import chunked_cross_entropy, chunked_token_logps
from tasks.training.rows import IGNORE


def inputs(rows: int = 37, hidden: int = 16, vocab: int = 50, seed: int = 0, ignored: float = 0.3):
    """Hidden states and weight that need grads, and targets with a share of them ignored."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=generator)
    t[torch.rand(rows, generator=generator) < ignored] = IGNORE
    return h, w, t


def loss_and_grads(loss_fn, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """The loss of fresh copies of h and w, and their gradients after a backward from 2 x the loss."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(h, w, t)
    (2 * loss).backward()  # a gradient other than 1 checks that the backward scales by it
    return loss.detach(), h.grad, w.grad


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(h @ w.T, t, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000])
def test_loss_and_gradients_match_full_logits(chunk_size):
    h, w, t = inputs()
    expected = loss_and_grads(reference, h, w, t)
    got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk_size), h, w, t)
    assert got[0].dtype == torch.float32
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-5)


def test_ignored_rows_contribute_nothing():
    h, w, t = inputs()
    loss, grad_h, _ = loss_and_grads(chunked_cross_entropy, h, w, t)
    ignored = t == IGNORE
    assert ignored.any() and (grad_h[ignored] == 0).all()
    changed = h.detach().clone()
    changed[ignored] = 1e6  # would dominate the loss if these rows were counted
    assert loss_and_grads(chunked_cross_entropy, changed, w, t)[0] == loss


def test_all_ignored_chunks():
    h, w, t = inputs(rows=12)
    t[:8] = IGNORE  # chunks of 4: the first two have no loss at all
    expected = loss_and_grads(reference, h, w, t)
    got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=4), h, w, t)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-5)

    t[:] = IGNORE  # nothing to learn from: a zero loss that still backpropagates, zero gradients
    loss, grad_h, grad_w = loss_and_grads(chunked_cross_entropy, h, w, t)
    assert loss == 0 and (grad_h == 0).all() and (grad_w == 0).all()


def test_frozen_weight_and_bf16():
    """LoRA freezes the LM head: only the hidden states get a gradient. bf16 inputs give fp32 loss, bf16 grads."""
    h, w, t = inputs()
    h16 = h.detach().to(torch.bfloat16).requires_grad_()
    loss = chunked_cross_entropy(h16, w.detach().to(torch.bfloat16), t, chunk_size=8)
    loss.backward()
    expected = reference(h16.detach().float(), w.detach().to(torch.bfloat16).float(), t)
    assert loss.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-2)


def test_no_grad_computes_only_the_loss():
    h, w, t = inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, t, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), reference(h, w, t).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
def test_token_logps_and_their_gradients_match_full_logits(chunk_size):
    h, w, t = inputs()
    kept = (t != IGNORE).nonzero().squeeze(1)
    # Each token's log-probability gets its own incoming gradient, as DPO's per-sequence sums give it.
    weights = torch.randn(len(kept), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def full(h, w, t):
        logps = (h @ w.T).log_softmax(-1)[kept, t[kept]]
        return (weights * logps).sum(), logps

    def chunked(h, w, t):
        logps, rows = chunked_token_logps(h, w, t, chunk_size=chunk_size)
        assert torch.equal(rows, kept) and logps.dtype == torch.float32
        return (weights * logps.double()).sum(), logps

    expected = loss_and_grads(lambda *a: full(*a)[0], h, w, t)
    got = loss_and_grads(lambda *a: chunked(*a)[0], h, w, t)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked(h, w, t)[1].double(), full(h, w, t)[1].detach(), rtol=1e-5, atol=1e-5)
