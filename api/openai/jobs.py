"""OpenAI's fine-tuning jobs API as a view of Tessera's runs: a job is a run, `ftjob-<run name>`, created with
`fm.create()` and read with `fm.get()`, `fm.list()`, `fm.get_events()` and `fm.get_checkpoints()`.

How a job maps (the README's "Point your OpenAI client at Tessera" says the same):
- training_file / validation_file: files uploaded to /v1/files → train_data_path / eval_data_path: conversations
  (CHAT_COMPLETION) for the supervised method, preference pairs (task_type DPO) for dpo; a file whose first record is
  the other method's is refused at once, any other bad record fails the job at its validation, naming the line.
- n_epochs → training_duration `<n>ep`; batch_size → training_config.global_batch_size (rows of context length; with
  packing, short conversations share a row); learning_rate_multiplier → learning_rate = Tessera's default (5e-5) x
  the multiplier; seed → training_config.seed; dpo's beta → training_config.model.dpo_cfg.beta; "auto" or absent:
  Tessera's defaults.
- suffix: the registered model is `main.openai.<suffix>-<6 chars>` (else `main.openai.<run name>`), and that name is
  fine_tuned_model, which /v1/chat/completions answers with.
- metadata: kept as the run's MLflow tags `openai.metadata.<key>`.
- model: a catalog name or model folder; a fine-tuned model (fine_tuned_model, or `<registered>@<alias>`) trains on
  from the last checkpoint of the run that made it (custom_weights_path), on that run's base model.
- Refused (400, `param` set): the reinforcement method, integrations, fields OpenAI does not define.
"""

import io
import json
import math
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from mlflow.entities import RunTag
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from api import access
from api.openai import files
from api.openai.errors import OpenAIError, from_tessera
from api.openai.inference import registered_version
from api.openai.pages import after as _after
from api.openai.pages import page
import client as fm
from tasks.config import Optim, RunConfig, TaskType, TrainingConfig
from tasks.data.formats import parse_line, record_problems
from tasks.data.preference import pair_problems
from tasks.data.report import Problem
from tasks.errors import RunNotFoundError, TesseraError
from tasks.events import RunEvent
from tasks.tracking import client
from tasks.training.checkpoint_names import tag_step

router = APIRouter(prefix="/v1/fine_tuning")
JOB, EVENT, CHECKPOINT, RESULTS = "ftjob-", "ftevent-", "ftckpt-", "file-results-"
REGISTER_TO = "main.openai"  # catalog.schema of every job's registered model
METADATA_TAG = "openai.metadata."
DEFAULT_LR = Optim.model_fields["lr"].default
DEFAULT_MICRO_BATCH = TrainingConfig.model_fields["micro_batch_size"].default
BETA = "training_config.model.dpo_cfg.beta"
TASK_TYPES = {"supervised": TaskType.CHAT_COMPLETION, "dpo": TaskType.DPO}  # OpenAI's method → the run's task type
# A setting named at the start of Tessera's message, as OpenAI's request names it ({hp}: where the request put its
# hyperparameters). A config path (dotted) holds the request's value as given, so the message is reworded to name it.
PARAMS = {"train_data_path": "training_file", "eval_data_path": "validation_file", "model": "model",
          "training_duration": "{hp}.n_epochs", "learning_rate": "{hp}.learning_rate_multiplier",
          "training_config.global_batch_size": "{hp}.batch_size", BETA: "{hp}.beta", "training_config.seed": "seed",
          "register_to": "suffix", "task_type": "method.type"}
STATUSES = {fm.RunStatus.COMPLETED: "succeeded", fm.RunStatus.FAILED: "failed", fm.RunStatus.STOPPED: "cancelled"}


# Metadata become MLflow tags: keys in the characters MLflow allows in a tag's name.
Key = Annotated[str, StringConstraints(pattern=r"^[\w\-. /]{1,64}$")]
Value = Annotated[str, StringConstraints(max_length=512)]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | None = Field(None, ge=1, le=50)
    batch_size: int | None = Field(None, ge=1, le=256)
    learning_rate_multiplier: float | None = Field(None, gt=0, le=20, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _auto(cls, value):
        return None if value == "auto" else value  # OpenAI's "auto": Tessera's default


class DpoHyperparameters(Hyperparameters):
    beta: float | None = Field(None, allow_inf_nan=False)  # its range is the config's (DpoCfg), checked by create()


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Hyperparameters()


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]  # reinforcement: Tessera has no graders
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _own_section(self) -> "Method":
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise PydanticCustomError("method_section", f"a {self.type} method takes its hyperparameters in "
                                                        f"method.{self.type}, not method.{other}")
        return self

    @property
    def hyperparameters(self) -> Hyperparameters:
        return (getattr(self, self.type) or SECTIONS[self.type]()).hyperparameters


