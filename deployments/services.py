"""The embedded default: a local Prefect server, a worker of a process work pool on it serving the deployments (as a
team's `tessera worker` serves theirs: deployments/serve.py) and the MLflow UI; beside them, services of the layers
above that ask for it (Tessera's HTTP API: api/service.py), stopped with them.

Started once, detached, with pidfiles under TESSERA_HOME/services, the way `ray.init()` starts a local
cluster. With PREFECT_API_URL set, Tessera uses that server and whoever serves its deployments instead.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deployments import interrupted
from tasks import routing, tracking
from tasks.devices import gpu_count
from tasks.errors import ServiceError
from tasks.home import tessera_home
from tasks.ports import free_port
from tasks.process_group import stop_group

# A global concurrency limit of one slot: create() counts the active runs and submits one while holding it, so the
# active-run limit holds for every client of the server, on any machine.
CREATE_LOCK = "tessera-create"
LOCAL_POOL = "tessera"  # the embedded default's process work pool: `tessera worker` joins it by default
STARTUP_TIMEOUT_S = 120


def max_active_runs() -> int:
    """Runs that may be active at once (TESSERA_MAX_ACTIVE_RUNS, default the anchor's 10): create() refuses one
    more, and the deployment queues runs past it (AwaitingConcurrencySlot)."""
    return int(os.environ.get("TESSERA_MAX_ACTIVE_RUNS", "10"))


def device_slots() -> int:
    """Slots of the global concurrency limit that training takes, one per process: one per GPU on this machine, or
    TESSERA_DEVICE_SLOTS (on a CPU machine, default max_active_runs())."""
    if "TESSERA_DEVICE_SLOTS" in os.environ:
        return int(os.environ["TESSERA_DEVICE_SLOTS"])
    return gpu_count() or max_active_runs()


@dataclass(frozen=True)
class Service:
    name: str
    port_env: str | None = None
    default_port: int | None = None

    @property
    def port(self) -> int:
        """Its variable's port; else the one this home took when another's service held the default; else the
        default."""
        if self.port_env in os.environ:
            return int(os.environ[self.port_env])
        return int(self.portfile.read_text()) if self.portfile.exists() else self.default_port

    @property
    def portfile(self) -> Path:
        return services_dir() / f"{self.name}.port"

    def take_free_port(self, holder: str) -> None:
        """Move to a free port, kept in the home for next time; refused when the user chose the port."""
        if self.port_env in os.environ:
            raise ServiceError(f"port {self.port} ({self.port_env}) is taken by {holder}: set {self.port_env} to a "
                               "free port, or unset it and Tessera takes one")
        self.portfile.write_text(str(free_port()))

    @property
    def pidfile(self) -> Path:
        return services_dir() / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return services_dir() / f"{self.name}.log"

    def recorded_pid(self) -> int | None:
        """The pid its pidfile holds, whether or not that process still lives."""
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def pid(self) -> int | None:
        """The service's pid while its process lives."""
        try:
            pid = int(self.pidfile.read_text())
            try:  # started by this process (tests, a long-lived notebook): reap it, or its zombie would look alive
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return None
            except ChildProcessError:  # not our child: signal 0 tells whether it lives
                pass
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None


PREFECT = Service("prefect-server", "TESSERA_PREFECT_PORT", 4200)
WORKER = Service("worker")
MLFLOW = Service("mlflow-ui", "TESSERA_MLFLOW_PORT", 5000)


def services_dir() -> Path:
    path = tessera_home() / "services"
    path.mkdir(exist_ok=True)
    return path


def embedded() -> bool:
    """True when Tessera runs its own Prefect server (no PREFECT_API_URL from the user)."""
    return not os.environ.get("PREFECT_API_URL") or os.environ.get("TESSERA_EMBEDDED") == "1"


def prefect_api_url() -> str:
    if not embedded():
        return os.environ["PREFECT_API_URL"]
    return f"http://127.0.0.1:{PREFECT.port}/api"


def prefect_ui_url() -> str:
    return prefect_api_url().removesuffix("/api")


def mlflow_ui_url() -> str | None:
    return f"http://127.0.0.1:{MLFLOW.port}" if tracking.embedded() else None


@contextmanager
def connected():
    """Ensure the services run, then talk to them: Prefect reads its settings at import, so set them here."""
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import PrefectHTTPStatusError

    url = ensure_started()
    try:
        with _settings_for(url):
            yield url
    except PrefectHTTPStatusError as e:  # a shared server with PREFECT_SERVER_API_AUTH_STRING (or a proxy before it)
        if e.response.status_code not in (401, 403):
            raise
        raise ServiceError(f"the Prefect server at {url} refused this client's credentials "
                           f"({e.response.status_code}): set PREFECT_API_AUTH_STRING to the server's auth "
                           "string") from None
    except MlflowException as e:  # a shared MLflow server with its basic-auth app; its refusals may come as text
        if tracking.refused(e):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise ServiceError(f"the MLflow server at {tracking.tracking_uri()} refused {who!r} (403): {e.message}; "
                               "the experiment's or model's owner, or an MLflow admin, can grant access") from None
        if "error code 401" in e.message:
            raise ServiceError(f"the MLflow server at {tracking.tracking_uri()} refused this client's credentials"
                               " (401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        raise


_SERVING: dict[tuple[str, str], int | None] = {}  # (API URL, PREFECT_HOME) -> the pid of the server found serving it
_SETTINGS: dict[tuple[int, str], tuple] = {}  # (id of the settings in force, API URL) -> (those, a copy at the URL)


@contextmanager
def _settings_for(url: str):
    """Prefect's settings in force, pointed at `url`. Built once per process and URL: building them (Prefect's
    temporary_settings) reads every setting again and cost ~90 ms of CPU, most of an fm.get() that polls each second."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL

    context = prefect.context.get_settings_context()
    if context.settings.api.url == url:
        yield
        return
    key = (id(context.settings), url)  # the cached pair holds the settings, so their id is not reused
    if key not in _SETTINGS:
        _SETTINGS[key] = (context.settings, context.settings.copy_with_update(updates={PREFECT_API_URL: url}))
    with prefect.context.SettingsContext(profile=context.profile, settings=_SETTINGS[key][1]):
        yield


def ensure_started() -> str:
    """Start whatever of the embedded services is not running; return the Prefect API URL."""
    if not embedded():
        return prefect_api_url()
    url = prefect_api_url()
    env = _service_env(url)
    with _start_lock():
        ours = str(tessera_home() / "prefect")
        # Asked once per server process: its settings page costs the server ~12 ms, and every call of the API asks.
        server = PREFECT.pid()
        there = ours if server is not None and _SERVING.get((url, ours)) == server else _prefect_home_at(url)
        if there != ours:  # none, or another home's (another user's runs, environment and credentials): not reused
            if there is not None or _port_taken(PREFECT.port):
                PREFECT.take_free_port(f"the Prefect server of PREFECT_HOME {there}" if there else "another program")
                url, env = prefect_api_url(), _service_env(prefect_api_url())
            _spawn(PREFECT, [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(PREFECT.port), "--analytics-off"], env)
            _wait_for(lambda: _prefect_home_at(url) == ours, PREFECT, "the Prefect server")
        _SERVING[(url, ours)] = PREFECT.pid()
        if WORKER.pid() is None:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                interrupted.recover(WORKER.recorded_pid())  # runs the last worker left behind carry on
            _spawn(WORKER, [sys.executable, "-m", "deployments.serve"], env)
            served = (routing.RUN, routing.SWEEP, routing.RETRAIN)
            _wait_for(lambda: all(_pool_of(f"{url}/deployments/name/{d}") == LOCAL_POOL for d in served), WORKER,
                      f"the worker of pool {LOCAL_POOL} serving {', '.join(served)}")
        if mlflow_ui_url() and MLFLOW.pid() is None:
            if _port_taken(MLFLOW.port):
                MLFLOW.take_free_port("another program (this home's MLflow UI is not running)")
            tracking.client().search_experiments(max_results=1)  # create the tables first: the UI would race create()
            # Without MLflow's job runner: its 9 processes serve GenAI features Tessera does not use, and cost ~40 s
            # of CPU and ~1 GiB at every start.
            _spawn(MLFLOW, [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                            "--port", str(MLFLOW.port), "--backend-store-uri", tracking.tracking_uri(),
                            "--default-artifact-root", tracking.default_artifact_root(), "--workers", "1"],
                   {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env})
    os.environ["PREFECT_API_URL"] = url
    os.environ["TESSERA_EMBEDDED"] = "1"
    return url


def ensure_running(service: Service, command: Callable[[int], list[str]]) -> None:
    """Start a service of a layer above (the HTTP API) beside the embedded ones, unless it runs: `command` given its
    port. Not waited for: nothing here needs it."""
    url = ensure_started()
    if not embedded():
        return
    with _start_lock():
        if service.pid() is None:
            if _port_taken(service.port):
                service.take_free_port(f"another program (this home's {service.name} is not running)")
            _spawn(service, command(service.port), _service_env(url))


@contextmanager
def _start_lock():
    """Held while services start: many create() calls at once start one set of services."""
    with open(services_dir() / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stop() -> list[str]:
    """Stop the embedded services; names what was stopped. Runs in progress stop with the worker, uncancelled:
    they carry on from their latest checkpoint when the services start again (deployments/interrupted.py)."""
    stopped = []
    if WORKER.pid() is not None:
        interrupted.kill_leftovers(WORKER.pid())
        stopped.append(WORKER.name)
    WORKER.pidfile.unlink(missing_ok=True)
    # The layers' above first (the HTTP API), known by their pidfiles: they talk to the others.
    above = [Service(f.stem) for f in sorted(services_dir().glob("*.pid")) if f.stem not in {WORKER.name, MLFLOW.name,
                                                                                             PREFECT.name}]
    for service in (*above, MLFLOW, PREFECT):
        pid = service.pid()
        if pid is not None and stop_group(pid):  # each service leads a process group of its own (_spawn)
            stopped.append(service.name)
        service.pidfile.unlink(missing_ok=True)
    return stopped


def status(above: dict[Service, str] | None = None) -> dict[str, str]:
    """Each embedded service, and those `above` given with their addresses: 'running (pid N) at URL' or 'stopped'."""
    urls = {PREFECT: prefect_ui_url(), WORKER: f"pool {LOCAL_POOL}", MLFLOW: mlflow_ui_url() or "-", **(above or {})}
    return {s.name: f"running (pid {s.pid()}) at {url}" if s.pid() else "stopped" for s, url in urls.items()}


def _service_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(tessera_home() / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Events are stored within half a second of arriving (Prefect's default, 5 s, is for heavy event traffic).
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        # The worker asks for runs every 2 s (Prefect's default, 10 s, is for many workers on a shared server).
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        "TESSERA_HOME": str(tessera_home()),
        "TESSERA_EMBEDDED": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda"),
    })
    return env


def _has_cuda() -> bool:
    return Path("/dev/nvidia0").exists()


def _spawn(service: Service, cmd: list[str], env: dict[str, str]) -> None:
    with open(service.log, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=tessera_home())
    service.pidfile.write_text(str(proc.pid))


def _wait_for(ready, service: Service, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if service.pid() is None:
            break
        time.sleep(0.5)
    tail = service.log.read_text(errors="replace")[-2000:] if service.log.exists() else ""
    raise ServiceError(f"{what} did not start (log: {service.log}):\n{tail}")


def _prefect_home_at(url: str) -> str | None:
    """The PREFECT_HOME of the Prefect server answering at `url` (the API URL): whose it is. None when nothing
    answers there, "" when something does that is not a Prefect server."""
    try:
        with urllib.request.urlopen(f"{url}/admin/settings", timeout=2) as response:
            return json.load(response).get("home") or ""
    except (urllib.error.HTTPError, ValueError):
        return ""
    except OSError:
        return None


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(url: str) -> bool:
    """Whether a GET of `url` answers 200: the server is healthy, the deployment registered."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _pool_of(deployment_url: str) -> str | None:
    """The work pool of the deployment at `deployment_url` (its API URL), None when none or no such deployment."""
    try:
        with urllib.request.urlopen(deployment_url, timeout=2) as response:
            return json.load(response).get("work_pool_name")
    except (OSError, ValueError):
        return None
