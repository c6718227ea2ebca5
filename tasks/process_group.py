"""Stopping a process and everything it started: processes Tessera starts get a session (process group) of their
own, so one signal reaches DeepSpeed's launcher and every rank, or a service and its workers."""

import os
import select
import signal
import threading
import time
from collections.abc import Callable

from tasks.flow_launcher import LAUNCHER


def stop_group(pgid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM the group, SIGKILL whatever is left after `grace_s`; False when it was already gone."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while _alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.1)
    return True


def kill_group(pgid: int, wait_s: float = 10.0) -> bool:
    """SIGKILL the group (no handler runs: a worker would cancel its runs on SIGTERM) and wait until it is gone, at
    most `wait_s` (0: not at all); False when it was already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait_s
    while wait_s and _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _alive(pgid: int) -> bool:
    try:  # the leader may be our own child (a service started by this process): reap it, or its zombie lingers
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def exit_with_parent(cleanup: Callable[[], None]) -> None:
    """End this process as soon as its parent ends (the worker, killed), `cleanup` first, leaving its flow run's
    state as it is: nothing of a run outlives the worker that ran it, and the services resume it when they start
    again. A flow run forked from the warm-start server has the launcher the worker started for parent
    (tasks/flow_launcher.py). `cleanup` must not wait: the flow goes on meanwhile."""
    try:
        parent = os.pidfd_open(int(os.environ.get(LAUNCHER) or os.getppid()))
    except ProcessLookupError:  # gone already
        parent = None

    def watch() -> None:
        if parent is not None:
            select.select([parent], [], [])  # readable once the process has ended
        # This process's output was read by the worker, now gone: a write there would fail, and Prefect's console
        # logging turns a broken pipe into SystemExit, which would report the flow run crashed instead of leaving
        # it running for the services to resume.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        cleanup()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
