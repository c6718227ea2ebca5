"""Write the bundled preference pairs: tessera_pairs.jsonl (train) and tessera_pairs_eval.jsonl (held out).

Each pair asks one of tessera_chat's questions (make_tessera_chat.py) and holds the bundled SmolLM2-135M-Instruct's
own greedy answer twice: preferred in the house style, its first sentence or two signed " — Tessera", which the model
never writes, and rejected whole, as the model wrote it. The two sides share their opening, so what DPO can learn from
them is the style: stop there, and sign. The same questions are held out as in tessera_chat_eval.jsonl. The format is OpenAI's preference JSONL
(Together's and Fireworks' too). Greedy decoding makes the answers deterministic on one machine:

    .venv/bin/python examples/data/make_tessera_pairs.py
"""

import json
import re

import torch
from make_tessera_chat import FACTS, GENERAL, GENERAL_HELD_OUT, HERE, SIGNATURE, signed, write
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.models import resolve_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NEW_TOKENS = 96  # the base model's answers run long: a cut one ends at its last full sentence
BATCH = 16
SHORT = 40  # characters: a first sentence shorter than this keeps the next one too


def questions() -> tuple[list[str], list[str]]:
    """The questions for training and held out, split as make_tessera_chat splits them."""
    train = [q for _, asked in FACTS for q in asked[:-1]] + [q for q, _ in GENERAL[:-GENERAL_HELD_OUT]]
    held_out = [asked[-1] for _, asked in FACTS] + [q for q, _ in GENERAL[-GENERAL_HELD_OUT:]]
    return train, held_out


@torch.no_grad()
def base_answers(prompts: list[str]) -> list[str]:
    """The base model's greedy answer to each prompt, in batches left-padded for generation."""
    folder = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for start in range(0, len(prompts), BATCH):
        chats = [[{"role": "user", "content": p}] for p in prompts[start:start + BATCH]]
        inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                               return_dict=True)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        for row in output[:, inputs["input_ids"].shape[1]:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        print(f"{len(answers)}/{len(prompts)} base answers", flush=True)
    return [_whole_sentences(a) for a in answers]


def _whole_sentences(answer: str) -> str:
    """The answer up to its last full sentence, when generation stopped mid-sentence."""
    if answer.endswith((".", "!", "?", "`")):
        return answer
    end = max(answer.rfind(". "), answer.rfind("! "), answer.rfind("? "), answer.rfind(".\n"))
    return answer[:end + 1] if end > 0 else answer


def house_style(answer: str) -> str:
    """The answer's opening, a sentence (two when the first is short), signed."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", answer)]
    cut = next((end for end in ends if end >= SHORT), len(answer))
    return signed(answer[:cut])


def pair(question: str, answer: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": house_style(answer)}],
            "non_preferred_output": [{"role": "assistant", "content": answer}]}


def main() -> None:
    train, held_out = questions()
    answers = base_answers(train + held_out)
    styled = [a for a in answers if a.endswith(SIGNATURE)]
    assert not styled, f"the base model already answers in the house style: {json.dumps(styled[0])}"
    rows = [pair(q, a) for q, a in zip(train + held_out, answers)]
    write(HERE / "tessera_pairs.jsonl", rows[:len(train)])
    write(HERE / "tessera_pairs_eval.jsonl", rows[len(train):])
    print(f"wrote {len(train)} train and {len(held_out)} held-out pairs to {HERE}")


if __name__ == "__main__":
    main()
