"""CPU seconds of the embedded services' processes, by part, from /proc: robust to other load on the machine, unlike
the machine's total. A process's figure is its own user+system time plus that of the children it has reaped, so a
part's figure is the sum over its living processes: a flow process that ended is counted in the worker that reaped
it, a warm-started child in the warm-start server.
"""

import os
from pathlib import Path

from deployments import services

TICK = os.sysconf("SC_CLK_TCK")
WARM_START = "tasks.warm_start"


def _processes() -> dict[int, tuple[int, float, float, str]]:
    """pid -> (parent pid, own CPU s, reaped children's CPU s, command line)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        found[int(stat.parent.name)] = (int(fields[1]), (utime + stime) / TICK, (cutime + cstime) / TICK, cmdline)
    return found


def _tree(processes: dict, root: int | None) -> set[int]:
    """`root` and its living descendants."""
    if root not in processes:
        return set()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, *_) in processes.items() if ppid == parent]
        tree.update(children)
        frontier += children
    return tree


def _total(processes: dict, pids: set[int]) -> float:
    return sum(processes[pid][1] + processes[pid][2] for pid in pids)


def snapshot() -> dict[str, float]:
    """Each part's CPU seconds so far."""
    processes = _processes()
    worker = services.WORKER.pid()
    warm = next((pid for pid, (ppid, *_, cmdline) in processes.items() if ppid == worker and WARM_START in cmdline),
                None)
    warm_tree = _tree(processes, warm)
    flows = _tree(processes, worker) - warm_tree - {worker}
    own, reaped = ({pid: p[i] for pid, p in processes.items()} for i in (1, 2))
    times = os.times()
    return {
        "Prefect server": _total(processes, _tree(processes, services.PREFECT.pid())),
        "MLflow server": _total(processes, _tree(processes, services.MLFLOW.pid())),
        "worker (its own)": own.get(worker, 0.0),
        "flow processes started by the worker, with their cold children": reaped.get(worker, 0.0) + _total(
            processes, flows),
        "warm-start server (its own)": own.get(warm, 0.0),
        "warm-started children (flow engines, tokenize, train, log model)": reaped.get(warm, 0.0) + _total(
            processes, warm_tree - {warm}),
        "client: create(), following events": times.user + times.system,
    }


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each part spent between two snapshots, and their sum."""
    parts = {part: after[part] - before[part] for part in after}
    return {**parts, "all these processes": sum(parts.values())}
