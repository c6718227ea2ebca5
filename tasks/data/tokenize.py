"""Token ids and loss labels per example: the assistant's turns for chat, the response for instructions,
everything for continued pretraining.

Loss spans are found in the text, then mapped to tokens by where each token starts. Asking the tokenizer for
character offsets costs more than the tokenization itself, so for byte-level BPE tokenizers (GPT-2, Llama 3,
Qwen, SmolLM) a token's start is the running sum of the byte lengths its predecessors decode to; each example
checks that the lengths add up to its text, and anything else takes the tokenizer's offsets. Such tokenizers
are also run through their tiktoken twin (fast_bpe), checked against the original on one text of every batch."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.data import fast_bpe
from tasks.data.fast_bpe import tiktoken_twin
from tasks.errors import InvalidInputError

if TYPE_CHECKING:  # a run's flow process imports this module and needs no transformers: its tokenizer's callers do
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # the label of tokens the loss skips (cross-entropy's ignore_index)
_PROBE = "Héllo wörld!  Ünïcödé 東京 🙂\n\n\tcode:  x = [1, 2]\r\n"


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32: the token where it carries loss, else IGNORE
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def has_loss(self) -> bool:
        # Nothing precedes the first token, so it is never predicted and cannot carry loss.
        return bool((self.labels[1:] != IGNORE).any())


Span = tuple[int, int]  # [start, end) in characters of the example's text


class Encoder:
    """A fast tokenizer, with what it takes to label spans of text quickly."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase"):
        if not tokenizer.is_fast:
            raise InvalidInputError(f"{tokenizer.name_or_path} has no fast tokenizer (tokenizer.json); Tessera needs one")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.byte_lengths = _byte_lengths(tokenizer)
        self.twin = tiktoken_twin(tokenizer) if self.byte_lengths is not None else None

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added around it."""
        texts = list(texts)
        if self.twin is not None and texts:
            ids = fast_bpe.encode(self.twin, texts)
            if ids[0] == self.backend.encode(texts[0], add_special_tokens=False).ids:
                return ids
            self.twin = None  # they differ on this data: the original from here on
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def labelled(self, texts: Sequence[str], spans: Sequence[Sequence[Span]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, labels) of each text, with loss on the tokens that start inside one of its spans."""
        out = []
        fast = self.ids(texts) if self.byte_lengths is not None else [None] * len(texts)
        for text, text_spans, token_ids in zip(texts, spans, fast):
            starts = None
            if token_ids is not None:
                ids = np.asarray(token_ids, dtype=np.int32)
                ends = np.cumsum(self.byte_lengths[ids])
                raw = text.encode()
                if len(ids) == 0 or ends[-1] == len(raw):
                    starts = ends - self.byte_lengths[ids]
                    text_spans = _byte_spans(text, text_spans)
            if starts is None:  # not byte-level, or this text decodes differently: ask for offsets
                encoding = self.backend.encode(text, add_special_tokens=False)
                ids = np.asarray(encoding.ids, dtype=np.int32)
                starts = np.fromiter((start for start, _ in encoding.offsets), dtype=np.int64, count=len(ids))
            learn = np.zeros(len(ids), dtype=bool)
            for start, end in text_spans:
                learn |= (starts >= start) & (starts < end)
            out.append((ids, np.where(learn, ids, IGNORE).astype(np.int32)))
        return out


def _byte_lengths(tokenizer: "PreTrainedTokenizerBase") -> np.ndarray | None:
    """Bytes each token id decodes to, if the tokenizer is lossless byte-level BPE; else None.

    In byte-level vocabularies each character of a token stands for one byte; added tokens are their UTF-8 text.
    The table is trusted only if it reproduces the tokenizer's own offsets on a probe with multi-byte text."""
    backend = tokenizer.backend_tokenizer
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        lengths[i] = len(token)
    for i, added in tokenizer.added_tokens_decoder.items():
        lengths[i] = len(added.content.encode())
    encoding = backend.encode(_PROBE, add_special_tokens=False)
    ends = np.cumsum(lengths[encoding.ids])
    char_at = [i for i, char in enumerate(_PROBE) for _ in char.encode()]  # the character each byte belongs to
    if ends[-1] != len(char_at):
        return None
    # A token may start inside a multi-byte character (an emoji split in two); its offset is that character.
    if any(char_at[byte] != start for (start, _), byte in zip(encoding.offsets, ends - lengths[encoding.ids])):
        return None
    return lengths


def _byte_spans(text: str, spans: Sequence[Span]) -> Sequence[Span]:
    if text.isascii():
        return spans
    return [(len(text[:start].encode()), len(text[:end].encode())) for start, end in spans]


def tokenize_chat(encoder: Encoder, conversations: Sequence[list[dict]], context_length: int) -> list[Example]:
    """The model's own chat template; loss on each assistant reply and the end-of-turn token(s) after it."""
    texts, spans = chat_spans(encoder.tokenizer, conversations)
    return [_cut(ids, labels, context_length) for ids, labels in encoder.labelled(texts, spans)]


