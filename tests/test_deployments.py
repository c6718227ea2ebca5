"""The finetune deployment as Prefect users reach it: `prefect deployment run`, its parameter schema, a work pool."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from deployments import services

pytestmark = pytest.mark.e2e


def _deployment_run(params: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "finetune/default", "--params", json.dumps(params)],
        capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": os.environ["PREFECT_API_URL"]},
        timeout=120,
    )


def test_prefect_deployment_run_takes_the_config_or_the_anchors_arguments(fm, tiny_model_dir, chat_file):
    config = {"run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file, "register_to": "main.cli"},
              "training_config": {"max_length": 64, "trainer": {"max_steps": 3}}}
    anchor = {"model": str(tiny_model_dir), "train_data_path": chat_file, "register_to": "main.cli",
              "training_duration": "1ep", "context_length": 64}
    started = [_deployment_run(params) for params in ({"config": config}, anchor)]
    assert all(done.returncode == 0 for done in started), [done.stdout + done.stderr for done in started]
    flow_run_ids = [re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1) for done in started]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        named = {r.flow_run_id: r for r in fm.list(include_details=False) if r.flow_run_id in flow_run_ids}
        if len(named) == 2 and all(r.status.is_terminal() for r in named.values()):
            break
        time.sleep(2)
    for flow_run_id, duration in zip(flow_run_ids, ("3ba", "1ep")):
        run = named[flow_run_id]
        assert run.status == fm.RunStatus.COMPLETED, run.details
        assert run.name.startswith("ift-tiny-llama")  # the flow named itself like create() would
        assert run.experiment_id and run.name in [r.name for r in fm.list(experiment_id=run.experiment_id)]
        assert (run.training_duration, run.context_length, run.register_to) == (duration, 64, "main.cli")
        events = [e.type for e in fm.get_events(run.name, follow=True)]  # the server stores events a few s late
        assert events[0] == "CREATED" and events[-1] == "COMPLETED", events


def test_the_deployment_refuses_a_bad_config_before_a_run_exists(fm, tiny_model_dir, chat_file):
    """The deployment's parameter schema is the config's: the server (and the UI's form) check against it."""
    with services.connected(), get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("finetune/default")
        before = prefect.count_flow_runs()  # a count: read_flow_runs() stops at the server's page of 200
    schema = deployment.parameter_openapi_schema
    config = schema["definitions"]["RunConfig"]
    assert set(config["properties"]) == {"run", "training_config"} and config["additionalProperties"] is False
    lr = schema["definitions"]["Optim"]["properties"]["lr"]
    assert (lr["maximum"], lr["default"]) == (1e-3, 5e-5) and "learning rate" in lr["description"]
    assert {"model", "train_data_path", "register_to", "learning_rate"} <= set(schema["properties"])

    bad = {"config": {"run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file,
                              "register_to": "main.cli"},
                      "training_config": {"model": {"optim": {"lr": 5}}, "max_lenght": 64}}}
    done = _deployment_run(bad)
    assert done.returncode != 0 and "lr" in done.stdout + done.stderr, done.stdout + done.stderr
    with services.connected(), get_client(sync_client=True) as prefect:
        assert prefect.count_flow_runs() == before  # refused before any run existed


def test_a_work_pool_deployment_has_the_same_settings(fm, tmp_path):
    with services.connected(), get_client(sync_client=True) as prefect:
        prefect.create_work_pool(WorkPoolCreate(name="tessera-test", type="process"))
    done = subprocess.run([sys.executable, "-m", "deployments.deploy", "--pool", "tessera-test", "--name", "pool"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
                          env={**os.environ, "PREFECT_API_URL": os.environ["PREFECT_API_URL"]})
    assert done.returncode == 0, done.stdout + done.stderr
    with services.connected(), get_client(sync_client=True) as prefect:
        for flow in ("finetune", "sweep"):
            pooled = prefect.read_deployment_by_name(f"{flow}/pool")
            served = prefect.read_deployment_by_name(f"{flow}/default")
            assert pooled.work_pool_name == "tessera-test" and pooled.entrypoint == f"flows/{flow}.py:{flow}"
            assert pooled.parameter_openapi_schema == served.parameter_openapi_schema
            assert (pooled.tags, pooled.description) == (served.tags, served.description)
        assert prefect.read_deployment_by_name("finetune/pool").global_concurrency_limit.limit == 10
        # Training takes slots of one global limit, one per GPU; on a CPU machine TESSERA_DEVICE_SLOTS, default 10.
        assert prefect.read_global_concurrency_limit_by_name("tessera-devices").limit == 10
