"""Step 4: run the DeepSpeed worker in its own process group; its progress becomes events and metrics."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import Metric
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks import tracking_mirror, warm_start
from tasks.config import RunConfig
from tasks.devices import DEVICE_SLOTS, claim_gpus, gpu_count
from tasks.errors import InvalidInputError, StorageError, TrainingDiverged, WorkerFailed
from tasks.events import RunEvent, emit
from tasks.nodes import END_S, OtherNodes
from tasks.ports import free_port
from tasks.process_group import kill_group, stop_group
from tasks.retries import retryable
from tasks.run_record import RunRecord
from tasks.tracking import client
from tasks.training import protocol
from tasks.training.spec import TrainSpec

WORKER_MODULE = "tasks.training.worker"
EVENT_EVERY_S = 2.0  # at most one TRAIN_UPDATED event per this many seconds (the last one always)
PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")  # DPO runs' (TRL's)
PROGRESS_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "mfu", *PREFERENCE_METRICS)


# A retry resumes from the latest checkpoint: the worker finds it through latest-sharded-rank0.symlink.
@task(name="train", retries=2, retry_delay_seconds=5, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def train(record: RunRecord, config: RunConfig, model_dir: str, train_rows: str, eval_rows: str | None,
          init_from: str | None) -> str:
    """Train until the duration is reached, resuming from the latest checkpoint on a retry; returns the HF export."""
    spec = TrainSpec.build(record.name, config, Path(model_dir), Path(train_rows), record.checkpoints,
                           eval_data_dir=eval_rows, init_from=init_from,
                           processes=processes_for(config.training_config.deepspeed.processes))
    spec.save(record.spec)
    record.logs.mkdir(exist_ok=True)
    stderr_log = record.logs / "worker.stderr.log"
    report = WorkerReport(record, config)
    # Over several machines, this one is node 0 and the others join through the work pool (tasks/nodes.py).
    others = OtherNodes(spec, record.spec) if config.training_config.deepspeed.nodes > 1 else None
    # One slot per process of the global limit (one slot per GPU) and that many GPUs of this machine, held while
    # training; stderr apart from stdout: its last line is the worker's reason when it fails.
    # The shortest lease Prefect takes: a run killed with its worker frees its slots within a minute.
    with (concurrency(DEVICE_SLOTS, occupy=spec.processes, lease_duration=60), claim_gpus(spec.processes) as gpus,
          open(record.logs / "worker.log", "a") as log, open(stderr_log, "a") as stderr):
        try:
            if others:
                others.start()
            proc = start_worker(others.command(gpus) if others else worker_command(spec, str(record.spec), gpus),
                                worker_env(gpus), stderr, log)
        except BaseException:
            if others:  # the nodes started so far would wait for a head that never comes
                others.stop()
            raise
        record.pgid_file.write_text(str(proc.pid))
        if others:
            others.watch(proc.pid)
        try:
            for line in proc.stdout:
                report.take(line, log)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # cancelled or crashed while training: take the worker down with us
                kill_worker(record)
            record.pgid_file.unlink(missing_ok=True)
            if others:
                others.stop(wait_s=END_S if proc.returncode == 0 else 0)
    report.log_generations()
    return outcome(record, config, report, returncode, stderr_log, others.failure if others else None)


class WorkerReport:
    """What the worker's protocol lines say, as they come: metrics to MLflow (and to the run's own tracking server),
    TRAIN_UPDATED events (at most one per EVENT_EVERY_S), the eval prompts' answers, and how training ended."""

    def __init__(self, record: RunRecord, config: RunConfig):
        self.record, self.unit, self.mlflow = record, config.duration.unit, client()
        self.tags = self.mlflow.get_run(record.mlflow_run_id).data.tags  # where its twin is, if it has one
        self.generations: list[dict] = []
        self.finished: dict | None = None
        self.stopped: dict | None = None  # early stopping's reason, when it ended the run
        self.diverged: dict | None = None  # the divergence guard's finding, when it ended the run
        self.last_event = 0.0

    def take(self, line: str, log) -> None:
        """One line of the worker's stdout; what is not a protocol line goes to the worker log."""
        msg = protocol.parse(line)
        if msg is None:
            log.write(line)
            return
        kind, name = msg["kind"], self.record.name
        if kind == "started" and msg.get("resumed_from"):
            emit(name, RunEvent.TRAIN_UPDATED, f"resumed from {msg['resumed_from']}", **msg)
        elif kind == "progress":
            self._log_metrics(msg["batch"], {k: msg.get(k) for k in PROGRESS_METRICS})
            now = time.monotonic()
            if now - self.last_event >= EVENT_EVERY_S or msg["batch"] == msg["total_batches"]:
                emit(name, RunEvent.TRAIN_UPDATED, train_message(msg, self.unit), **msg)
                self.last_event = now
        elif kind == "eval":
            self._log_metrics(msg["batch"], {f"eval_{k}": msg.get(k) for k in ("loss", *PREFERENCE_METRICS)})
        elif kind == "generations":
            self.generations += [{"batch": msg["batch"], "prompt": p, "response": r}
                                 for p, r in zip(msg["prompts"], msg["responses"])]
            self.record.generations.write_text(json.dumps(self.generations, indent=1))
        elif kind == "pruned":
            log.write(pruned_message(msg))
        elif kind in ("diverged", "stopped", "finished"):
            setattr(self, kind, msg)

    def log_generations(self) -> None:
        """The answers to the eval prompts at each checkpoint, as one MLflow table."""
        if self.generations:
            self.mlflow.log_table(self.record.mlflow_run_id, artifact_file="eval_generations.json",
                                  data={k: [g[k] for g in self.generations] for k in self.generations[0]})

    def _log_metrics(self, step: int, values: dict) -> None:
        now_ms = int(time.time() * 1000)
        # Not NaN or inf (a diverged step's loss): the `diverged` line reports those, and a chart cannot plot them.
        metrics = [Metric(k, float(v), now_ms, step) for k, v in values.items() if v is not None and math.isfinite(v)]
        self.mlflow.log_batch(self.record.mlflow_run_id, metrics=metrics)
        tracking_mirror.log_metrics(self.tags, metrics)


