"""Stopping a process and everything it started: processes Tessera starts get a session (process group) of their
own, so one signal reaches DeepSpeed's launcher and every rank, or a service and its workers."""

import os
import signal
import time


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