SECTIONS = {"supervised": Supervised, "dpo": Dpo}
# A file whose first record is another method's data: what it is, and the fix, by the job's method.
MISMATCH = {
    "dpo": ("a conversation for the supervised method, not a preference pair",
            'a dpo job trains on pairs, one a line, like {"input": {"messages": [...]}, "preferred_output": '
            '[{"role": "assistant", "content": "..."}], "non_preferred_output": [...]}: upload pairs, or create the '
            'job with method type supervised'),
    "supervised": ("a preference pair, not a conversation",
                   'a supervised job trains on conversations, like {"messages": [...]}: create the job with method '
                   'type dpo to train on pairs, or upload conversations'),
}


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1000)
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Key, Value] | None = Field(None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0)  # W&B: Tessera tracks every run in MLflow


@router.post("/jobs")
def create(request: JobRequest) -> dict:
    """Start a fine-tuning run from uploaded files; answers at once with the job, queued."""
    if request.hyperparameters and request.method:
        raise OpenAIError(400, f"give hyperparameters in method.{request.method.type}.hyperparameters only (the "
                               "top-level hyperparameters field is its older form)", "hyperparameters", "invalid_value")
    method = request.method.type if request.method else "supervised"
    hp = request.method.hyperparameters if request.method else request.hyperparameters or Hyperparameters()
    hp_at = f"method.{method}.hyperparameters" if request.method else "hyperparameters"
    train = _data(request.training_file, "training_file", method)
    evals = _data(request.validation_file, "validation_file", method) if request.validation_file else None
    register_to = REGISTER_TO + (f".{request.suffix}-{secrets.token_hex(3)}" if request.suffix else "")
    try:
        model, weights = _base(request.model)
        run = fm.create(
            model=model, custom_weights_path=weights, train_data_path=train, eval_data_path=evals,
            register_to=register_to,
            task_type=TASK_TYPES[method].value,
            training_duration=None if hp.n_epochs is None else f"{hp.n_epochs}ep",
            learning_rate=None if hp.learning_rate_multiplier is None else DEFAULT_LR * hp.learning_rate_multiplier,
            overrides=_overrides(request, hp) or None,
        )
    except TesseraError as e:
        raise _refused(e, hp_at) from None
    if request.metadata:
        client().log_batch(run.run_id, tags=[RunTag(METADATA_TAG + k, v)
                                             for k, v in request.metadata.items()])
    return job(run, metadata=request.metadata or {})


def _overrides(request: JobRequest, hp: Hyperparameters) -> dict:
    """The config paths the request sets beside create()'s arguments."""
    overrides = {}
    if request.seed is not None:
        overrides["training_config.seed"] = request.seed
    if hp.batch_size is not None:
        overrides["training_config.global_batch_size"] = hp.batch_size
        overrides["training_config.micro_batch_size"] = math.gcd(hp.batch_size, DEFAULT_MICRO_BATCH)
    if getattr(hp, "beta", None) is not None:
        overrides[BETA] = hp.beta
    return overrides


def _data(file_id: str, param: str, method: str) -> str:
    """Where the run reads the acting user's file; refused at once when its first record is another method's data
    (the run's validation judges every record)."""
    meta = files.owned(file_id, param)
    first = files.first_line(meta["id"])
    written_for = _written_for(first[1]) if first else None
    if written_for not in (None, method):
        found, fix = MISMATCH[method]
        raise OpenAIError(400, f"{param} {file_id} ({meta['filename']}) line {first[0]}: found {found}; {fix}",
                          param, f"invalid_{param}")
    return files.store().data_uri(meta["id"])


def _written_for(line: bytes) -> str | None:
    """The method a record is data for: "dpo" for a preference pair in any format Tessera reads, "supervised" for a
    conversation; None for a record that is neither (the run's validation says what is wrong with it)."""
    record = parse_line(line)
    if not isinstance(record, dict):
        return None
    if not pair_problems(record, _at):
        return "dpo"
    return "supervised" if not record_problems(record, TaskType.CHAT_COMPLETION, _at) else None


def _at(field: str, found: str, fix: str) -> Problem:
    return Problem("", 1, field, found, fix)


@router.get("/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict:
    """The acting user's jobs, newest first; `metadata[k]=v` keeps the jobs with those metadata."""
    wanted = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
              if key.startswith("metadata[") and key.endswith("]")}
    runs = fm.list(user_emails=access.run_owners(None), limit=1000)  # with details: estimated_finish as get() has
    found = []
    for run in _after(runs, after, key=lambda r: JOB + r.name):
        tags = _metadata(run)
        if all(tags.get(k) == v for k, v in wanted.items()):
            found.append(job(run, metadata=tags))
        if len(found) > limit:
            break
    return {"object": "list", "data": found[:limit], "has_more": len(found) > limit}