def outcome(record: RunRecord, config: RunConfig, report: WorkerReport, returncode: int, stderr_log: Path,
            other_nodes_failure: str | None) -> str:
    """The export's path and TRAIN_FINISHED when training ended well; else the typed error its exit code means."""
    if returncode == protocol.DIVERGED_EXIT and report.diverged is not None:
        raise TrainingDiverged(diverged_message(report.diverged, config.training_config.model.optim.lr))
    if returncode == protocol.BAD_INPUT_EXIT:
        raise InvalidInputError(protocol.why(stderr_log))
    if returncode == protocol.DISK_FULL_EXIT:
        raise StorageError(protocol.why(stderr_log))
    finished, stopped = report.finished, report.stopped
    if returncode != 0 or finished is None:
        if other_nodes_failure:
            raise WorkerFailed(f"training stopped because {other_nodes_failure}")
        raise WorkerFailed(f"training worker exited with code {returncode}: {protocol.why(stderr_log)}")
    payload = {**finished, "stopped_early": stopped is not None}
    if stopped:
        payload.update(reason=stopped["reason"], best_eval_loss=stopped["best_loss"], best_batch=stopped["best_batch"])
    emit(record.name, RunEvent.TRAIN_FINISHED, finished_message(finished, stopped), **payload)
    return finished["hf_path"]


def start_worker(command: list[str], env: dict | None, stderr, log) -> subprocess.Popen | warm_start.WarmProcess:
    """The worker in a process group of its own (cancel and retry stop DeepSpeed and its children too): forked from
    the warm-start server when it is one process, else started as `command`. The worker log says which."""
    if command[1:3] == ["-m", WORKER_MODULE]:  # one process; the launcher's ranks each start cold
        read, write = os.pipe()
        started = time.monotonic()
        try:
            proc = warm_start.start(f"{WORKER_MODULE}:main", (command[3:],), title=" ".join(command), stdout=write,
                                    stderr=stderr.fileno(), env=env)
        except warm_start.Refused as e:
            os.close(read)
            log.write(f"worker started cold: {e}\n")
        else:
            proc.stdout = open(read, buffering=1)
            log.write(f"worker started warm: pid {proc.pid} in {time.monotonic() - started:.3f} s\n")
            return proc
        finally:
            os.close(write)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
                            start_new_session=True)


