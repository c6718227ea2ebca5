"""One fine-tuning run as a Prefect flow: the six steps in plain order, and hooks for the ways it can end."""

from dataclasses import asdict, fields
from pathlib import Path

from prefect import flow, get_client
from prefect.runtime import flow_run as current_flow_run

from tasks.config import RunConfig, run_name_for
from tasks.data.prepare import PreparedDataset
from tasks.events import RunEvent, emit, flush
from tasks.init_model import init_model
from tasks.models import resolve_model
from tasks.register_model import register_model
from tasks.run_record import RunRecord, current_user
from tasks.tracking import client, start_run
from tasks.train import kill_worker, processes_for, train
from tasks.training.schedule import plan_duration
from tasks.training.spec import TrainSpec
from tasks.upload_checkpoints import upload_checkpoints
from tasks.validate_data import validate_data
from tasks.validate_paths import validate_paths


def _record(flow_run) -> RunRecord | None:
    """The run's record, by the flow run's current name (the flow renames itself when started without one)."""
    with get_client(sync_client=True) as prefect:
        return RunRecord.load(prefect.read_flow_run(flow_run.id).name)


def _end(flow_run, kind: RunEvent, mlflow_status: str, message: str) -> None:
    record = _record(flow_run)
    if record is None:  # it never got as far as naming itself
        return
    if kill_worker(record.dir):
        message += "; the training worker was stopped, checkpoints and logs are kept in " + str(record.dir)
    emit(record.name, kind, message, flow_run_id=str(flow_run.id))
    flush()
    client().set_terminated(record.mlflow_run_id, mlflow_status)


def on_cancellation(flow, flow_run, state) -> None:
    _end(flow_run, RunEvent.CANCELED, "KILLED", "run cancelled")


def on_crashed(flow, flow_run, state) -> None:
    _end(flow_run, RunEvent.FAILED, "FAILED", f"run crashed: {state.message}")


def on_failure(flow, flow_run, state) -> None:
    exc = state.result(raise_on_failure=False)
    reason = str(exc) if isinstance(exc, BaseException) else state.message
    _end(flow_run, RunEvent.FAILED, "FAILED", reason)


CONFIG_FIELDS = [f.name for f in fields(RunConfig)]


