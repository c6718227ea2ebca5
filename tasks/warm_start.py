"""Warm starts: one process imports Tessera's heavy stack (torch, DeepSpeed, transformers, peft, great-expectations)
once, then forks a child for each piece of a run that needs it (the training worker, tokenizing the data, logging
the model), so they start in milliseconds instead of paying seconds of CPU for the same imports every time.

    python -m tasks.warm_start --socket PATH

The process that starts flow runs keeps one beside it (`start_server()`: `tessera worker`, and the embedded
default's worker); its flow runs find it through TESSERA_WARM_START. The server never touches CUDA: a child forked
from a process that had initialised it could not use a GPU. Without a server, or when the request's environment
differs in a setting the stack read when it was imported, the work runs cold: a plain subprocess, or in the calling
process.
Multi-rank runs keep DeepSpeed's launcher.
"""

import argparse
import io
import os
import pickle
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

from setproctitle import setproctitle

ADDRESS = "TESSERA_WARM_START"  # the socket of this machine's server, set for the flow runs it serves
STARTUP_TIMEOUT_S = 120
PARENT_CHECK_S = 2.0  # how often the server looks whether the process that started it still lives
MAX_MESSAGE = 1 << 20  # a request (its environment, the call's arguments) or a result
# Settings the stack reads when it is imported: a request whose environment differs in one of them runs cold.
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "DS_", "OMP_", "MKL_", "PYTHONPATH")
PRELOAD = (
    "torch", "torch.distributed", "deepspeed", "transformers", "peft", "pandas", "great_expectations",
    "great_expectations.expectations", "matplotlib.pyplot", "mlflow.transformers",
    "prefect.engine", "prefect.flow_engine",  # for the flow runs themselves (tasks/flow_launcher.py)
)


class Refused(Exception):
    """The server would not start this work warm (its reason); the caller starts it cold."""


@dataclass
class WarmProcess:
    """A started child, read like subprocess.Popen: pid (its own process group), stdout, poll(), wait()."""
    pid: int
    connection: socket.socket
    stdout: io.TextIOWrapper | None = None
    returncode: int | None = None
    outcome: dict = field(default_factory=dict)  # the call's {"value"} or {"error"}, once sent

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self.connection.setblocking(False)
        try:
            self._receive(block=False)
        except BlockingIOError:
            pass
        finally:
            self.connection.setblocking(True)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            self._receive(block=True)
        return self.returncode

    def result(self):
        """The call's return value, or its exception raised here."""
        self.wait()
        if "error" in self.outcome:
            raise self.outcome["error"]
        if "value" not in self.outcome:
            raise ChildProcessError(f"warm-started process {self.pid} exited with code {self.returncode} "
                                    "before it returned")
        return self.outcome["value"]

    def _receive(self, block: bool) -> None:
        message = self.connection.recv(MAX_MESSAGE)
        if not message:  # the server went away (it left with its worker): the child runs on, its exit code lost
            if _ended(self.pid, block):
                self.returncode = -signal.SIGKILL
            return
        reply = pickle.loads(message)
        if "returncode" in reply:
            self.returncode = reply["returncode"]
            self.connection.close()
        else:
            self.outcome = reply


def _ended(pid: int, wait: bool) -> bool:
    """Whether the process has ended; `wait`: block until it has."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], None if wait else 0)[0])  # readable once it has ended
    finally:
        os.close(pidfd)


def start(target: str, args: tuple = (), kwargs: dict | None = None, *, title: str, stdout: int, stderr: int,
          env: dict[str, str] | None = None) -> WarmProcess:
    """Fork `target(*args, **kwargs)` ("package.module:function") from the warm server, in a session of its own, with
    `stdout`/`stderr` (file descriptors) as its own and `title` as its command line. Raises Refused when no server
    serves this process or it will not start this."""
    address = os.environ.get(ADDRESS)
    if not address:
        raise Refused(f"{ADDRESS} is not set: no warm-start server serves this process")
    # The call is pickled here and opened only in the child: the server never imports Tessera's own modules, so a
    # child always runs the code as it is on disk.
    request = dict(target=target, args=pickle.dumps((args, kwargs or {})), title=title, cwd=os.getcwd(),
                   env=dict(env or os.environ))
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(address)
        socket.send_fds(connection, [pickle.dumps(request)], [stdout, stderr])
        reply = pickle.loads(connection.recv(MAX_MESSAGE) or pickle.dumps({"refused": "the server closed"}))
    except OSError as e:
        connection.close()
        raise Refused(f"the warm-start server at {address} did not answer: {e}") from None
    if "refused" in reply:
        connection.close()
        raise Refused(reply["refused"])
    return WarmProcess(reply["pid"], connection)


def run(function: Callable | str, *args, **kwargs):
    """`function(*args, **kwargs)` in a warm child when a server serves this process (the stack's imports stay out
    of it), else here; its output goes where this process's goes. A function named "package.module:function" is
    imported only where it runs."""
    target = function if isinstance(function, str) else f"{function.__module__}:{function.__qualname__}"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        child = start(target, args, kwargs, title=f"{sys.executable} -m tasks.warm_start {target}", stdout=1, stderr=2)
    except Refused:
        if isinstance(function, str):
            module, name = function.split(":")
            function = getattr(import_module(module), name)
        return function(*args, **kwargs)
    return child.result()


def start_server() -> None:
    """Start a warm-start server beside this process, which leaves when this process does, and put its address in
    TESSERA_WARM_START for every process this one starts. It imports in the background; until it listens, work
    starts cold. Its output goes where this process's goes."""
    address = Path(tempfile.mkdtemp(prefix="tessera-warm-")) / "socket"  # 0700, and short: a socket path is <108 bytes
    # A session of its own: when this process's group is killed outright (`tessera server stop`), the server sees
    # its parent gone within PARENT_CHECK_S and leaves, removing its socket, instead of dying with it.
    subprocess.Popen([sys.executable, "-m", "tasks.warm_start", "--socket", str(address)], start_new_session=True)
    os.environ[ADDRESS] = str(address)


