"""The embedded services of two homes side by side on one machine: each talks only to its own."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import answers, worker_pids

from api import service as http_api
from deployments import services
from tasks.training.checkpoint_names import tag_step

pytestmark = pytest.mark.e2e


def tessera(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI as another user with TESSERA_HOME=home would run it: none of this session's service settings."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PREFECT_API_URL", "TESSERA_EMBEDDED", "TESSERA_PREFECT_PORT", "TESSERA_MLFLOW_PORT",
                          "TESSERA_SERVE_PORT", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**clean, "COLUMNS": "250", "TESSERA_HOME": str(home),
                                                              "PREFECT_HOME": str(home / "prefect"), **env})


def test_a_second_home_never_uses_the_first_homes_services(fm, tmp_path):
    ours = {"prefect": services.PREFECT.port, "mlflow": services.MLFLOW.port,  # this session's home: the first
            "http": http_api.HTTP_API.port}
    deadline = time.monotonic() + 60  # its MLflow UI and HTTP API hold their ports once they answer
    while not (services._answers(services.mlflow_ui_url()) and answers(http_api.url())):
        assert time.monotonic() < deadline, "this home's MLflow UI or HTTP API does not answer"
        time.sleep(1)
    theirs = tmp_path / "second-home"
    (theirs / "services").mkdir(parents=True)
    # The second home last ran on the ports the first holds now (as two users on the default 4200 and 5000 would).
    (theirs / "services" / "prefect-server.port").write_text(str(ours["prefect"]))
    (theirs / "services" / "mlflow-ui.port").write_text(str(ours["mlflow"]))
    (theirs / "services" / "http-api.port").write_text(str(ours["http"]))
    try:
        started = tessera(theirs, "server", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        taken = {name: int((theirs / "services" / f"{file}.port").read_text())
                 for name, file in (("prefect", "prefect-server"), ("mlflow", "mlflow-ui"), ("http", "http-api"))}
        assert all(taken[name] != ours[name] for name in ours), (taken, ours)
        their_url = f"http://127.0.0.1:{taken['prefect']}/api"
        assert services._prefect_home_at(their_url) == str(theirs / "prefect")
        assert services._prefect_home_at(services.prefect_api_url()) == str(Path(os.environ["TESSERA_HOME"]) / "prefect")
        assert services._pool_of(f"{their_url}/deployments/name/finetune/default") == services.LOCAL_POOL  # its own
        status = " ".join(tessera(theirs, "server", "status").stdout.split())
        assert all(f"127.0.0.1:{port}" in status for port in taken.values()), status

        # A port the user chose that another home's server holds: refused, saying whose it is and what to set.
        third = tmp_path / "third-home"
        refused = tessera(third, "server", "start", TESSERA_PREFECT_PORT=str(ours["prefect"]))
        said = " ".join(refused.stdout.split())
        assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr, said + refused.stderr
        assert (f"error: port {ours['prefect']} (TESSERA_PREFECT_PORT) is taken by the Prefect server of PREFECT_HOME "
                f"{Path(os.environ['TESSERA_HOME']) / 'prefect'}: set TESSERA_PREFECT_PORT to a free port") in said
        assert not (third / "services" / "prefect-server.pid").exists()
    finally:
        stopped = tessera(theirs, "server", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert services._prefect_home_at(services.prefect_api_url())  # the first home's services run on


@pytest.mark.slow
def test_a_run_carries_on_from_its_checkpoint_when_the_worker_dies_or_the_services_stop(fm, tiny_model_dir, chat_file):
    """The worker SIGKILLed on its own, then every service stopped: each time nothing of the run is left running,
    the next API call brings the services back, and the run resumes from its latest checkpoint (RESUMED), never
    cancelled, and completes."""
    run = fm.create(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test",
                    training_duration="60ba", context_length=64,
                    overrides={"training_config.save_steps": 10, "training_config.global_batch_size": 2,
                               "training_config.micro_batch_size": 2})
    checkpoints = Path(os.environ["TESSERA_HOME"]) / "runs" / run.name / "checkpoints"
    resumed_at: list[str] = []  # the checkpoint of each resume
    for stop in ("the worker killed", "the services stopped"):
        first = _latest_checkpoint(checkpoints, after=resumed_at[-1] if resumed_at else None)
        worker = services.WORKER.pid()
        if stop == "the worker killed":
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 10  # the flow and its training follow the worker within a second or two
            while (worker_pids(run.name) or _group_alive(worker)) and time.monotonic() < deadline:
                time.sleep(0.2)
        else:
            services.stop()
        assert not worker_pids(run.name) and not _group_alive(worker), f"{stop}: a process of the run is left"
        assert fm.get(run.name).status != fm.RunStatus.STOPPED  # the first API call starts the services again
        resumed = _wait_for_event(fm, run.name, "RESUMED", len(resumed_at) + 1)
        assert resumed.message.startswith("resumed after the services stopped under it: training continues from "
                                          "checkpoint ep"), resumed.message
        assert tag_step(resumed.payload["checkpoint"]) >= tag_step(first)
        resumed_at.append(resumed.payload["checkpoint"])
    events = list(fm.get_events(run, follow=True))
    types = [e.type for e in events]
    assert types[-1] == "COMPLETED" and "CANCELED" not in types and types.count("RESUMED") == 2, types


def _latest_checkpoint(folder: Path, after: str | None, timeout: float = 240) -> str:
    """The run's latest checkpoint once it has one (past `after`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link = folder / "latest-sharded-rank0.symlink"
        if link.is_symlink() and (tag := os.readlink(link)) != after:
            return tag
        time.sleep(0.2)
    raise AssertionError(f"no new checkpoint in {folder} for {timeout}s")


def _wait_for_event(fm, name: str, kind: str, count: int, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in fm.get_events(name) if e.type == kind]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(1)
    raise AssertionError(f"{name} had no {kind} event #{count} after {timeout}s: {_story(fm, name)}")


def _story(fm, name: str) -> str:
    """What a run went through, for a failure's message: its events, its flow run's states, the worker's log."""
    from tasks.prefect_api import prefect_client

    run = fm.get(name)
    with prefect_client() as prefect:
        states = [f"{s.timestamp:%H:%M:%S.%f} {s.name}: {s.message}" for s in prefect.read_flow_run_states(run.flow_run_id)]
    events = [f"{e.time:%H:%M:%S.%f} {e.type}: {e.message}" for e in fm.get_events(name)]
    worker_log = services.WORKER.log.read_text()[-4000:] if services.WORKER.log.exists() else ""
    return "\n".join(["events:", *events, "states:", *states, "worker log:", worker_log])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
