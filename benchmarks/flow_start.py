"""How soon a run's flow starts: create() -> STARTED through the embedded default's runner, against a process work
pool and `tessera worker` on the same local Prefect server (issue 27: one way to run a flow, if it measures as well).

    .venv/bin/python benchmarks/flow_start.py [--repeats 5]

The tiny model of startup.py, 2 steps, on embedded services in a temporary TESSERA_HOME. First the runner serves
the deployments; then the runner is stopped, the deployments are registered to a process work pool on the same
server (`python -m deployments.deploy`) and `tessera worker` takes the runs, as the team topology runs them, polling
the pool as often as the runner polls (PREFECT_RUNNER_POLL_FREQUENCY, 2 s). Each run is timed from create() to its
STARTED event (the flow's first step begun) and to COMPLETED, one at a time.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sweep_overhead import tiny_services

REPO = Path(__file__).resolve().parents[1]
POOL = "tessera-bench"


def timed_runs(fm, recipe: dict, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from create() to STARTED and to COMPLETED of each run, after one untimed run (a fresh runner's or
    worker's first flow run pays once for what the rest share)."""
    started, completed = [], []
    for i in range(repeats + 1):
        run = fm.create(recipe=recipe)
        events = list(fm.get_events(run, follow=True))
        assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
        if i:
            started.append(next((e.time - run.created_at).total_seconds() for e in events if e.type == "STARTED"))
            completed.append((events[-1].time - run.created_at).total_seconds())
        time.sleep(3)  # the services settle after each run
    return started, completed


def through_a_pool(fm, recipe: dict, repeats: int) -> tuple[list[float], list[float]]:
    """The same runs with the runner stopped and `tessera worker` taking them from a process work pool."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from deployments import services
    from tasks.prefect_api import prefect_client
    from tasks.process_group import stop_group

    url = services.prefect_api_url()
    stop_group(services.RUNNER.pid())
    services.RUNNER.pidfile.unlink(missing_ok=True)
    os.environ["PREFECT_API_URL"] = url  # the server is now a shared one's: no call starts a runner again
    with services.connected(), prefect_client() as prefect:
        prefect.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    deployed = subprocess.run([sys.executable, "-m", "deployments.deploy", "--pool", POOL], cwd=REPO,
                              capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with open(Path(os.environ["TESSERA_HOME"]) / "worker.log", "w") as log:
        # Polling the pool as often as the embedded runner polls its deployments (deployments/services.py).
        env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "2")}
        worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--pool", POOL], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return timed_runs(fm, recipe, repeats)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
            del os.environ["PREFECT_API_URL"]  # embedded again: the services are stopped as they were started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tiny_services("tessera-flow-start-bench-") as (fm, recipe):
        served = timed_runs(fm, recipe, args.repeats)
        pooled = through_a_pool(fm, recipe, args.repeats)
    table = Table("served by", "create -> STARTED (s)", "each", "create -> COMPLETED (s)", "each",
                  title=f"{args.repeats} runs of a tiny model, 2 steps, one at a time")
    for label, (started, completed) in (("the runner (embedded default)", served),
                                        ("tessera worker (process work pool)", pooled)):
        table.add_row(label, f"{statistics.median(started):.1f}", ", ".join(f"{v:.1f}" for v in started),
                      f"{statistics.median(completed):.1f}", ", ".join(f"{v:.1f}" for v in completed))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
