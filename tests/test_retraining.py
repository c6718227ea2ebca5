"""Scheduled retraining through the real services: the model's own deployment retrain/<model> with its Prefect
schedule, taken up by the running runner; challengers trained as finetune runs of the tiny model, judged against
the champion on a frozen eval set in the MLflow registry.

One model's life, in order, under a live schedule: Prefect's scheduler holds the schedule's coming runs (SCHEDULED,
in the future) all along, and none of them is a retraining under way. Its first retraining promotes; garbage data
makes the challenger worse on the frozen set, so it is rejected and the champion stays; good data is promoted; with
nothing new the next retraining skips; a rollback by hand moves @champion back; paused and resumed at the end. And a
schedule that fires for real: the retraining its schedule starts trains.
"""

import json
import os
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from zoneinfo import ZoneInfo

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from deployments import services
from tasks.errors import InvalidInputError, RunNotFoundError
from conftest import CHAT, wait_for

pytestmark = pytest.mark.e2e

MODEL = "main.retrain.assistant"


def conversations(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def garbage() -> list[dict]:
    """The eval set's questions with answers unlike its own: training on them makes the frozen set's loss worse."""
    return [{"messages": [m, {"role": "assistant", "content": f"Zebra {i} quartz {i * 7} violin."}]}
            for i, (m, _) in enumerate(r["messages"] for r in CHAT)]


def _registry() -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{os.environ['TESSERA_HOME']}/mlflow/mlflow.db")
    return MlflowClient()


@pytest.fixture
def webhook():
    """A webhook receiver on a free port: the bodies posted to it."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def on_promotion(url: str) -> None:
    """The README's automation: post to a webhook whenever retraining promotes a champion."""
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import EventTrigger

    hook = Webhook(method="POST", url=url).save("tessera-promotions", overwrite=True)
    Automation(
        name="tessera: new champion",
        trigger=EventTrigger(expect={"tessera.run.retrain-promoted"}, posture="Reactive", threshold=1),
        actions=[CallWebhook(block_document_id=hook, payload='{"model": "{{ event.payload.registered_model }}", '
                             '"version": {{ event.payload.version }}, '
                             '"eval_loss": {{ event.payload.challenger_eval_loss }}}')],
    ).create()


def coming_runs(registered_model: str) -> list:
    """The runs Prefect's scheduler holds for the model's schedule: SCHEDULED, their start time in the future."""
    with services.connected(), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name(f"retrain/{registered_model}")
        scheduled = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    return [r for r in scheduled if r.expected_start_time > datetime.now(timezone.utc)]


def wait_for_coming_runs(registered_model: str, timeout: float = 60) -> list:
    """The schedule's coming runs, once Prefect's scheduler has made them (a new schedule's within seconds)."""
    deadline = time.monotonic() + timeout
    while not (coming := coming_runs(registered_model)) and time.monotonic() < deadline:
        time.sleep(1)
    assert coming, f"Prefect's scheduler made no runs of retrain/{registered_model} in {timeout}s"
    return coming


def _verdict(retraining) -> dict:
    events = list(retraining.get_events(follow=True))
    assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
    return next(e for e in events if e.type.startswith("RETRAIN_"))


@pytest.mark.slow
def test_a_model_retrained_on_its_schedule_keeps_the_better_champion(fm, tiny_model_dir, chat_file, tmp_path, webhook,
                                                                      monkeypatch, capsys):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "eval_data_path": chat_file,
                "eval_prompts": ["What is fact number 3?"]},
        "training_config": {"max_length": 64, "global_batch_size": 4, "micro_batch_size": 2,
                            "save_steps": 60,  # one checkpoint and one eval, at the end: not one per epoch (10)
                            "trainer": {"max_steps": 60},
                            "model": {"optim": {"lr": 1e-3, "sched": {"name": "constant", "warmup_steps": 1}}}},
        "retrain": {"mode": "continue"},
    }
    with pytest.raises(InvalidInputError, match="holds no .jsonl files"):  # refused before a schedule exists
        fm.schedule_retraining(MODEL, str(incoming), cron="0 3 * * *", recipe=recipe)
    with pytest.raises(InvalidInputError, match="cron '0 3 \\* \\*' .* is not a schedule"):
        (incoming / "week1.jsonl").write_text(conversations(CHAT))
        fm.schedule_retraining(MODEL, str(incoming), cron="0 3 * *", recipe=recipe)

    # Daily at the one-digit hour farthest from now, 4 h away or more: live all along, its coming runs held by Prefect's
    # scheduler, none due during the test. One digit: the CLI's table below shows the cron whole.
    hour = datetime.now(ZoneInfo("Europe/Paris")).hour
    cron = f"0 {max(range(10), key=lambda h: min((h - hour) % 24, (hour - h) % 24))} * * *"
    schedule = fm.schedule_retraining(MODEL, str(incoming), cron=cron, timezone="Europe/Paris", recipe=recipe)
    assert (schedule.cron, schedule.timezone, schedule.active) == (cron, "Europe/Paris", True)
    with services.connected(), get_client(sync_client=True) as prefect:  # the model's own deployment and schedule
        deployment = prefect.read_deployment_by_name(f"retrain/{MODEL}")
        (found,) = deployment.schedules
        assert found.schedule.cron == cron and deployment.parameters["config"]["retrain"]["registered_model"] == MODEL
    coming = wait_for_coming_runs(MODEL)
    assert min(r.expected_start_time for r in coming) > datetime.now(timezone.utc) + timedelta(hours=3)
    # What a schedule holds for later is not a retraining, pending or otherwise.
    assert fm.list_retrainings(MODEL) == [] and fm.list_retrainings(MODEL, statuses=["PENDING"]) == []
    url, posted = webhook
    with services.connected():
        on_promotion(url)

    # 1. The first retraining, with the schedule's settings: no champion yet, so a challenger that completes wins.
    first = wait_for(fm.retrain_now(MODEL), timeout=600)
    assert (first.status, first.outcome) == (fm.RunStatus.COMPLETED, "promoted"), first.details
    promoted = _verdict(first)
    assert promoted.type == "RETRAIN_PROMOTED" and promoted.payload["champion_eval_loss"] is None
    registry = _registry()
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == 1 and champion.tags["tessera.retrain"] == "promoted"
    parent = registry.get_run(registry.get_run(fm.get(first.challenger).run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["tessera.run_name"] == first.name  # the challenger's MLflow run is nested under it
    answers = json.loads(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/retrain/answers.json"))
    assert answers["columns"] == ["prompt", "challenger (version 1)"]

    # 2. Garbage arrives: trained from the champion on it alone, the challenger does worse on the frozen set.
    (incoming / "week2.jsonl").write_text(conversations(garbage()))
    with services.connected():  # as `prefect deployment run 'retrain/<model>'` does: the runner took it up
        flow_run = run_deployment(f"retrain/{MODEL}", timeout=600, poll_interval=1)
    second = fm.get_retraining(flow_run.name)
    assert (second.status, second.outcome) == (fm.RunStatus.COMPLETED, "rejected"), second.details
    rejected = _verdict(second)
    assert rejected.payload["challenger_eval_loss"] > rejected.payload["champion_eval_loss"]
    assert "the champion stays" in rejected.message
    assert int(registry.get_model_version_by_alias(MODEL, "champion").version) == 1
    assert registry.get_model_version(MODEL, "2").tags["tessera.retrain"] == "rejected"
    assert fm.get(second.challenger).train_data_path.endswith("train.jsonl")
    assert sum(1 for _ in open(fm.get(second.challenger).train_data_path)) == len(CHAT)  # the new file only

    # 3. Good data: more of what the frozen set asks, from the champion; promoted.
    (incoming / "week3.jsonl").write_text(conversations(CHAT))
    third = wait_for(fm.retrain_now(MODEL), timeout=600)
    assert third.outcome == "promoted", third.details
    better = _verdict(third)
    assert better.payload["challenger_eval_loss"] < better.payload["champion_eval_loss"]
    assert better.payload["champion_version"] == 1
    assert int(registry.get_model_version_by_alias(MODEL, "champion").version) == 3

    deadline = time.monotonic() + 60  # the automation posted each promotion
    while len(posted) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert [(p["model"], p["version"]) for p in posted] == [(MODEL, 1), (MODEL, 3)]

    # 4. Nothing new: skipped, nothing trained.
    fourth = wait_for(fm.retrain_now(MODEL), timeout=600)
    assert (fourth.outcome, fourth.challenger) == ("skipped", None)
    assert "nothing new" in _verdict(fourth).message
    assert [r.name for r in fm.list_retrainings(MODEL)] == [fourth.name, third.name, second.name, first.name]
    assert {r.id for r in coming} <= {r.id for r in coming_runs(MODEL)}  # held all along, none started or stopped

    # A rollback by hand.
    assert fm.promote(MODEL, 1) == 3
    assert int(registry.get_model_version_by_alias(MODEL, "champion").version) == 1

    # Resumed and paused again: a paused schedule holds no coming runs (Prefect deletes them).
    assert fm.pause_retraining(MODEL, paused=False).active and not fm.pause_retraining(MODEL).active
    assert coming_runs(MODEL) == []

    from cli import main as cli  # the CLI over the same API

    listed = [cron, "paused", "promoted", "rejected", "skipped"]
    for argv, code, said in ((["retrain", "list", MODEL], 0, listed),
                             (["promote", MODEL, "9"], 2, [f"error: {MODEL} has no version 9"])):
        monkeypatch.setattr(sys, "argv", ["tessera", *argv])
        with pytest.raises(SystemExit) as exit:
            cli.main()
        out = " ".join(capsys.readouterr().out.split())
        assert exit.value.code == code and all(s in out for s in said), out
    fm.unschedule_retraining(MODEL)
    assert fm.list_retraining_schedules() == []
    with pytest.raises(RunNotFoundError, match="has no retraining schedule"):
        fm.retrain_now(MODEL)


def test_a_schedule_that_fires_starts_a_retraining_that_trains(fm, tiny_model_dir, chat_file, tmp_path):
    model = "main.retrain.fired"
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "week1.jsonl").write_text(conversations(CHAT))
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "eval_data_path": chat_file},
        "training_config": {"max_length": 64, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 4,
                            "trainer": {"max_steps": 4}},
    }
    # A whole minute 70 to 130 s away (cron has minutes): time for the scheduler to make its run and the runner to
    # serve the new deployment. Day and month set: it fires once, its next run a year away.
    at = (datetime.now(timezone.utc) + timedelta(seconds=130)).replace(second=0, microsecond=0)
    fm.schedule_retraining(model, str(incoming), cron=f"{at.minute} {at.hour} {at.day} {at.month} *", recipe=recipe)
    (due, *later) = sorted(wait_for_coming_runs(model), key=lambda r: r.expected_start_time)
    assert due.expected_start_time == at and due.auto_scheduled and all(r.expected_start_time.year > at.year
                                                                        for r in later)
    assert fm.list_retrainings(model, statuses=fm.ACTIVE) == []  # nothing under way before it fires

    # Listed once it is due, under Prefect's name until it names itself: read back whole once it has ended.
    deadline = time.monotonic() + (at - datetime.now(timezone.utc)).total_seconds() + 300
    while not ((found := fm.list_retrainings(model)) and found[0].status.is_terminal()):
        assert time.monotonic() < deadline, f"the schedule's retraining of {model} at {at}: {found}"
        time.sleep(2)
    (retraining,) = found
    assert retraining.flow_run_id == str(due.id)  # the run the schedule held, started by it
    assert (retraining.status, retraining.outcome) == (fm.RunStatus.COMPLETED, "promoted"), retraining.details
    assert fm.get(retraining.challenger).status == fm.RunStatus.COMPLETED
    assert _verdict(retraining).type == "RETRAIN_PROMOTED"
    assert int(_registry().get_model_version_by_alias(model, "champion").version) == 1
    fm.unschedule_retraining(model)