@router.get("/jobs/{job_id}")
def retrieve(job_id: str) -> dict:
    return job(_run(job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str) -> dict:
    """Stop the job's run (its process and workers); the job reads cancelled once they are gone."""
    run = _run(job_id)
    if run.status.is_terminal():
        raise OpenAIError(400, f"job {job_id} has already {STATUSES[run.status]}: only a queued or running job can "
                               "be cancelled", "job_id", "invalid_state")
    fm.cancel(run)
    return job(run.refresh())


@router.get("/jobs/{job_id}/events")
def events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)) -> dict:
    """The run's events, newest first; `after` an event id: the ones before it."""
    run = _run(job_id)
    return page([_event(run.name, i, e) for i, e in enumerate(fm.get_events(run))][::-1], after, limit)


@router.get("/jobs/{job_id}/checkpoints")
def checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)) -> dict:
    """The run's checkpoints, newest first; fine_tuned_model_checkpoint is a custom_weights_path for a new job."""
    run = _run(job_id)
    history = _history(run)
    found = []
    for uri in reversed(fm.get_checkpoints(run)):
        tag = _tag(uri)
        step = tag_step(tag)
        loss, valid = history["loss"].get(step), history["eval_loss"].get(step)
        found.append({
            "id": f"{CHECKPOINT}{run.name}-{tag}", "object": "fine_tuning.job.checkpoint",
            "fine_tuning_job_id": JOB + run.name,
            "created_at": int((loss or valid).timestamp / 1000) if loss or valid else int(run.created_at.timestamp()),
            "fine_tuned_model_checkpoint": uri, "step_number": step,
            "metrics": {"step": step, "train_loss": loss.value if loss else None,
                        "valid_loss": valid.value if valid else None}})
    return page(found, after, limit)


def job(run: fm.TrainingRun, metadata: dict | None = None) -> dict:
    """The OpenAI job object of a run."""
    events = fm.get_events(run) if run.status == fm.RunStatus.RUNNING or run.status.is_terminal() else []
    kinds = {e.type for e in events}
    status = STATUSES.get(run.status) or (
        "queued" if run.status in (fm.RunStatus.PENDING, fm.RunStatus.QUEUED, fm.RunStatus.STARTING) else
        "running" if RunEvent.DATA_VALIDATED in kinds else "validating_files")
    config = run.config
    hyperparameters, method = resolved(config, run.learning_rate)
    done = next((e for e in events if e.type == RunEvent.COMPLETED), None)
    tokens = [e.payload["tokens"] for e in events if e.type == RunEvent.TRAIN_UPDATED and "tokens" in e.payload]
    return {
        "object": "fine_tuning.job", "id": JOB + run.name, "model": run.model, "organization_id": "tessera",
        "created_at": int(run.created_at.timestamp()),
        "finished_at": int(run.completed_at.timestamp()) if run.completed_at else None,
        "status": status,
        "fine_tuned_model": done.payload.get("registered_model") if done else None,
        "training_file": _file_id(run.train_data_path), "validation_file": _file_id(run.eval_data_path),
        "hyperparameters": hyperparameters,
        "method": method,
        "seed": config.training_config.seed if config else 0,
        "trained_tokens": tokens[-1] if tokens and run.status.is_terminal() else None,
        "estimated_finish": int(run.estimated_end_time.timestamp()) if run.estimated_end_time else None,
        "result_files": [_results_file(run)] if done else [],
        "error": _error(run, events) if run.status == fm.RunStatus.FAILED else None,
        "metadata": _metadata(run) if metadata is None else metadata,
        "integrations": [],
    }


