"""Whole runs through the real embedded services: Prefect server + runner, MLflow store, DeepSpeed worker."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from tasks.errors import InvalidInputError, TooManyActiveRunsError

pytestmark = pytest.mark.e2e

CHAT = [
    {"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                  {"role": "assistant", "content": f"Fact {i} is that Tessera fine-tunes models."}]}
    for i in range(24)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fm():
    """The public API with the embedded services started on free ports; stopped afterwards."""
    os.environ["TESSERA_PREFECT_PORT"] = str(_free_port())
    os.environ["TESSERA_MLFLOW_PORT"] = str(_free_port())
    from flows import foundation_model, services

    services.ensure_started()
    yield foundation_model
    services.stop()


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    return str(path)


def _wait(fm, run, statuses, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.refresh()
        if run.status in statuses:
            return run
        time.sleep(1)
    raise AssertionError(f"{run.name} stayed {run.status} for {timeout}s")


def test_a_run_goes_from_create_to_a_registered_model(fm, tiny_model_dir, chat_file):
    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="2ep", learning_rate=1e-3, context_length=64, eval_prompts=["Hi there"])
    assert re.fullmatch(r"ift-tiny-llama\d*-[a-z0-9]{6}", run.name)
    assert not run.status.is_terminal()  # create() returns at once

    events = list(fm.get_events(run, follow=True))
    types = [e.type for e in events]
    assert types[0] == "CREATED" and types[-1] == "COMPLETED", types
    order = ["CREATED", "STARTED", "DATA_VALIDATED", "MODEL_INITIALIZED", "TRAIN_UPDATED", "TRAIN_FINISHED", "COMPLETED"]
    assert [t for t in types if t in order] == sorted([t for t in types if t in order], key=order.index)
    assert set(order) <= set(types)
    updates = [e.message for e in events if e.type == "TRAIN_UPDATED"]
    assert all(re.fullmatch(r"\[epoch=\d/2\]\[batch=\d+/\d+\]\[ETA=\S+\] Train loss: \d+\.\d\d", m) for m in updates), updates

    run = _wait(fm, run, {fm.RunStatus.COMPLETED})
    assert run.completed_at and run.started_at and run.run_id and run.experiment_id
    assert re.fullmatch(rf"/Users/[^/]+/{run.name}", run.experiment_path)
    assert fm.get(run.name).status == fm.RunStatus.COMPLETED
    assert run.name in [r.name for r in fm.list(statuses=["COMPLETED"])]

    checkpoints = fm.get_checkpoints(run)
    assert checkpoints and all(re.search(rf"/{run.name}/checkpoints/ep\d-ba\d+$", c) for c in checkpoints)
    assert Path(checkpoints[-1].removeprefix("file://")).is_dir()

    mlflow.set_tracking_uri(f"sqlite:///{os.environ['TESSERA_HOME']}/mlflow/mlflow.db")
    losses = mlflow.MlflowClient().get_metric_history(run.run_id, "loss")
    assert len(losses) >= 2
    registered = f"main.test.{run.name}"
    version = mlflow.MlflowClient().get_model_version_by_alias(registered, "candidate")
    assert version.tags["tessera.run_name"] == run.name
    generator = mlflow.transformers.load_model(f"models:/{registered}@candidate")
    text = generator("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert isinstance(text, str) and len(text) > len("Hello")


def test_cancel_stops_the_run_and_its_worker_but_keeps_its_files(fm, tiny_model_dir, chat_file):
    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="100000ba", context_length=64)
    for event in fm.get_events(run, follow=True):
        if event.type == "TRAIN_UPDATED":
            break
    assert _worker_pids(run.name), "the worker should be running"
    assert fm.cancel(run) == 1
    cancelled_at = time.monotonic()
    run = _wait(fm, run, {fm.RunStatus.STOPPED}, timeout=30)
    while _worker_pids(run.name) and time.monotonic() - cancelled_at < 30:
        time.sleep(0.5)
    assert not _worker_pids(run.name), "no training process may outlive a cancel by 30 s"
    deadline = time.monotonic() + 20
    while "CANCELED" not in [e.type for e in fm.get_events(run)] and time.monotonic() < deadline:
        time.sleep(1)
    assert "CANCELED" in [e.type for e in fm.get_events(run)]
    run_dir = Path(os.environ["TESSERA_HOME"]) / "runs" / run.name
    assert (run_dir / "logs" / "worker.log").stat().st_size > 0
    assert fm.cancel(run) == 0  # already stopped


def _worker_pids(run_name: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"tasks.training.worker --run-name {run_name}"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.parametrize("overrides, message", [
    (dict(model="acme/no-such-model"), r"unknown model 'acme/no-such-model'"),
    (dict(model="/no/such/folder"), r"model folder /no/such/folder does not exist"),
    (dict(train_data_path="/no/such/train.jsonl"), r"train_data_path /no/such/train.jsonl does not exist"),
    (dict(register_to="main"), r"register_to 'main' is malformed"),
    (dict(task_type="CHAT"), r"task_type 'CHAT' is unknown"),
    (dict(training_duration="two epochs"), r"is not a duration"),
    (dict(context_length=4096), r"context_length 4096 exceeds the maximum of .* \(1024\)"),
    (dict(learning_rate=-1.0), r"learning_rate -1.0 must be a positive number"),
])
def test_bad_input_is_refused_before_any_run_exists(fm, tiny_model_dir, chat_file, overrides, message):
    before = len(fm.list(include_details=False, limit=1000))
    args = dict(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test")
    with pytest.raises(InvalidInputError, match=message):
        fm.create(**{**args, **overrides})
    assert len(fm.list(include_details=False, limit=1000)) == before


def test_the_active_run_limit_holds_when_creates_race(fm, tiny_model_dir, chat_file, monkeypatch):
    active = len(fm.list(statuses=[s for s in fm.ACTIVE], include_details=False))
    monkeypatch.setenv("TESSERA_MAX_ACTIVE_RUNS", str(active + 3))
    results: list = []

    def submit():
        try:
            results.append(fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                                     training_duration="100000ba", context_length=64))
        except TooManyActiveRunsError as e:
            results.append(e)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, TooManyActiveRunsError)]
    assert (len(created), len(refused)) == (3, 3)
    assert "cancel one" in str(refused[0])
    assert fm.cancel(created) == 3
    for run in created:
        _wait(fm, run, {fm.RunStatus.STOPPED}, timeout=60)


def test_prefect_deployment_run_starts_the_same_flow(fm, tiny_model_dir, chat_file):
    params = {"model": str(tiny_model_dir), "train_data_path": chat_file, "register_to": "main.cli",
              "training_duration": "1ep", "context_length": 64}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "finetune/default", "--params", json.dumps(params)],
        capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": os.environ["PREFECT_API_URL"]},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        named = [r for r in fm.list(include_details=False) if r.flow_run_id == flow_run_id]
        if named and named[0].status.is_terminal():
            break
        time.sleep(2)
    run = named[0]
    assert run.status == fm.RunStatus.COMPLETED, run.details
    assert run.name.startswith("ift-tiny-llama")  # the flow named itself like create() would
    events = [e.type for e in fm.get_events(run.name, follow=True)]  # the server stores events a few s late
    assert events[0] == "CREATED" and events[-1] == "COMPLETED", events


def test_the_bundled_smollm2_fine_tunes_and_registers(fm, chat_file):
    run = fm.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path=chat_file, register_to="main.smol",
                    training_duration="2ba", learning_rate=1e-4, context_length=128, eval_prompts=["What is Tessera?"])
    events = list(fm.get_events(run, follow=True))
    assert events[-1].type == "COMPLETED", events[-1].message
    assert events[-1].payload["registered_model"] == f"main.smol.{run.name}"
    run.refresh()
    table = mlflow.MlflowClient().load_table(run.experiment_id, "eval_generations.json", run_ids=[run.run_id])
    assert (table["batch"].min(), table["batch"].max()) == (0, 2)  # before training, and at the last checkpoint
    assert all(table["response"].str.len() > 0)


def test_bad_records_fail_the_run_with_file_line_and_field(fm, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    run = fm.create(model=str(tiny_model_dir), train_data_path=str(bad), register_to="main.test", context_length=64)
    events = list(fm.get_events(run, follow=True))
    assert events[-1].type == "FAILED"
    assert "bad.jsonl line 2, field messages[0].role: found 'bot'" in events[-1].message
    assert "DATA_VALIDATED" not in [e.type for e in events]  # nothing past validation ran
    assert _wait(fm, run, {fm.RunStatus.FAILED}).status == fm.RunStatus.FAILED
