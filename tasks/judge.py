"""Champion against challenger on the same frozen eval set: each one's eval loss, and the eval prompts answered
side by side, both logged to the retraining's MLflow run."""

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks import warm_start
from tasks.data.prepare import prepare_dataset
from tasks.devices import DEVICE_SLOTS, claim_gpus, visible_gpus
from tasks.models import tokenizer_folder
from tasks.retraining import RetrainConfig
from tasks.run_record import RunRecord
from tasks.tracking import client


@dataclass(frozen=True)
class Verdict:
    challenger_loss: float
    champion_loss: float | None  # None: there was no champion


@task(name="judge", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def judge(record: RunRecord, config: RetrainConfig, challenger: int, champion: int | None) -> Verdict:
    """Each version's mean token loss on run.eval_data_path, prepared as the challenger's run prepared it, and its
    answers to run.eval_prompts; on the device, holding one slot of the device limit."""
    run, name = config.run, config.retrain.registered_model
    eval_rows = warm_start.run(
        prepare_dataset, run.eval_data_path, tokenizer_folder(run.model_name_or_path), run.task_type,
        config.training_config.max_length, run.allow_percentage_invalid_samples,
        field=config.name_of("run.eval_data_path")).path
    versions = {"challenger": challenger} | ({"champion": champion} if champion is not None else {})
    with concurrency(DEVICE_SLOTS, occupy=1), claim_gpus(1) as gpus:
        device = f"cuda:{visible_gpus().index(gpus[0])}" if gpus else "cpu"
        # Loading the models needs torch, which this flow's process never imports.
        losses, answers = warm_start.run("tasks.scoring:score", name, versions, str(eval_rows),
                                         config.training_config.micro_batch_size, run.eval_prompts or [], device)
    mlflow_client = client()
    for role, loss in losses.items():
        mlflow_client.log_metric(record.mlflow_run_id, f"{role}_eval_loss", loss)
    if run.eval_prompts:
        mlflow_client.log_table(record.mlflow_run_id, artifact_file="retrain/answers.json", data={
            "prompt": run.eval_prompts,
            **{f"{role} (version {versions[role]})": answers[role] for role in versions},
        })
    return Verdict(losses["challenger"], losses.get("champion"))
