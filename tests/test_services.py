"""The embedded services of two homes side by side on one machine: each talks only to its own."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import services

pytestmark = pytest.mark.e2e


def tessera(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI as another user with TESSERA_HOME=home would run it: none of this session's service settings."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PREFECT_API_URL", "TESSERA_EMBEDDED", "TESSERA_PREFECT_PORT", "TESSERA_MLFLOW_PORT",
                          "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**clean, "COLUMNS": "250", "TESSERA_HOME": str(home),
                                                              "PREFECT_HOME": str(home / "prefect"), **env})


def test_a_second_home_never_uses_the_first_homes_services(fm, tmp_path):
    ours = {"prefect": services.PREFECT.port, "mlflow": services.MLFLOW.port}  # this session's home: the first
    deadline = time.monotonic() + 60  # its MLflow UI holds its port once it answers
    while not services._answers(services.mlflow_ui_url()) and time.monotonic() < deadline:
        time.sleep(1)
    theirs = tmp_path / "second-home"
    (theirs / "services").mkdir(parents=True)
    # The second home last ran on the ports the first holds now (as two users on the default 4200 and 5000 would).
    (theirs / "services" / "prefect-server.port").write_text(str(ours["prefect"]))
    (theirs / "services" / "mlflow-ui.port").write_text(str(ours["mlflow"]))
    try:
        started = tessera(theirs, "server", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        taken = {name: int((theirs / "services" / f"{file}.port").read_text())
                 for name, file in (("prefect", "prefect-server"), ("mlflow", "mlflow-ui"))}
        assert taken["prefect"] != ours["prefect"] and taken["mlflow"] != ours["mlflow"]
        their_url = f"http://127.0.0.1:{taken['prefect']}/api"
        assert services._prefect_home_at(their_url) == str(theirs / "prefect")
        assert services._prefect_home_at(services.prefect_api_url()) == str(Path(os.environ["TESSERA_HOME"]) / "prefect")
        assert services._answers(f"{their_url}/deployments/name/finetune/default")  # its runner serves its server
        status = " ".join(tessera(theirs, "server", "status").stdout.split())
        assert f"127.0.0.1:{taken['prefect']}" in status and f"127.0.0.1:{taken['mlflow']}" in status, status

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
