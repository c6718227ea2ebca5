"""Champion against challenger on the same frozen eval set: each one's eval loss, and the eval prompts answered
side by side, both logged to the retraining's MLflow run."""

from dataclasses import dataclass

import mlflow
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks.data.prepare import prepare_dataset
from tasks.devices import DEVICE_SLOTS, claim_gpus, visible_gpus
from tasks.models import tokenizer_folder
from tasks.retraining import RetrainConfig
from tasks.run_record import RunRecord
from tasks.tracking import client
from tasks.training.data import eval_batches, logits_of
from tasks.training.rows import IGNORE, PackedRows

MAX_NEW_TOKENS = 100  # as the worker answers the eval prompts at each checkpoint


@dataclass(frozen=True)
class Verdict:
    challenger_loss: float
    champion_loss: float | None  # None: there was no champion


@task(name="judge", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def judge(record: RunRecord, config: RetrainConfig, challenger: int, champion: int | None) -> Verdict:
    """Each version's mean token loss on run.eval_data_path, prepared as the challenger's run prepared it, and its
    answers to run.eval_prompts; on the device, holding one slot of the device limit."""
    run, name = config.run, config.retrain.registered_model
    eval_rows = PackedRows(prepare_dataset(
        run.eval_data_path, tokenizer_folder(run.model_name_or_path), run.task_type, config.training_config.max_length,
        run.allow_percentage_invalid_samples, field=config.name_of("run.eval_data_path")).path, "eval rows")
    versions = {"challenger": challenger} | ({"champion": champion} if champion is not None else {})
    losses, answers = {}, {}
    with concurrency(DEVICE_SLOTS, occupy=1), claim_gpus(1) as gpus:
        device = torch.device(f"cuda:{visible_gpus().index(gpus[0])}" if gpus else "cpu")
        for role, version in versions.items():
            parts = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
            model = parts["model"].float().to(device).eval()
            losses[role] = eval_loss(model, eval_rows, config.training_config.micro_batch_size, device)
            answers[role] = [answer(model, parts["tokenizer"], prompt, device) for prompt in run.eval_prompts or []]
            del model, parts
    mlflow_client = client()
    for role, loss in losses.items():
        mlflow_client.log_metric(record.mlflow_run_id, f"{role}_eval_loss", loss)
    if run.eval_prompts:
        mlflow_client.log_table(record.mlflow_run_id, artifact_file="retrain/answers.json", data={
            "prompt": run.eval_prompts,
            **{f"{role} (version {versions[role]})": answers[role] for role in versions},
        })
    return Verdict(losses["challenger"], losses.get("champion"))


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
