"""Step 3: make the base model's weights available locally, and the checkpoint to start from if there is one."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.custom_weights import fetch_custom_weights
from tasks.events import RunEvent, emit
from tasks.models import architecture, parameter_count, resolve_model
from tasks.retries import retryable
from tasks.run_record import RunRecord
from tasks.tracking import client


@task(name="init-model", retries=2, retry_delay_seconds=5, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def init_model(record: RunRecord, config: RunConfig) -> tuple[str, str | None]:
    """Resolve the model to a local folder (converting bundled weights once), fetch custom weights, count parameters.

    Returns the model folder and the local checkpoint folder to initialise from (None: the model's own weights).
    """
    model, custom_weights = config.run.model_name_or_path, config.run.custom_weights_path
    model_dir = resolve_model(model)
    n_params = parameter_count(model_dir)
    init_from = fetch_custom_weights(custom_weights, record.custom_weights) if custom_weights else None
    mlflow_client = client()
    mlflow_client.log_param(record.mlflow_run_id, "model_parameters", n_params)
    mlflow_client.log_param(record.mlflow_run_id, "model_architecture", architecture(model_dir))
    weights = f" with the weights of {custom_weights}" if custom_weights else ""
    emit(record.name, RunEvent.MODEL_INITIALIZED, f"{model} initialized{weights}: {n_params / 1e6:.0f}M parameters",
         parameters=n_params, model_dir=str(model_dir), init_from=str(init_from) if init_from else None)
    return str(model_dir), str(init_from) if init_from else None
