"""A flow run's process, forked from the warm-start server instead of importing Prefect, MLflow and Tessera's flows
afresh (~2 CPU-s a run): the work pool's job command (deployments/deploy.py).

    python -m tasks.flow_launcher

The worker starts this small process as it would start `python -m prefect.engine`, and sees it as the flow run's
process: it asks the worker's warm-start server to run Prefect's engine in a child with this process's environment
and output, passes on SIGTERM and SIGINT (a cancel), and exits as the child did, so the worker reads the same exit
status. When this process dies, or the worker does, the flow in the child ends itself (tasks/process_group.py
exit_with_parent watches LAUNCHER). Without a server, or when it refuses, this process becomes the engine itself.
"""

import os
import runpy
import select
import signal
import sys
import threading

from tasks import warm_start

LAUNCHER = "TESSERA_FLOW_LAUNCHER"  # in the child's environment: the pid of the process the worker started
ENGINE = "prefect.engine"


def engine() -> None:
    """In the warm child: Prefect's engine, as `python -m prefect.engine` runs it, with this environment's settings."""
    import prefect.context

    prefect.context.refresh_global_settings_context()  # the server imported Prefect with the worker's environment
    sys.argv = [sys.argv[0]]  # the flow run's id comes from PREFECT__FLOW_RUN_ID
    runpy.run_module(ENGINE, run_name="__main__", alter_sys=True)


def _exit_with_worker(worker: int) -> None:
    """The worker killed on its own: leave the moment it ends, so that the flow in the child ends itself before it
    writes to the output the worker no longer reads."""
    select.select([worker], [], [])  # readable once the process has ended
    os._exit(1)


def main() -> None:
    # Titled as Prefect's engine takes its flow run's id on the command line: `ps` tells each run's engine apart.
    title = f"{sys.executable} -m {ENGINE} {os.environ.get('PREFECT__FLOW_RUN_ID', '')}".rstrip()
    try:
        child = warm_start.start(f"{__spec__.name}:engine", title=title, stdout=1, stderr=2,
                                 env={**os.environ, LAUNCHER: str(os.getpid())})
    except warm_start.Refused:
        os.execv(sys.executable, [sys.executable, "-m", ENGINE])
    for relayed in (signal.SIGTERM, signal.SIGINT):
        signal.signal(relayed, lambda signum, _: os.kill(child.pid, signum))
    try:
        worker = os.pidfd_open(os.getppid())
    except ProcessLookupError:  # gone already
        os._exit(1)
    threading.Thread(target=_exit_with_worker, args=(worker,), daemon=True).start()
    code = child.wait()
    if code < 0:  # killed by a signal: die of the same one, as the engine would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
