"""Scheduled retraining through the real services: the model's own deployment retrain/<model> with its Prefect
schedule, taken up by the running runner; challengers trained as finetune runs of the tiny model, judged against
the champion on a frozen eval set in the MLflow registry.

One model's life, in order: scheduled (a real Prefect schedule, paused and resumed); its first retraining promotes;
garbage data makes the challenger worse on the frozen set, so it is rejected and the champion stays; good data is
promoted; with nothing new the next retraining skips; a rollback by hand moves @champion back.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.deployments import run_deployment

from flows import services
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


def _verdict(retraining) -> dict:
    events = list(retraining.get_events(follow=True))
    assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
    return next(e for e in events if e.type.startswith("RETRAIN_"))


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

    schedule = fm.schedule_retraining(MODEL, str(incoming), cron="0 3 * * *", timezone="Europe/Paris", recipe=recipe)
    assert (schedule.cron, schedule.timezone, schedule.active) == ("0 3 * * *", "Europe/Paris", True)
    with services.connected(), get_client(sync_client=True) as prefect:  # the model's own deployment and schedule
        deployment = prefect.read_deployment_by_name(f"retrain/{MODEL}")
        (found,) = deployment.schedules
        assert found.schedule.cron == "0 3 * * *" and deployment.parameters["config"]["retrain"]["registered_model"] == MODEL
    # Resumed and paused again: left paused, so 03:00 in Paris cannot start a retraining in the middle of this test.
    assert fm.pause_retraining(MODEL, paused=False).active and not fm.pause_retraining(MODEL).active
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

    # A rollback by hand.
    assert fm.promote(MODEL, 1) == 3
    assert int(registry.get_model_version_by_alias(MODEL, "champion").version) == 1

    from flows import cli  # the CLI over the same API

    listed = ["0 3 * * *", "paused", "promoted", "rejected", "skipped"]
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
