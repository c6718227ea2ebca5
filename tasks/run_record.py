"""A run's folder and its record (names and ids), read by the steps, the hooks and the API without a server
round trip. The folder's layout is defined here and nowhere else:

    TESSERA_HOME/runs/<run name>/
        run.json                this record
        spec.json               what the train task hands the worker (tasks.training.spec)
        worker.pgid             the training worker's process group, while it runs
        logs/                   worker.log, worker.stderr.log
        checkpoints/            ep*-ba*/, huggingface/ba*/, latest-sharded-rank0.symlink (tasks.training.checkpoints)
        custom_weights/         custom_weights_path, when fetched from a store
        eval_generations.json   the answers to the eval prompts so far
"""

import getpass
import json
import os
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, Cancelling

from tasks.home import runs_dir
from tasks.prefect_api import prefect_client

WORKER_PGID = "worker.pgid"  # in a run folder while its training worker runs: the worker's process group


def _in_run_dir(name: str) -> property:
    """A path in the run's folder, as the layout above names it."""
    return property(lambda record: record.dir / name)


@dataclass
class RunRecord:
    name: str
    flow_run_id: str
    experiment_id: str
    mlflow_run_id: str

    @property
    def dir(self) -> Path:
        return runs_dir() / self.name

    spec = _in_run_dir("spec.json")
    pgid_file = _in_run_dir(WORKER_PGID)
    logs = _in_run_dir("logs")
    checkpoints = _in_run_dir("checkpoints")
    custom_weights = _in_run_dir("custom_weights")
    generations = _in_run_dir("eval_generations.json")

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, name: str) -> "RunRecord | None":
        path = runs_dir() / name / "run.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None

    @classmethod
    def of_flow_run(cls, flow_run) -> "RunRecord | None":
        """For a flow's hooks: the record by the flow run's current name. The object a hook gets was read when the
        flow started, before a run started from its deployment or schedule named itself."""

        with prefect_client() as prefect:
            return cls.load(prefect.read_flow_run(flow_run.id).name)


RUN_TAG = "tessera"  # every run's flow run carries it, and the two below
SWEEP_TAG = "tessera-sweep"  # a sweep's flow runs, instead: fm.list() lists runs only
RETRAIN_TAG = "tessera-retrain"  # a retraining's flow runs, instead
# Put on a flow run cancelled while its process was starting (cancel_flow_run): its flow, once started, ends itself.
CANCELLED_TAG = "tessera-cancelled"


def cancel_flow_run(prefect, flow_run, message: str) -> StateType | None:
    """Cancel a flow run of Tessera's (a run, sweep, retraining or node): the state it was in, or None when it has
    ended or is ending already.

    Scheduled: set Cancelled; Prefect never starts it. Running: set Cancelling; the worker kills its process
    and the flow's hooks clean up. Pending, its process starting: tagged CANCELLED_TAG, and its flow, once started,
    ends itself (cancelled_while_starting). Not set Cancelled, which Prefect lets that process move on to Running,
    nor Cancelling: Prefect's runner (3.9.1) ignores a cancel that comes before it knows the process, and the
    process, finding the run Cancelling, exits without ending it, Cancelling for good. If it moved on before the
    tag, its flow may have looked already, so it is cancelled as what it is now (the state returned), as a running
    one is."""
    state = flow_run.state
    if state is None or state.is_final() or state.type == StateType.CANCELLING or CANCELLED_TAG in flow_run.tags:
        return None
    if state.type == StateType.PENDING:
        prefect.update_flow_run(flow_run.id, tags=[*flow_run.tags, CANCELLED_TAG])
        state = prefect.read_flow_run(flow_run.id).state
        if state.type == StateType.PENDING:
            return state.type
        if state.is_final():
            return None
    if state.type == StateType.SCHEDULED:
        prefect.set_flow_run_state(flow_run.id, Cancelled(message=message), force=True)
        return state.type
    prefect.set_flow_run_state(flow_run.id, Cancelling(message=message), force=True)
    return state.type


def cancelled_while_starting() -> bool:
    """In a flow, first thing: whether it was cancelled while its process was starting; if so it returns Cancelled.
    Read from the server: the tags this process holds are those the run had when the process fetched it."""
    with prefect_client() as prefect:
        return CANCELLED_TAG in prefect.read_flow_run(current_flow_run.id).tags


def run_tags(user: str, experiment_id: str) -> list[str]:
    """A run's flow-run tags: who created it and its MLflow experiment, which list() filters on."""
    return [RUN_TAG, f"created_by:{user}", f"experiment:{experiment_id}"]


def sweep_tags(user: str, experiment_id: str) -> list[str]:
    """A sweep's flow-run tags: a run's, with SWEEP_TAG for RUN_TAG."""
    return [SWEEP_TAG, *run_tags(user, experiment_id)[1:]]


def retrain_tags(user: str, experiment_id: str, registered_model: str) -> list[str]:
    """A retraining's flow-run tags: a run's, with RETRAIN_TAG for RUN_TAG, and the model it maintains."""
    return [RETRAIN_TAG, *run_tags(user, experiment_id)[1:], f"model:{registered_model}"]


def challenger_tag(retraining_name: str) -> str:
    """The tag of a retraining's challenger run."""
    return f"retraining:{retraining_name}"


def trial_tag(sweep_name: str) -> str:
    """The tag of a sweep's trials (runs, tagged as runs besides)."""
    return f"sweep:{sweep_name}"


def tag_value(tags: list[str], key: str) -> str | None:
    """The value of a `key:value` tag."""
    return next((t.split(":", 1)[1] for t in tags if t.startswith(f"{key}:")), None)


# Set by `tessera serve` for each request: the user its API key names.
ACTING_USER: ContextVar[str | None] = ContextVar("tessera_acting_user", default=None)


def current_user() -> str:
    """Who creates runs: the caller of `tessera serve`; else `TESSERA_USER` (an email, as the anchor records), else
    the login name."""
    return ACTING_USER.get() or os.environ.get("TESSERA_USER") or getpass.getuser()
