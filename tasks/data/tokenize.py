"""Token ids and loss labels per example: the assistant's turns for chat, the response for instructions,
everything for continued pretraining. Tokenizes in batches, since one fast-tokenizer call per example is slow."""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from tasks.config import TaskType
from tasks.errors import InvalidInputError

IGNORE = -100  # the label of tokens the loss skips (cross-entropy's ignore_index)
BATCH = 512


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


def tokenize_records(records: Iterable[Any], tokenizer: PreTrainedTokenizerBase, task_type: TaskType,
                     context_length: int) -> Iterator[Example]:
    """Examples from validated records: chat and instruction examples cut to context_length; whole documents
    for continued pretraining (the packer cuts those)."""
    for batch in _batches(records, BATCH):
        if task_type is TaskType.CHAT_COMPLETION:
            yield from tokenize_chat(tokenizer, [r["messages"] for r in batch], context_length)
        elif task_type is TaskType.INSTRUCTION_FINETUNE:
            yield from tokenize_instructions(tokenizer, batch, context_length)
        else:
            yield from tokenize_documents(tokenizer, batch)


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]],
                  context_length: int) -> list[Example]:
    """The model's own chat template; loss on each assistant reply and the end-of-turn token(s) after it.

    Templates carry no {% generation %} markers, so replies are found by rendering prefixes: reply i runs from
    the end of render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1])."""
    if not tokenizer.is_fast:
        raise InvalidInputError(f"{tokenizer.name_or_path} has no fast tokenizer (tokenizer.json); chat data needs one")
    if tokenizer.chat_template is None:
        raise InvalidInputError(
            f"{tokenizer.name_or_path} has no chat template: use an instruct model for CHAT_COMPLETION, "
            "or give prompt/response records with INSTRUCTION_FINETUNE"
        )
    owners, before_reply, through_reply = [], [], []
    for c, messages in enumerate(conversations):
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                owners.append(c)
                before_reply.append(messages[:i])
                through_reply.append(messages[: i + 1])
    opened = tokenizer.apply_chat_template(before_reply, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template(through_reply, tokenize=False)
    full = dict(zip(owners, closed))  # validation ends each conversation with a reply, so its render is the whole
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for c, before, through in zip(owners, opened, closed):
        if not (through.startswith(before) and full[c].startswith(through)):
            raise InvalidInputError(
                f"the chat template of {tokenizer.name_or_path} renders earlier turns differently once a conversation "
                "goes on, so the assistant's tokens cannot be told apart: use a model whose template renders each "
                "turn the same way whatever follows it"
            )
        spans[c].append((len(before), len(through.rstrip())))  # the whitespace after end-of-turn is never generated
    texts = [full[c] for c in range(len(conversations))]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, replies in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        ids = np.asarray(ids, dtype=np.int32)
        starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
        learn = np.zeros(len(ids), dtype=bool)
        for start, end in replies:
            learn |= (starts >= start) & (starts < end)
        examples.append(_cut(ids, np.where(learn, ids, IGNORE).astype(np.int32), context_length))
    return examples


def tokenize_instructions(tokenizer: PreTrainedTokenizerBase, records: Sequence[dict],
                          context_length: int) -> list[Example]:
    """Untemplated, as the anchor: prompt tokens (no loss), then response tokens and EOS (loss)."""
    lead, eos = _leading_ids(tokenizer), [_eos_id(tokenizer)]
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["response"] if "response" in r else r["completion"] for r in records],
                        add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, answer in zip(prompts, answers):
        ids = np.asarray(lead + prompt + answer + eos, dtype=np.int32)
        labels = ids.copy()
        labels[: len(lead) + len(prompt)] = IGNORE
        examples.append(_cut(ids, labels, context_length))
    return examples


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[Example]:
    """Each document whole, ended by EOS, loss on every token."""
    lead, eos = _leading_ids(tokenizer), [_eos_id(tokenizer)]
    examples = []
    for tokens in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = np.asarray(lead + tokens + eos, dtype=np.int32)
        examples.append(Example(ids, ids.copy()))
    return examples


def _cut(ids: np.ndarray, labels: np.ndarray, context_length: int) -> Example:
    if len(ids) <= context_length:
        return Example(ids, labels)
    return Example(ids[:context_length], labels[:context_length], truncated=True)


def _leading_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts before any text by default: Llama's BOS, nothing for SmolLM2."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    return marked[: marked.index(plain[0])]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise InvalidInputError(f"the tokenizer of {tokenizer.name_or_path} has no EOS token to end examples with")
    return tokenizer.eos_token_id


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
