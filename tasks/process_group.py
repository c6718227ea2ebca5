"""Stopping a process and everything it started: processes Tessera starts get a session (process group) of their
own, so one signal reaches DeepSpeed's launcher and every rank, or a service and its workers."""

import os
import signal
import threading
import time
from collections.abc import Callable


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


def kill_group(pgid: int, wait_s: float = 10.0) -> None:
    """SIGKILL the group (no handler runs: a worker would cancel its runs on SIGTERM) and wait until it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


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


def exit_with_parent(cleanup: Callable[[], None], poll_s: float = 1.0) -> None:
    """End this process within `poll_s` of its parent (the worker, killed), `cleanup` first, leaving its flow run's
    state as it is: nothing of a run outlives the worker that ran it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        cleanup()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
