"""Packing layout, and the property packing relies on: a packed document's loss equals its loss alone."""

import numpy as np

from tasks.data.pack import RowBlock, pack_best_fit, pack_stream
from tasks.data.tokenize import IGNORE, Encoder, Example, tokenize_chat

PAD = 0


def example(first: int, length: int, loss: bool = True) -> Example:
    ids = np.arange(first, first + length, dtype=np.int32)
    return Example(ids, ids.copy() if loss else np.full(length, IGNORE, dtype=np.int32))


def test_whole_examples_best_fit_longest_first():
    rows = pack_best_fit([example(30, 3), example(20, 4), example(10, 5)], context_length=8, pad_id=PAD)
    # Longest first: 5 opens row A; 4 does not fit A (room 3), opens row B; 3 fills A.
    assert [r.input_ids.tolist() for r in rows] == [[10, 11, 12, 13, 14, 30, 31, 32], [20, 21, 22, 23, 0, 0, 0, 0]]
    assert [r.position_ids.tolist() for r in rows] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    # No loss on a document's first token (its predecessor is another document) nor on padding.
    assert [r.labels.tolist() for r in rows] == [[IGNORE, 11, 12, 13, 14, IGNORE, 31, 32],
                                                 [IGNORE, 21, 22, 23, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert [r.num_tokens for r in rows] == [8, 4]
    assert all(r.input_ids.dtype == np.int32 and len(r.input_ids) == 8 for r in rows)
    block = RowBlock.of(rows, 8)
    assert block.input_ids.shape == (2, 8) and block.num_tokens.tolist() == [8, 4]


def test_an_example_goes_to_the_fullest_row_it_fits():
    rows = pack_best_fit([example(10, 6), example(20, 5), example(30, 3)], context_length=10, pad_id=PAD)
    assert [r.num_tokens for r in rows] == [9, 5]  # 3 joins the row with 4 free, not the one with 5


def test_documents_stream_into_full_rows():
    rows = list(pack_stream([example(10, 5), example(20, 6)], context_length=4, pad_id=PAD))
    assert [r.input_ids.tolist() for r in rows] == [[10, 11, 12, 13], [14, 20, 21, 22], [23, 24, 25, 0]]
    assert [r.position_ids.tolist() for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 0]]
    assert [r.labels.tolist() for r in rows] == [[IGNORE, 11, 12, 13], [IGNORE, IGNORE, 21, 22],
                                                 [IGNORE, 24, 25, IGNORE]]
    assert [r.num_tokens for r in rows] == [4, 4, 3]


def test_a_packed_document_scores_as_if_alone(tiny_model_dir):
    """transformers builds a per-document causal mask from restarting position_ids when attention_mask is None
    (and there is no KV cache: use_cache=False, else the packed-sequence detection is skipped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "6"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    ]
    examples = tokenize_chat(Encoder(tokenizer), conversations, context_length=256)
    row, = pack_best_fit(examples, context_length=256, pad_id=tokenizer.pad_token_id)
    assert 0 < row.num_tokens < 256  # three documents, then padding

    def token_losses(ids, labels, position_ids=None) -> torch.Tensor:
        ids, labels = torch.tensor(ids[None], dtype=torch.long), torch.tensor(labels[None], dtype=torch.long)
        pos = None if position_ids is None else torch.tensor(position_ids[None], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")

    packed = token_losses(row.input_ids, row.labels, row.position_ids)
    start = 0
    for example in sorted(examples, key=lambda e: -len(e)):  # best fit puts the longest first
        alone = token_losses(example.input_ids, example.labels)
        # Packed token t predicts label t + 1; a document's own positions 0..n-2 predict its labels 1..n-1.
        torch.testing.assert_close(packed[start:start + len(example) - 1], alone, rtol=0, atol=1e-5)
        assert packed[start:start + len(example) - 1].sum() > 0
        start += len(example)
    assert row.labels[start:].tolist() == [IGNORE] * (256 - start)
