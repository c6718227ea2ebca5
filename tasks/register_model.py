"""Step 6: log the final model to the MLflow run and register it at `register_to`, tagged and aliased."""

from importlib.metadata import version

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import warm_start
from tasks.config import RunConfig
from tasks.run_record import RunRecord
from tasks.tracking import client, grant_owner

ALIAS = "candidate"  # a run's newest version; a sweep's best is its "challenger"


@task(name="register-model", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def register_model(record: RunRecord, config: RunConfig, hf_dir: str, alias: str = ALIAS,
                   tags: dict[str, str] | None = None) -> int:
    """Log the Hugging Face export as an MLflow transformers model and register a new version of it."""
    mlflow_client, mlflow_run_id = client(), record.mlflow_run_id
    registered_name = config.registered_model_name(record.name)
    tags = {"tessera.run_name": record.name, "tessera.base_model": config.run.model_name_or_path,
            "tessera.task_type": config.run.task_type.value, "mlflow_run_id": mlflow_run_id, **(tags or {})}
    model_uri = warm_start.run(log_model, mlflow_run_id, hf_dir)  # loading it needs torch: this process never does
    registered = mlflow.register_model(model_uri, registered_name, tags=tags)
    grant_owner(registered_name, mlflow_run_id)
    mlflow_client.set_registered_model_alias(registered_name, alias, registered.version)
    for key, value in tags.items():
        mlflow_client.set_registered_model_tag(registered_name, key, value)
    return int(registered.version)


def log_model(mlflow_run_id: str, hf_dir: str) -> str:
    """Log the export to the run as an MLflow transformers model; returns its URI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client()  # the tracking URI, wherever this runs
    # MLflow 3.17 can log a checkpoint folder without loading it, but that path breaks on transformers 5.23
    # (pipeline classes became lazy strings), so log the loaded model and tokenizer.
    model = {"model": AutoModelForCausalLM.from_pretrained(hf_dir), "tokenizer": AutoTokenizer.from_pretrained(hf_dir)}
    with mlflow.start_run(run_id=mlflow_run_id):
        return mlflow.transformers.log_model(
            transformers_model=model,
            name="model",
            task="text-generation",
            # Without explicit requirements MLflow probes for torchvision and fails.
            pip_requirements=[f"transformers=={version('transformers')}", f"torch=={version('torch').split('+')[0]}",
                              f"accelerate=={version('accelerate')}"],
        ).model_uri
