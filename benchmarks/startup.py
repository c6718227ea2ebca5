"""What one small run costs before and around its training: create() -> first step, and the machine's CPU seconds.

    .venv/bin/python benchmarks/startup.py [--repeats 5]

A tiny model (2 layers, 64 wide, SmolLM2's tokenizer) trained for 2 steps on 24 conversations, through warm embedded
services in a temporary TESSERA_HOME: what a sweep trial or a test pays per run. For each run, the seconds from
create() to its first TRAIN_UPDATED event, and the CPU seconds the whole machine spent from create() to COMPLETED
(/proc/stat: the flow process, the training worker and the services' own work; run it on an idle machine). Targets
(issue 26): a median of at most 6 s to the first step and 8 CPU seconds per run. And the same CPU by process
(process_cpu.py: per-process times from /proc, which other load on the machine leaves alone), to see where it goes.

And what a run loses when the services stop under it: a longer run, checkpointing every 10 steps, has its services
stopped once it has a checkpoint; timed from the next API call (which starts them again) to its RESUMED event.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from process_cpu import snapshot, spent
from sweep_overhead import first_step_s, tiny_services


def machine_cpu_s() -> float:
    """CPU seconds every process of this machine has spent so far (all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def resume_s(fm, recipe: dict) -> float:
    """Seconds from the first API call after the services stopped under a run to the run's RESUMED event."""
    from deployments import services
    from tasks.run_record import RunRecord
    from tasks.training.checkpoint_names import LATEST

    longer = {**recipe, "training_config": {**recipe["training_config"], "save_steps": 10,
                                            "trainer": {"max_steps": 60}}}
    run = fm.create(recipe=longer)
    while not ((record := RunRecord.load(run.name)) and (record.checkpoints / LATEST).is_symlink()):
        time.sleep(0.2)
    services.stop()
    back = time.monotonic()
    fm.get(run.name)  # starts the services again; the worker takes the interrupted run up
    while not any(e.type == "RESUMED" for e in fm.get_events(run)):
        time.sleep(0.5)
    took = time.monotonic() - back
    events = list(fm.get_events(run, follow=True))
    assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resumes", type=int, default=5, help="runs whose services stop under them (0: none)")
    args = parser.parse_args()
    first_step, cpu, parts = [], [], []
    with tiny_services("tessera-startup-bench-") as (fm, recipe):
        list(fm.get_events(fm.create(recipe=recipe), follow=True))  # warm: a fresh worker's first run pays once
        time.sleep(5)  # the services settle after it
        for _ in range(args.repeats):
            before, by_process = machine_cpu_s(), snapshot()
            run = fm.create(recipe=recipe)
            events = list(fm.get_events(run, follow=True))
            cpu.append(machine_cpu_s() - before)
            time.sleep(1)  # the flow process reaped, before its CPU is read from the worker's
            parts.append(spent(by_process, snapshot()))
            assert events[-1].type == "COMPLETED", [(e.type, e.message) for e in events]
            first_step.append(first_step_s(events, run.created_at))
            time.sleep(5)
        resumed = [resume_s(fm, recipe) for _ in range(args.resumes)] or [float("nan")]
    table = Table("per run", "median", "each", "target", title=f"{args.repeats} runs of a tiny model, 2 steps")
    for label, values, target in (("create -> first step (s)", first_step, "<= 6"),
                                  ("machine CPU, create -> COMPLETED (s)", cpu, "<= 8"),
                                  ("services stopped: next call -> RESUMED (s)", resumed, "")):
        table.add_row(label, f"{statistics.median(values):.1f}", ", ".join(f"{v:.1f}" for v in values), target)
    Console().print(table)
    Console().print(breakdown(parts))
    return 0


def breakdown(parts: list[dict[str, float]]) -> Table:
    table = Table("process", "CPU s, median", "each", title="CPU seconds per run, create -> COMPLETED, by process")
    for part in parts[0]:
        values = [p[part] for p in parts]
        table.add_row(part, f"{statistics.median(values):.2f}", ", ".join(f"{v:.2f}" for v in values))
    return table


if __name__ == "__main__":
    raise SystemExit(main())
