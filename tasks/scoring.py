"""Registered models measured for the judge (tasks/judge.py): the part that loads models, run in a warm-start child
so that the retraining's flow process never imports torch. score: each version's mean token loss on the eval rows;
score_pairs (task_type DPO): each version's preference accuracy and DPO loss on the eval pairs, against the
reference log-probabilities of the retraining's base model. Both: each version's answers to the eval prompts."""

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tasks.config import DpoCfg
from tasks.models import resolve_model
from tasks.tracking import client, load_components
from tasks.training.chunked_loss import chunked_loss_applies
from tasks.training.data import eval_batches, logits_of
from tasks.training.preference import PreferenceLoss, reference_logps
from tasks.training.rows import IGNORE, PackedRows

MAX_NEW_TOKENS = 100  # as the worker answers the eval prompts at each checkpoint

Figures = dict[str, float]  # a version's judged figures by name: eval_loss; for pairs, eval_accuracy too


def score(registered_model: str, versions: dict[str, int], eval_rows: str, micro_batch_size: int,
          prompts: list[str], device: str) -> tuple[dict[str, Figures], dict[str, list[str]]]:
    """Each version's (by role) mean token loss on the eval rows, and its answers to the prompts."""
    rows, on = PackedRows(Path(eval_rows), "eval rows"), torch.device(device)
    return _each_version(registered_model, versions, prompts, on,
                         lambda model: {"eval_loss": eval_loss(model, rows, micro_batch_size, on)})


def score_pairs(registered_model: str, versions: dict[str, int], eval_rows: str, micro_batch_size: int,
                prompts: list[str], device: str, reference_model: str, settings: DpoCfg,
                reference_dir: str) -> tuple[dict[str, Figures], dict[str, list[str]]]:
    """Each version's (by role) preference accuracy and DPO loss on the eval pairs, all against one reference: the
    log-probabilities `reference_model` (the retraining's base) gives them, computed once and kept in
    reference_dir/reference/eval.npy (SimPO: none). And each version's answers to the prompts."""
    rows, on = PackedRows(Path(eval_rows), "eval pairs"), torch.device(device)
    reference = None if settings.reference_free else base_logps(reference_model, rows, micro_batch_size, on,
                                                                Path(reference_dir))
    return _each_version(registered_model, versions, prompts, on,
                         lambda model: preference_figures(model, rows, reference, settings, micro_batch_size, on))


def _each_version(registered_model: str, versions: dict[str, int], prompts: list[str], device: torch.device,
                  measure: Callable[[torch.nn.Module], Figures]) -> tuple[dict[str, Figures], dict[str, list[str]]]:
    """Each version loaded from the registry, one at a time: what `measure` finds, and its answers."""
    client()  # the tracking and registry URI, wherever this runs
    figures, answers = {}, {}
    for role, version in versions.items():
        parts = load_components(f"models:/{registered_model}/{version}")
        model = parts["model"].float().to(device).eval()
        figures[role] = measure(model)
        answers[role] = [answer(model, parts["tokenizer"], prompt, device) for prompt in prompts]
        del model, parts
    return figures, answers


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


class AsEngine(torch.nn.Module):
    """A model as the worker's preference code takes it: a DeepSpeed engine's call and its `.module`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)


def base_logps(model: str, rows: PackedRows, micro_batch_size: int, device: torch.device,
               folder: Path) -> torch.Tensor:
    """The pairs' [pairs, 2] log-probabilities under `model` (a catalog name or folder) as the worker's reference
    pass computes them before a DPO run's first step; kept in folder/reference/eval.npy and read back from there."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32).to(device)
    return reference_logps(AsEngine(base), rows, "eval", folder, micro_batch_size, rank=0, world_size=1,
                           device=device, chunked=chunked_loss_applies(base, zero_stage=0), resumed=False)


@torch.no_grad()
def preference_figures(model: torch.nn.Module, rows: PackedRows, reference: torch.Tensor | None, settings: DpoCfg,
                       micro_batch_size: int, device: torch.device) -> Figures:
    """The model's DPO loss (mean over the pairs) and preference accuracy (the share of pairs whose chosen answer
    gains more log-probability over the reference than the rejected one: its reward accuracy), as training's eval
    computes them."""
    engine = AsEngine(model).eval()
    reference = None if reference is None else reference.to(device)
    objective = PreferenceLoss(settings, reference, chunked_loss_applies(model, zero_stage=0))
    sums = sum(objective(engine, micro_batch.to(device)) for micro_batch in eval_batches(rows, micro_batch_size, 0, 1))
    report = objective.report((sums / rows.pairs).tolist())
    return {"eval_loss": report["loss"], "eval_accuracy": report["reward_accuracy"]}


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
