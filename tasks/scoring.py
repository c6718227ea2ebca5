"""A registered model's eval loss and answers, for the judge (tasks/judge.py): the part that loads models, run in a
warm-start child so that the retraining's flow process never imports torch."""

from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F

from tasks.tracking import client
from tasks.training.data import eval_batches, logits_of
from tasks.training.rows import IGNORE, PackedRows

MAX_NEW_TOKENS = 100  # as the worker answers the eval prompts at each checkpoint


def score(registered_model: str, versions: dict[str, int], eval_rows: str, micro_batch_size: int,
          prompts: list[str], device: str) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Each version's (by role) mean token loss on the eval rows and its answers to the prompts, one model loaded
    at a time."""
    client()  # the tracking and registry URI, wherever this runs
    rows, on = PackedRows(Path(eval_rows), "eval rows"), torch.device(device)
    losses, answers = {}, {}
    for role, version in versions.items():
        parts = mlflow.transformers.load_model(f"models:/{registered_model}/{version}", return_type="components")
        model = parts["model"].float().to(on).eval()
        losses[role] = eval_loss(model, rows, micro_batch_size, on)
        answers[role] = [answer(model, parts["tokenizer"], prompt, on) for prompt in prompts]
        del model, parts
    return losses, answers


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: PackedRows, micro_batch_size: int, device: torch.device) -> float:
    """Mean token loss over every row, computed as training's eval computes it."""
    loss, tokens = 0.0, 0
    for micro_batch in eval_batches(rows, micro_batch_size, rank=0, world_size=1):
        micro_batch = micro_batch.to(device)
        loss += F.cross_entropy(logits_of(model, micro_batch).flatten(0, 1), micro_batch.targets.flatten(),
                                ignore_index=IGNORE, reduction="sum").item()
        tokens += int((micro_batch.targets != IGNORE).sum())
    return loss / max(1, tokens)


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer, prompt: str, device: torch.device) -> str:
    """The model's greedy answer: the same prompt gets the same answer from the same weights."""
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(device)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
