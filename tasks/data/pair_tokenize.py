"""Preference pairs as token ids: the prompt tokenized once and shared by both answers, each answer with loss labels on
its own tokens only.

A conversational pair's prompt is rendered by the model's chat template with the generation prompt (what the model
reads before it writes a reply); an answer is what the template writes after that for the prompt and that answer: the
reply and its end-of-turn mark, less the whitespace after it (never generated). Prompt and answer are tokenized apart,
as the model meets them when it generates, so both sides start with the very same prompt tokens. A plain-text pair is
tokenized as INSTRUCTION_FINETUNE records are: the tokenizer's leading token and the prompt, then the answer and EOS.

Answers are cut to fit context_length after their prompt; the prompt never is. A prompt that leaves no room for an
answer token makes the pair one that cannot be trained on (PairExample.problem)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.data.preference import TOOLS_FIELD, Pair
from tasks.data.tokenize import IGNORE, Encoder, Example, eos_id, leading_ids
from tasks.errors import InvalidInputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Ids = list[int]
Found = tuple[str, str, str]  # a problem as (field, found, fix), placed in its file and line by the caller


@dataclass(frozen=True)
class PairExample:
    prompt: np.ndarray  # int32, whole
    chosen: np.ndarray  # int32: the answer's tokens, cut to fit context_length after the prompt
    rejected: np.ndarray
    chosen_cut: bool
    rejected_cut: bool
    problem: Found | None = None  # why the pair cannot be trained on; its answers are then empty

    @property
    def sides(self) -> tuple[Example, Example]:
        """prompt + chosen and prompt + rejected, the loss on the answers' tokens."""
        return self._side(self.chosen, self.chosen_cut), self._side(self.rejected, self.rejected_cut)

    def _side(self, answer: np.ndarray, cut: bool) -> Example:
        return Example(np.concatenate([self.prompt, answer]),
                       np.concatenate([np.full(len(self.prompt), IGNORE, dtype=np.int32), answer]), cut)


def tokenize_pairs(encoder: Encoder, pairs: Sequence[Pair], context_length: int) -> list[PairExample]:
    """Each pair's prompt and answers as tokens, answers cut to fit context_length after the prompt."""
    ids: dict[int, tuple[Ids, Ids, Ids, Found | None]] = {}
    chat = [i for i, pair in enumerate(pairs) if pair.chat]
    plain = [i for i, pair in enumerate(pairs) if not pair.chat]
    for group, tokenized in ((chat, _chat_ids), (plain, _plain_ids)):
        if group:
            ids.update(zip(group, tokenized(encoder, [pairs[i] for i in group])))
    return [_fitted(*ids[i], pairs[i], context_length) for i in range(len(pairs))]


def _fitted(prompt: Ids, chosen: Ids, rejected: Ids, problem: Found | None, pair: Pair,
            context_length: int) -> PairExample:
    room = context_length - len(prompt)
    if room < 1 and problem is None:
        problem = (pair.where[0], f"a prompt of {len(prompt):,} tokens, which leaves no room for an answer within "
                   f"context_length={context_length}",
                   "shorten the prompt or raise context_length: answers are cut to fit after the prompt, prompts never")
    if problem is not None:
        empty = np.empty(0, dtype=np.int32)
        return PairExample(np.asarray(prompt, dtype=np.int32), empty, empty, False, False, problem)
    return PairExample(np.asarray(prompt, dtype=np.int32), np.asarray(chosen[:room], dtype=np.int32),
                       np.asarray(rejected[:room], dtype=np.int32), len(chosen) > room, len(rejected) > room)


def _plain_ids(encoder: Encoder, pairs: Sequence[Pair]) -> list[tuple[Ids, Ids, Ids, None]]:
    lead, eos = leading_ids(encoder.tokenizer), [eos_id(encoder.tokenizer)]
    prompts = encoder.ids([pair.prompt for pair in pairs])
    chosen = encoder.ids([pair.chosen for pair in pairs])
    rejected = encoder.ids([pair.rejected for pair in pairs])
    return [(lead + p, c + eos, r + eos, None) for p, c, r in zip(prompts, chosen, rejected)]


def _chat_ids(encoder: Encoder, pairs: Sequence[Pair]) -> list[tuple[Ids, Ids, Ids, Found | None]]:
    tokenizer = encoder.tokenizer
    if tokenizer.chat_template is None:
        raise InvalidInputError(f"{tokenizer.name_or_path} has no chat template to render conversational pairs: use "
                                "an instruct model, or give prompt, chosen and rejected as plain strings")
    tools = [pair.tools for pair in pairs]
    opened = _render(tokenizer, [pair.prompt for pair in pairs], tools, generation=True)
    answers = [_answers(tokenizer, [pair.prompt + [_reply(getattr(pair, side))] for pair in pairs], tools, opened)
               for side in ("chosen", "rejected")]
    unrendered = _unrendered_tools(tokenizer, pairs, opened)
    prompt_ids, chosen_ids, rejected_ids = (encoder.ids(texts) for texts in (opened, *answers))
    return [(p, c, r, unrendered.get(i)) for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids))]


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _answers(tokenizer: "PreTrainedTokenizerBase", conversations: list[list[dict]], tools: list[list[dict] | None],
             opened: list[str]) -> list[str]:
    """What the template writes after each opened prompt when it renders the prompt with its answer."""
    answers = []
    for prompt, answered in zip(opened, _render(tokenizer, conversations, tools, generation=False)):
        if not answered.startswith(prompt):
            raise InvalidInputError(
                f"the chat template of {tokenizer.name_or_path} renders a prompt differently once it is answered, so "
                "the answer's tokens cannot be told apart from the prompt's: use a model whose template renders each "
                "turn the same way whatever follows it")
        answers.append(answered[len(prompt):].rstrip())
    return answers


def _unrendered_tools(tokenizer: "PreTrainedTokenizerBase", pairs: Sequence[Pair], opened: list[str]
                      ) -> dict[int, Found]:
    """The pairs whose tool definitions the template leaves out of the prompt: they would train without them."""
    given = [i for i, pair in enumerate(pairs) if pair.tools]
    bare = _render(tokenizer, [pairs[i].prompt for i in given], [None] * len(given), generation=True)
    fix = (f"remove them, or use a model whose chat template renders tool definitions: the chat template of "
           f"{tokenizer.name_or_path} leaves them out")
    return {i: (TOOLS_FIELD, "tool definitions", fix) for i, text in zip(given, bare) if text == opened[i]}


def _render(tokenizer: "PreTrainedTokenizerBase", conversations: list[list[dict]],
            tools: list[list[dict] | None], generation: bool) -> list[str]:
    """Each conversation rendered, in one call for those without tools (a call takes one list of tools)."""
    texts: list[str] = [""] * len(conversations)
    plain = [i for i, t in enumerate(tools) if not t]
    if plain:
        rendered = tokenizer.apply_chat_template([conversations[i] for i in plain], tokenize=False,
                                                 add_generation_prompt=generation)
        for i, text in zip(plain, rendered):
            texts[i] = text
    for i in (i for i, t in enumerate(tools) if t):
        texts[i] = tokenizer.apply_chat_template(conversations[i], tools=tools[i], tokenize=False,
                                                 add_generation_prompt=generation)
    return texts
