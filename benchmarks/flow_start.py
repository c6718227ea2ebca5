"""How soon a run's flow starts: create() -> STARTED and -> COMPLETED through the embedded default, whose process work
pool and worker (`tessera worker`'s own code: deployments/worker.py) serve the flows as the team topology does.

    .venv/bin/python benchmarks/flow_start.py [--repeats 5]

The tiny model of startup.py, 2 steps, on embedded services in a temporary TESSERA_HOME, the worker asking for runs
every 2 s (PREFECT_WORKER_QUERY_SECONDS, as the services set it). Each run is timed from create() to its STARTED event
(the flow's first step begun) and to COMPLETED, one at a time. Issue 27 moved the embedded default from Prefect's
runner to the worker on the figures benchmarks/README.md keeps for both.
"""

import argparse
import statistics
import sys
import time

from rich.console import Console
from rich.table import Table
from sweep_overhead import tiny_services


def timed_runs(fm, recipe: dict, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from create() to STARTED and to COMPLETED of each run, after one untimed run (a fresh worker's first
    flow run pays once for what the rest share)."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tiny_services("tessera-flow-start-bench-") as (fm, recipe):
        started, completed = timed_runs(fm, recipe, args.repeats)
    table = Table("served by", "create -> STARTED (s)", "each", "create -> COMPLETED (s)", "each",
                  title=f"{args.repeats} runs of a tiny model, 2 steps, one at a time")
    table.add_row("the embedded default's worker (process work pool)", f"{statistics.median(started):.1f}",
                  ", ".join(f"{v:.1f}" for v in started), f"{statistics.median(completed):.1f}",
                  ", ".join(f"{v:.1f}" for v in completed))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
