"""Champion against challenger on the same frozen eval set, logged to the retraining's MLflow run with the eval
prompts answered side by side: by each one's eval loss; for task_type DPO, by its preference accuracy on the eval
pairs (its DPO loss breaking a tie), both measured against the base model's log-probabilities."""

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks import warm_start
from tasks.config import TaskType
from tasks.data.prepare import prepare_dataset
from tasks.devices import DEVICE_SLOTS, claim_gpus, visible_gpus
from tasks.models import tokenizer_folder
from tasks.retraining import RetrainConfig
from tasks.run_record import RunRecord
from tasks.tracking import client

ACCURACY = "eval_accuracy"  # judged on pairs only


@dataclass(frozen=True)
class Verdict:
    """Each side's figures by name: eval_loss (the token loss, or on pairs the DPO loss) and, on pairs,
    eval_accuracy (the share of pairs preferred more strongly than the reference prefers them)."""

    challenger: dict[str, float]
    champion: dict[str, float] | None  # None: there was no champion

    def figures(self) -> dict[str, float | None]:
        """Both sides' figures, as the events' payloads and the retraining's metrics name them."""
        return {f"{role}_{name}": (figures or {}).get(name) for name in self.challenger
                for role, figures in (("challenger", self.challenger), ("champion", self.champion))}

    def beats(self, margin: float) -> tuple[bool, str]:
        """Whether the challenger beats the champion by more than `margin`, and, judged on pairs, on which figure:
        the accuracy, or the DPO loss where the accuracies tie ("": the eval loss, the only one)."""
        if ACCURACY not in self.challenger:
            return self.champion["eval_loss"] - self.challenger["eval_loss"] > margin, ""
        gain = self.challenger[ACCURACY] - self.champion[ACCURACY]
        if gain != 0:
            return gain > margin, "preference accuracy"
        return self.champion["eval_loss"] - self.challenger["eval_loss"] > margin, "DPO loss, the accuracies tied"

    def said(self, role: str) -> str:
        """One side's figures as the verdict's message words them."""
        figures = self.challenger if role == "challenger" else self.champion
        if ACCURACY in figures:
            return f"preference accuracy {figures[ACCURACY]:.3f}, DPO loss {figures['eval_loss']:.4f}"
        return f"eval loss {figures['eval_loss']:.4f}"


@task(name="judge", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def judge(record: RunRecord, config: RetrainConfig, challenger: int, champion: int | None) -> Verdict:
    """Each version's figures on run.eval_data_path, prepared as the challenger's run prepared it, and its answers
    to run.eval_prompts; on the device, holding one slot of the device limit. Pairs are judged against the
    log-probabilities of run.model_name_or_path (the base every from_base challenger starts from), the same for
    champion and challenger whichever checkpoint each was trained from."""
    run, name = config.run, config.retrain.registered_model
    eval_rows = warm_start.run(
        prepare_dataset, run.eval_data_path, tokenizer_folder(run.model_name_or_path), run.task_type,
        config.training_config.max_length, run.allow_percentage_invalid_samples,
        field=config.name_of("run.eval_data_path")).path
    versions = {"challenger": challenger} | ({"champion": champion} if champion is not None else {})
    scorer, pairs = "tasks.scoring:score", ()
    if run.task_type == TaskType.DPO:
        scorer, pairs = "tasks.scoring:score_pairs", (run.model_name_or_path, config.training_config.model.dpo_cfg,
                                                      str(record.dir))
    with concurrency(DEVICE_SLOTS, occupy=1), claim_gpus(1) as gpus:
        device = f"cuda:{visible_gpus().index(gpus[0])}" if gpus else "cpu"
        # Loading the models needs torch, which this flow's process never imports.
        figures, answers = warm_start.run(scorer, name, versions, str(eval_rows),
                                          config.training_config.micro_batch_size, run.eval_prompts or [], device,
                                          *pairs)
    verdict = Verdict(figures["challenger"], figures.get("champion"))
    mlflow_client = client()
    for metric, value in verdict.figures().items():
        if value is not None:
            mlflow_client.log_metric(record.mlflow_run_id, metric, value)
    if run.eval_prompts:
        mlflow_client.log_table(record.mlflow_run_id, artifact_file="retrain/answers.json", data={
            "prompt": run.eval_prompts,
            **{f"{role} (version {versions[role]})": answers[role] for role in versions},
        })
    return verdict