def differences(env: dict[str, str], imported_with: dict[str, str]) -> list[str]:
    """The import-time settings in which `env` differs from the environment the stack was imported with."""
    keys = {k for k in env.keys() | imported_with.keys() if k.startswith(READ_AT_IMPORT)}
    return sorted(k for k in keys if env.get(k) != imported_with.get(k))


def preload() -> None:
    """Import the stack, and check that nothing started CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # count GPUs without initialising CUDA
    os.environ.setdefault("MPLBACKEND", "Agg")
    for module in PRELOAD:
        import_module(module)
    import torch

    if torch.cuda.is_initialized():
        raise SystemExit("warm-start: CUDA was initialised while importing the stack; children could not use a GPU")


def serve(address: Path) -> None:
    """Fork a child for each request until SIGTERM or until the process that started this one ends; tell each client
    its child's pid, then its exit code."""
    imported_with, parent = dict(os.environ), os.getppid()
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    staging = address.with_name(address.name + ".new")
    staging.unlink(missing_ok=True)
    listener.bind(str(staging))
    os.chmod(staging, 0o600)  # requests run code as this user: only this user may make them
    listener.listen(64)
    staging.rename(address)  # clients see the address only once it answers
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while os.getppid() == parent:
            for key, _ in selector.select(timeout=PARENT_CHECK_S):
                if key.fileobj is listener:
                    _start_child(listener.accept()[0], selector, imported_with)
                else:
                    _report_exit(key, selector)
    finally:
        address.unlink(missing_ok=True)
        with suppress(OSError):
            address.parent.rmdir()


def _start_child(connection: socket.socket, selector: selectors.BaseSelector, imported_with: dict[str, str]) -> None:
    try:
        message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 2)
        request = pickle.loads(message)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        print(f"warm-start: a bad request: {e}", flush=True)
        connection.close()
        return
    if differing := differences(request["env"], imported_with):
        with suppress(OSError):
            connection.send(pickle.dumps({"refused": f"{', '.join(differing)} differ(s) from the server's"}))
        connection.close()
        for fd in fds:
            os.close(fd)
        return
    # The client hears the pid once the child leads its own session (so the pid is the group to signal), and the
    # child starts only after that: its first message on the connection must come after the pid.
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        here.close()
        keys = list(selector.get_map().values())  # the listener, and each running child's pidfd and connection
        inherited = [k.fd for k in keys] + [k.data[1].fileno() for k in keys if k.data] + [selector.fileno()]
        _child(request, fds, connection, there, inherited)
    there.close()
    for fd in fds:
        os.close(fd)
    selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, connection))
    here.recv(1)
    with suppress(OSError):  # a client gone already: the child runs on, reaped when it ends
        connection.send(pickle.dumps({"pid": pid}))
    with suppress(OSError):
        here.send(b"go")
    here.close()


def _report_exit(key: selectors.SelectorKey, selector: selectors.BaseSelector) -> None:
    pid, connection = key.data
    selector.unregister(key.fd)
    os.close(key.fd)
    status = os.waitpid(pid, 0)[1]
    with suppress(OSError):  # the client may be gone (its flow run was cancelled): nobody to tell
        connection.send(pickle.dumps({"returncode": os.waitstatus_to_exitcode(status)}))
    connection.close()


def _child(request: dict, fds: list[int], connection: socket.socket, server: socket.socket, server_fds: list[int],
           ) -> None:
    """In the forked child: become the request's process, run its call, send what it returned; never returns."""
    code, outcome = 1, {}
    try:
        for fd in server_fds:
            with suppress(OSError):
                os.close(fd)
        setproctitle(request["title"])  # `ps` and `pgrep` see the run it belongs to, as with a cold start
        os.setsid()  # a session of its own: cancel stops it and everything it starts with one signal
        server.send(b".")
        server.recv(2)  # the client knows the pid now
        server.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        module, function = request["target"].split(":")
        args, kwargs = pickle.loads(request["args"])
        value = getattr(import_module(module), function)(*args, **kwargs)
        outcome = {"value": value}
        code = value if isinstance(value, int) else 0
    except BaseException as e:  # SystemExit too: raised again in the caller, which says what went wrong
        outcome = {"error": e}
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            connection.send(pickle.dumps(outcome))
        except BaseException:  # the caller cannot hear what happened: leave the trace where it can be read
            traceback.print_exception(outcome.get("error") or sys.exception())
        os._exit(code)


def wait_until_listening(address: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Block until the server at `address` accepts requests (a caller that must start warm, e.g. a test)."""
    deadline = time.monotonic() + timeout_s
    while not address.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm-start server at {address} after {timeout_s}s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.warm_start", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="where to listen")
    serve(parser.parse_args().socket)


if __name__ == "__main__":
    main()