@flow(
    name="finetune",
    on_cancellation=[on_cancellation],
    on_crashed=[on_crashed],
    on_failure=[on_failure],
)
def finetune(
    model: str,
    train_data_path: str,
    register_to: str,
    task_type: str = "CHAT_COMPLETION",
    experiment_path: str = "",
    eval_data_path: str | None = None,
    eval_prompts: list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = "1ep",
    learning_rate: float | None = 5e-5,
    context_length: int | None = None,
    allow_percentage_invalid_samples: float = 0.0,
    micro_batch_size: int = 4,
    global_batch_size: int = 8,
    warmup_steps: int | None = None,
    lr_schedule: str = "cosine",
    min_lr: float | None = None,
    constant_steps: int = 0,
    weight_decay: float = 0.0,
    adam_betas: list[float] | None = None,
    adam_eps: float = 1e-8,
    gradient_clip: float = 1.0,
    attention_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    ffn_dropout: float = 0.0,
    eval_every_n_steps: int | None = None,
    save_every_n_steps: int | None = None,
    save_top_k: int | None = None,
    early_stopping_patience: int | None = None,
    early_stopping_min_delta: float = 0.0,
    log_every_n_steps: int = 1,
    peft_scheme: str | None = None,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | str = "all-linear",
    loraplus_lr_ratio: float = 0.0,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    processes: int | None = None,
    seed: int = 17,
    run_name: str | None = None,
    mlflow_run_id: str | None = None,
) -> dict:
    """Fine-tune `model` on `train_data_path` and register the result at `register_to`."""
    arguments = locals()  # every parameter but the last two is a RunConfig field of the same name
    config = RunConfig(**{name: arguments[name] for name in CONFIG_FIELDS if arguments[name] is not None})
    record = _name_run(config, run_name, mlflow_run_id)
    name, mlflow_id = record.name, record.mlflow_run_id
    emit(name, RunEvent.STARTED, f"run {name} started")

    config = validate_paths(config)
    model_dir = resolve_model(config.model)  # the tokenizer, for data preparation; weights converted once
    train_rows = validate_data(name, config.train_data_path, str(model_dir), config.task_type,
                               config.context_length, mlflow_id, config.allow_percentage_invalid_samples,
                               config.training_duration, config.global_batch_size)
    eval_rows = (
        validate_data(name, config.eval_data_path, str(model_dir), config.task_type, config.context_length,
                      mlflow_id, config.allow_percentage_invalid_samples, split="eval")
        if config.eval_data_path else None
    )
    model_dir, init_from = init_model(name, config.model, mlflow_id, config.custom_weights_path)
    rows = PreparedDataset.load(Path(train_rows))
    plan = plan_duration(config.duration.value, config.duration.unit, rows.num_rows, rows.context_length,
                         config.global_batch_size)
    spec = TrainSpec(
        run_name=name, model_dir=model_dir, data_dir=train_rows, eval_data_dir=eval_rows,
        output_dir=str(record.dir / "checkpoints"), duration_value=config.duration.value,
        duration_unit=config.duration.unit, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else default_warmup(plan.total_batches),
        schedule=config.lr_schedule, min_lr=config.min_lr, constant_steps=config.constant_steps,
        weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps,
        gradient_clip=config.gradient_clip, attention_dropout=config.attention_dropout,
        hidden_dropout=config.hidden_dropout, ffn_dropout=config.ffn_dropout,
        eval_every_n_batches=config.eval_every_n_steps, save_every_n_batches=config.save_every_n_steps,
        save_top_k=config.save_top_k, early_stopping_patience=config.early_stopping_patience,
        early_stopping_min_delta=config.early_stopping_min_delta,
        peft=config.peft_scheme, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, lora_target_modules=config.lora_target_modules,
        loraplus_lr_ratio=config.loraplus_lr_ratio or 1.0,  # Nova's 0 means off: the B matrices' rate x 1
        log_every_n_batches=config.log_every_n_steps, micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size, seed=config.seed, zero_stage=config.zero_stage,
        offload_optimizer=config.offload_optimizer, processes=processes_for(config.processes),
        eval_prompts=config.eval_prompts or [], init_from=init_from,
        resume=True,  # a retry of the train task continues from the latest checkpoint
    )
    spec_path = record.dir / "spec.json"
    spec.to_json(spec_path)
    hf_dir = train(str(spec_path), mlflow_id, config.duration.unit)
    upload_checkpoints(name, spec.output_dir, mlflow_id)
    registered = config.registered_model_name(name)
    version = register_model(hf_dir, registered, mlflow_id, tags={
        "tessera.run_name": name, "tessera.base_model": config.model, "tessera.task_type": config.task_type,
        "mlflow_run_id": mlflow_id,
    })
    client().set_terminated(mlflow_id, "FINISHED")
    emit(name, RunEvent.COMPLETED, f"run {name} completed: registered {registered} version {version}",
         registered_model=registered, version=version)
    return {"run_name": name, "registered_model": registered, "version": version}


def default_warmup(total_batches: int) -> int:
    """10% of the run, within Nova's 1-20 steps."""
    return min(20, max(1, total_batches // 10))


def _name_run(config: RunConfig, run_name: str | None, mlflow_run_id: str | None) -> RunRecord:
    """The run's record; a run started straight from the deployment gets its name and MLflow run here."""
    flow_run_id = str(current_flow_run.id)
    if run_name is None:
        run_name = run_name_for(config.model, config.task_type)
        with get_client(sync_client=True) as prefect:
            prefect.update_flow_run(flow_run_id, name=run_name)
        emit(run_name, RunEvent.CREATED, f"run {run_name} created from its deployment")
    experiment_path = config.experiment_path or f"/Users/{current_user()}/{run_name}"
    if mlflow_run_id is None:
        experiment_id, mlflow_run_id = start_run(asdict(config), run_name, experiment_path, current_user())
    else:
        experiment_id = client().get_run(mlflow_run_id).info.experiment_id
    record = RunRecord(run_name, flow_run_id, experiment_id, mlflow_run_id)
    record.save()
    return record