def resolved(config: RunConfig | None, learning_rate: float | None) -> tuple[dict, dict]:
    """A run's hyperparameters as OpenAI's job shows them (its older top-level field), and its method echoing them:
    dpo, with beta, for a DPO run."""
    hyperparameters = {
        "n_epochs": config.duration.value if config and config.duration.unit == "ep" else "auto",
        "batch_size": config.training_config.global_batch_size if config else "auto",
        "learning_rate_multiplier": round(learning_rate / DEFAULT_LR, 6) if learning_rate else "auto",
    }
    if config and config.run.task_type == TaskType.DPO:
        beta = config.training_config.model.dpo_cfg.beta
        return hyperparameters, {"type": "dpo", "dpo": {"hyperparameters": hyperparameters | {"beta": beta}}}
    return hyperparameters, {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def _run(job_id: str) -> fm.TrainingRun:
    """The acting user's run behind `job_id`; another user's is as absent as one that never was."""
    try:
        run = fm.get(job_id.removeprefix(JOB)) if job_id.startswith(JOB) else None
    except RunNotFoundError:
        run = None
    if run is None or not access.owns(run.created_by):
        raise OpenAIError(404, f"No such fine-tuning job: {job_id}", "job_id", "not_found")
    return run


def _base(model: str) -> tuple[str, str | None]:
    """The base model to train and the checkpoint to start from: a fine-tuned model (a registered one, or an @alias)
    trains on from the last checkpoint of the run that made it; any other name is a base model."""
    version = registered_version(model)
    if version is None:
        access.check_model(model)
        return model, None
    run_name = version.tags.get("tessera.run_name")
    try:
        checkpoints = fm.get_checkpoints(run_name) if run_name else []
    except RunNotFoundError:
        checkpoints = []
    if not checkpoints or "tessera.base_model" not in version.tags:
        raise OpenAIError(400, f"model {model} (version {version.version}) has no checkpoint of the run that made it "
                               "to train on from: fine-tune its base model instead", "model", "invalid_value")
    latest = max(checkpoints, key=lambda uri: tag_step(_tag(uri)))
    return version.tags["tessera.base_model"], latest


def _refused(error: TesseraError, hp_at: str) -> OpenAIError:
    """Tessera's refusal of the run, its `param` the request's field; a config path it names is reworded as that
    field, which holds the same value."""
    message = str(error)
    setting = next((s for s in PARAMS if message.startswith((s + " ", s + ":"))), None)
    refusal = from_tessera(error, PARAMS[setting].format(hp=hp_at) if setting else None)
    if setting and "." in setting:
        refusal.message = refusal.param + message[len(setting):]
    return refusal


def _tag(checkpoint: str) -> str:
    """A checkpoint URI's ep*-ba* folder name."""
    return checkpoint.rstrip("/").rsplit("/", 1)[-1]


def _file_id(path: str | None) -> str | None:
    """The uploaded file a run reads, else the path it was given (a run not made through this API)."""
    return files.store().id_of(path) or path


def _error(run: fm.TrainingRun, events: list) -> dict:
    """Why the run failed, naming the uploaded file (and its line) rather than where Tessera keeps it."""
    failed = next((e.message for e in reversed(events) if e.type == RunEvent.FAILED), None) or run.details or ""
    param = code = None
    for field, path in (("training_file", run.train_data_path), ("validation_file", run.eval_data_path)):
        file_id = _file_id(path)
        named = files.data_name(file_id) if file_id != path else path  # a run's messages name a file by its name
        if path and named in failed:
            meta = files.store().meta(file_id) if file_id != path else None
            failed = failed.replace(named, f"{field} {file_id}" + (f" ({meta['filename']})" if meta else ""))
            param, code = param or field, code or f"invalid_{field}"
    return {"code": code or "training_failed", "message": failed, "param": param}


def _event(run_name: str, index: int, event: fm.FineTuningEvent) -> dict:
    metrics = event.type == RunEvent.TRAIN_UPDATED and "loss" in event.payload
    return {"object": "fine_tuning.job.event", "id": f"{EVENT}{run_name}-{index}",
            "created_at": int(event.time.timestamp()), "message": event.message,
            "level": "error" if event.type == RunEvent.FAILED else "info",
            "type": "metrics" if metrics else "message",
            "data": json.loads(json.dumps(event.payload, default=str)) | {"tessera_type": event.type}}


def _metadata(run: fm.TrainingRun) -> dict:
    tags = client().get_run(run.run_id).data.tags if run.run_id else {}
    return {k.removeprefix(METADATA_TAG): v for k, v in tags.items() if k.startswith(METADATA_TAG)}


def _results_file(run: fm.TrainingRun) -> str:
    """The id of the job's results file (step, train_loss, valid_loss as CSV, as OpenAI's), written the first time
    a finished job is read."""
    file_id = RESULTS + run.name
    if files.store().meta(file_id) is None:
        history = _history(run)
        lines = ["step,train_loss,valid_loss"] + [
            f"{s},{_value(history['loss'].get(s))},{_value(history['eval_loss'].get(s))}"
            for s in sorted(history["loss"].keys() | history["eval_loss"].keys())]
        files.put(file_id, io.BytesIO(("\n".join(lines) + "\n").encode()), "results.csv", "fine-tune-results",
                  run.created_by)
    return file_id


def _history(run: fm.TrainingRun) -> dict[str, dict]:
    """The run's train and eval loss by step, as MLflow metrics."""
    return {m: {h.step: h for h in client().get_metric_history(run.run_id, m)} for m in ("loss", "eval_loss")}


def _value(metric) -> str:
    return "" if metric is None else str(metric.value)