def chat_spans(tokenizer: "PreTrainedTokenizerBase", conversations: Sequence[list[dict]]) -> tuple[list[str], list[list[Span]]]:
    """Each conversation rendered by the chat template, and the character spans of its assistant replies: from the
    reply's first character through the template's end-of-turn mark after it."""
    if tokenizer.chat_template is None:
        raise InvalidInputError(
            f"{tokenizer.name_or_path} has no chat template: use an instruct model for CHAT_COMPLETION, "
            "or give prompt/response records with INSTRUCTION_FINETUNE"
        )
    texts = tokenizer.apply_chat_template(list(conversations), tokenize=False)
    marks = turn_marks(tokenizer)
    spans = [_marked_spans(text, messages, marks) if marks else None for text, messages in zip(texts, conversations)]
    unsure = [c for c, found in enumerate(spans) if found is None]
    if unsure:
        for c, found in zip(unsure, _prefix_spans(tokenizer, [conversations[c] for c in unsure], [texts[c] for c in unsure])):
            spans[c] = found
    return texts, spans


def turn_marks(tokenizer: "PreTrainedTokenizerBase") -> tuple[str, str] | None:
    """What the template writes right before an assistant reply and right after it, e.g. ChatML's
    ("<|im_start|>assistant\\n", "<|im_end|>\\n"), learned from a probe conversation; None if it cannot tell."""
    user, reply = [{"role": "user", "content": "Ping?"}], {"role": "assistant", "content": "Pong."}
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False)
        opened = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        closed = tokenizer.apply_chat_template([*user, reply], tokenize=False)
    except Exception:  # a template that refuses the probe: fall back to rendering prefixes
        return None
    if not (opened.startswith(prompt) and len(opened) > len(prompt) and closed.startswith(opened + "Pong.")):
        return None
    return opened[len(prompt):], closed[len(opened) + len("Pong."):]


def _marked_spans(text: str, messages: list[dict], marks: tuple[str, str]) -> list[Span] | None:
    """Replies found in one render: each message's text in order, each reply framed by the template's marks.
    None when the frame is not there (a template that rewrites text, or marks that vary): prefixes decide then."""
    opening, closing = marks
    spans, cursor = [], 0
    for message in messages:
        start = text.find(message["content"], cursor)
        if start < 0:
            return None
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            if start < len(opening) or not text.startswith(opening, start - len(opening)) \
                    or not text.startswith(closing, cursor):
                return None
            spans.append((start, len(text[:cursor + len(closing)].rstrip())))  # as _prefix_spans ends a reply
    return spans


def _prefix_spans(tokenizer: "PreTrainedTokenizerBase", conversations: Sequence[list[dict]], texts: Sequence[str]
                  ) -> list[list[Span]]:
    """Replies found by rendering prefixes: reply i runs from the end of render(messages[:i],
    add_generation_prompt=True) to the end of render(messages[:i + 1]), stripped of trailing whitespace."""
    owners, before_reply, through_reply = [], [], []
    for c, messages in enumerate(conversations):
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                owners.append(c)
                before_reply.append(messages[:i])
                through_reply.append(messages[: i + 1])
    opened = tokenizer.apply_chat_template(before_reply, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template(through_reply, tokenize=False)
    spans: list[list[Span]] = [[] for _ in conversations]
    for c, before, through in zip(owners, opened, closed):
        if not (through.startswith(before) and texts[c].startswith(through)):
            raise InvalidInputError(
                f"the chat template of {tokenizer.name_or_path} renders earlier turns differently once a conversation "
                "goes on, so the assistant's tokens cannot be told apart: use a model whose template renders each "
                "turn the same way whatever follows it"
            )
        spans[c].append((len(before), len(through.rstrip())))  # the whitespace after end-of-turn is never generated
    return spans


def tokenize_instructions(encoder: Encoder, records: Sequence[dict], context_length: int) -> list[Example]:
    """Untemplated, as the anchor: prompt tokens (no loss), then response tokens and EOS (loss)."""
    lead, eos = leading_ids(encoder.tokenizer), [eos_id(encoder.tokenizer)]
    prompts = encoder.ids([r["prompt"] for r in records])
    answers = encoder.ids([r["response"] if "response" in r else r["completion"] for r in records])
    examples = []
    for prompt, answer in zip(prompts, answers):
        ids = np.asarray(lead + prompt + answer + eos, dtype=np.int32)
        labels = ids.copy()
        labels[: len(lead) + len(prompt)] = IGNORE
        examples.append(_cut(ids, labels, context_length))
    return examples


def tokenize_documents(encoder: Encoder, texts: Sequence[str], lead: bool = True, eos: bool = True) -> list[Example]:
    """Each document whole, ended by EOS, loss on every token. A large file comes in pieces: only its first
    piece gets the leading token (Llama's BOS) and only its last the EOS."""
    before = leading_ids(encoder.tokenizer) if lead else []
    after = [eos_id(encoder.tokenizer)] if eos else []
    examples = []
    for tokens in encoder.ids(texts):
        ids = np.asarray(before + tokens + after, dtype=np.int32)
        examples.append(Example(ids, ids.copy()))
    return examples


def _cut(ids: np.ndarray, labels: np.ndarray, context_length: int) -> Example:
    if len(ids) <= context_length:
        return Example(ids, labels)
    return Example(ids[:context_length], labels[:context_length], truncated=True)


def leading_ids(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """What the tokenizer puts before any text by default: Llama's BOS, nothing for SmolLM2."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    return marked[: marked.index(plain[0])]


def eos_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    if tokenizer.eos_token_id is None:
        raise InvalidInputError(f"the tokenizer of {tokenizer.name_or_path} has no EOS token to end examples with")
    return tokenizer.eos_token_id