def kill_worker(record: RunRecord, now: bool = False) -> bool:
    """Stop the run's worker with its whole process group (DeepSpeed and its children); True if one was running.
    now: SIGKILL without waiting, for a flow that leaves this instant (its checkpoints are written whole or not at
    all); else SIGTERM, and SIGKILL after a grace period."""
    try:
        pgid = int(record.pgid_file.read_text())
    except FileNotFoundError:
        return False
    stopped = kill_group(pgid, wait_s=0) if now else stop_group(pgid)
    record.pgid_file.unlink(missing_ok=True)
    return stopped


def processes_for(requested: int | None) -> int:
    """The run's DeepSpeed ranks on this machine: as requested (at most one per GPU), or one per GPU, or 1 on CPU."""
    gpus = gpu_count()
    if requested is None:
        return max(1, gpus)
    if gpus and requested > gpus:
        raise InvalidInputError(
            f"training_config.deepspeed.processes {requested} is more than the {gpus} GPU(s) on this machine: "
            f"set it to {gpus} or fewer, or null for one per GPU"
        )
    return requested


def worker_command(spec: TrainSpec, spec_path: str, gpus: list[str] | None = None) -> list[str]:
    """The worker's command line; several processes go through the deepspeed launcher, which gives each its rank
    (and, given no resource arguments, one each of the GPUs worker_env makes visible).

    Every process's command line names the run, so `ps` shows which run it belongs to.
    """
    worker = [WORKER_MODULE, "--run-name", spec.run_name, "--spec", spec_path]
    if spec.processes == 1:
        return [sys.executable, "-m", *worker]
    processes = [] if gpus else ["--num_gpus", str(spec.processes)]  # on the CPU: how many
    return [sys.executable, "-m", "deepspeed.launcher.runner", *processes, "--master_port", str(free_port()),
            "--module", *worker]


def worker_env(gpus: list[str]) -> dict[str, str] | None:
    """The worker sees only the GPUs its run holds (by machine-wide id); None on the CPU: this process's own."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else None


def diverged_message(diverged: dict, learning_rate: float) -> str:
    """What happened and what to do: `training diverged at batch 7: loss nan (not a number); lower learning_rate
    (now 0.5) and start again from the last checkpoint ep0-ba5`."""
    where = (
        f"from the last checkpoint {diverged['checkpoint']}" if diverged.get("checkpoint")
        else "from the start (no checkpoint was saved before it)"
    )
    return (
        f"training diverged at batch {diverged['batch']}: {diverged['reason']}; "
        f"lower learning_rate (now {learning_rate:g}) and start again {where}"
    )


def train_message(p: dict, unit: str) -> str:
    """`[epoch=1/2][batch=5/20][ETA=3min] Train loss: 1.71`, in the unit of the run's duration; a DPO run's adds
    `, reward accuracy: 0.75, margin: 0.120`."""
    if unit == "tok":
        where = f"[token={p['tokens']}/{p['total_tokens']}]"
    elif unit == "ba":
        where = f"[batch={p['batch']}/{p['total_batches']}]"
    else:
        where = f"[epoch={p['epoch']}/{p['epochs']}][batch={p['batch']}/{p['total_batches']}]"
    rewards = f", reward accuracy: {p['reward_accuracy']:.2f}, margin: {p['reward_margin']:.3f}" \
        if "reward_accuracy" in p else ""  # DPO
    return f"{where}[ETA={_duration(protocol.seconds_left(p) or 0)}] Train loss: {p['loss']:.2f}{rewards}"


def finished_message(finished: dict, stopped: dict | None) -> str:
    """TRAIN_FINISHED's message: the batches trained, or why early stopping ended the run where it did."""
    if stopped:
        return f"training stopped early at batch {stopped['batch']}: {stopped['reason']}"
    return f"training finished after {finished['batch']} batches"


def pruned_message(p: dict) -> str:
    """A line for the worker log when save_top_k removed older checkpoints."""
    return f"save_top_k={p['keep']}: removed {', '.join(p['removed'])}\n"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}min"
    return f"{int(seconds // 3600)}h{round(seconds % 3600 / 60)}min"
