"""Token ids and loss labels per task type, with SmolLM2's real tokenizer and chat template."""

import copy

import numpy as np
import pytest

from tasks.data.tokenize import IGNORE, Encoder, tokenize_chat, tokenize_documents, tokenize_instructions
from tasks.errors import InvalidInputError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return Encoder(tokenizer)


def learned_spans(tokenizer, example) -> list[str]:
    """The text of each run of consecutive tokens that carry loss."""
    spans, run = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist()):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def msgs(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def test_chat_loss_is_on_assistant_replies_and_their_end_of_turn(tokenizer, encoder):
    conversations = [
        msgs(("user", "Hi there"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", " 4 \n")),
        msgs(("system", "Answer in French."), ("user", "Thanks"), ("assistant", "De rien.")),
    ]
    first, second = tokenize_chat(encoder, conversations, context_length=1000)
    assert learned_spans(tokenizer, first) == ["Hello!<|im_end|>", " 4 \n<|im_end|>"]
    assert learned_spans(tokenizer, second) == ["De rien.<|im_end|>"]
    # The ids are the template's own rendering, tokenized once (SmolLM2 adds its default system prompt).
    rendered = tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert tokenizer.decode(first.input_ids) == rendered
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert not first.truncated and first.has_loss


@pytest.mark.parametrize("template, expected", [
    ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
     "renders earlier turns differently"),
    (None, "has no chat template: use an instruct model"),
])
def test_chat_refuses_templates_it_cannot_label(tokenizer, template, expected):
    other = copy.copy(tokenizer)
    other.chat_template = template
    with pytest.raises(InvalidInputError, match=expected):
        tokenize_chat(Encoder(other), [msgs(("user", "Hi"), ("assistant", "Hello"))], context_length=100)


def test_instruction_loss_is_on_response_and_eos(tokenizer, encoder):
    ift, alias = tokenize_instructions(
        encoder, [{"prompt": "Q: capital of France?\nA:", "response": " Paris"},
                    {"prompt": "Say hi.", "completion": " Hi"}], context_length=100)
    assert learned_spans(tokenizer, ift) == [" Paris<|im_end|>"]
    assert tokenizer.decode(ift.input_ids) == "Q: capital of France?\nA: Paris<|im_end|>"  # no template
    assert learned_spans(tokenizer, alias) == [" Hi<|im_end|>"]


def test_truncation_cuts_to_context_length_and_may_leave_no_loss(tokenizer, encoder):
    long_answer, long_prompt = tokenize_instructions(
        encoder, [{"prompt": "Q", "response": " word" * 50}, {"prompt": "word " * 50, "response": "A"}],
        context_length=10)
    assert len(long_answer) == 10 and long_answer.truncated and long_answer.has_loss
    assert len(long_prompt) == 10 and long_prompt.truncated and not long_prompt.has_loss
    chat, = tokenize_chat(encoder, [msgs(("user", "Hi"), ("assistant", "Hello"))], context_length=8)
    assert chat.truncated and not chat.has_loss  # the default system prompt alone fills 8 tokens


def test_documents_are_whole_with_eos_and_loss_everywhere(tokenizer, encoder):
    doc, empty = tokenize_documents(encoder, ["Tessera fine-tunes models. " * 100, ""])
    assert len(doc) > 100 and not doc.truncated  # the packer cuts documents, not the tokenizer
    assert doc.input_ids[-1] == tokenizer.eos_token_id
    np.testing.assert_array_equal(doc.labels, doc.input_ids)
    assert empty.input_ids.tolist() == [tokenizer.eos_token_id] and not empty.has_loss


def test_pieces_of_a_large_document_get_bos_and_eos_only_at_its_ends(tokenizer, encoder):
    first, middle, last = (tokenize_documents(encoder, ["Tessera."], lead=lead, eos=eos)[0]
                           for lead, eos in ((True, False), (False, False), (False, True)))
    assert first.input_ids[-1] != tokenizer.eos_token_id and last.input_ids[-1] == tokenizer.eos_token_id
    assert len(first) == len(middle) == len(last) - 1  # SmolLM2 puts no BOS; the EOS is the only extra


@pytest.mark.parametrize("text", [
    "plain ascii, with  two spaces\n\nand lines",
    "Grüße aus Köln — 東京 🙂🙂 naïve café\r\n\ttabs",
    " leading space and trailing \n ",
])
def test_byte_level_offsets_label_exactly_what_the_tokenizers_offsets_do(encoder, text):
    """The fast path (token starts from byte lengths) and the tokenizer's own offsets give the same labels."""
    spans = [(0, len(text) // 3), (len(text) // 2, len(text) - 2)]
    assert encoder.byte_lengths is not None  # SmolLM2's tokenizer is byte-level BPE
    (fast_ids, fast_labels), = encoder.labelled([text], [spans])
    slow = Encoder.__new__(Encoder)
    slow.tokenizer, slow.backend, slow.byte_lengths = encoder.tokenizer, encoder.backend, None
    (ids, labels), = slow.labelled([text], [spans])
    np.testing.assert_array_equal(fast_ids, ids)
    np.testing.assert_array_equal(fast_labels, labels)
    assert (labels != IGNORE).any()


def test_replies_found_in_one_render_match_those_found_by_rendering_prefixes(tokenizer):
    """The fast way (find each message in the full render, framed by the template's marks) and the slow way
    (render every prefix) agree, including where a reply's text also appears earlier in the conversation."""
    from tasks.data.tokenize import _marked_spans, _prefix_spans, chat_spans, turn_marks

    conversations = [
        msgs(("user", "You"), ("assistant", "You")),  # "You" is in SmolLM2's default system prompt too
        msgs(("user", "Say Paris"), ("assistant", "Paris"), ("user", "Again"), ("assistant", "Paris")),
        msgs(("system", "Terse."), ("user", "2+2?"), ("assistant", " 4 \n")),
        msgs(("user", "<|im_end|>"), ("assistant", "<|im_start|>assistant\nodd")),
    ]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    marks = turn_marks(tokenizer)
    assert marks == ("<|im_start|>assistant\n", "<|im_end|>\n")
    fast = [_marked_spans(text, messages, marks) for text, messages in zip(texts, conversations)]
    slow = _prefix_spans(tokenizer, conversations, texts)
    assert fast[0] is None  # the user's "You" is first found in the system prompt: unsure, so prefixes decide
    assert fast[1:] == slow[1:]
    assert chat_spans(tokenizer, conversations) == (texts, slow)


def test_a_template_that_rewrites_text_falls_back_to_rendering_prefixes(tokenizer, encoder):
    other = copy.copy(tokenizer)
    other.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (example,) = tokenize_chat(Encoder(other), [msgs(("user", "Hi"), ("assistant", "  Hello  "))], context_length=100)
    assert learned_spans(other, example) == ["Hello<|im_end|>"]
