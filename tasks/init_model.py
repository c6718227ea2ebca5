"""Step 3: make the base model's weights available locally and check what training will start from."""

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoConfig, AutoModelForCausalLM

from tasks.events import RunEvent, emit
from tasks.models import resolve_model
from tasks.retries import unless_bad_input
from tasks.tracking import client


@task(name="init-model", retries=2, retry_delay_seconds=5, retry_condition_fn=unless_bad_input, cache_policy=NO_CACHE)
def init_model(run_name: str, model: str, mlflow_run_id: str) -> str:
    """Resolve the model to a local folder (converting bundled weights once) and count its parameters."""
    model_dir = resolve_model(model)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only: no memory, no time
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    mlflow_client = client()
    mlflow_client.log_param(mlflow_run_id, "model_parameters", n_params)
    mlflow_client.log_param(mlflow_run_id, "model_architecture", ",".join(config.architectures or [config.model_type]))
    emit(run_name, RunEvent.MODEL_INITIALIZED, f"{model} initialized: {n_params / 1e6:.0f}M parameters",
         parameters=n_params, model_dir=str(model_dir))
    return str(model_dir)
