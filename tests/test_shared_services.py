"""The team topology of README "When one machine is not enough", built from scratch with its commands: PostgreSQL,
a Prefect server on it with its API auth string, an MLflow server on it with the basic-auth app and its artifacts in
S3 (the moto server), a `process` work pool and a worker. Clients set the two service addresses and their own
credentials, nothing else."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.events import EVENT_PREFIX
from tasks.ports import free_port
from tasks.training.checkpoint_names import complete_checkpoints
from conftest import CHAT

pytestmark = [pytest.mark.e2e, pytest.mark.shared]

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
# Debian's postgresql package (.ci/run installs it) keeps initdb and pg_ctl out of PATH, under its version's folder.
_INITDB = shutil.which("initdb") or max(map(str, Path("/usr/lib/postgresql").glob("*/bin/initdb")), default=None)
if _INITDB is None:
    pytest.skip("PostgreSQL is not installed: apt-get install postgresql, as .ci/run does", allow_module_level=True)
PG_BIN = Path(_INITDB).parent
PG_PASSWORD = "pg-secret-0123456789"
PREFECT_AUTH = "admin:prefect-secret-0123456789"
MLFLOW_ADMIN = ("admin", "mlflow-admin-secret-0123")
WORKER = ("tessera-worker", "worker-secret-0123456789")  # the training machines' MLflow account (an admin)
USERS = {"alice": "alice-secret-0123456789", "bob": "bob-secret-01234567890"}
SECRETS = [PG_PASSWORD, PREFECT_AUTH.split(":")[1], MLFLOW_ADMIN[1], WORKER[1], *USERS.values()]


def _wait_http(url: str, what: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> float:
    """Seconds until `url` answers (any HTTP status); fails with the log's tail if the process dies first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert process.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{what} did not answer {url} in {timeout}s: {log.read_text()[-3000:]}")


def _request(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> urllib.request.Request:
    """A JSON request, with HTTP basic auth when `auth` is given (Prefect's auth string and MLflow's both are)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + b64encode(":".join(auth).encode()).decode()
    return urllib.request.Request(url, data=data, headers=headers)


def _status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(_request(url, auth, data), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def _read(url: str, auth: tuple[str, str], data: bytes) -> str:
    with urllib.request.urlopen(_request(url, auth, data), timeout=30) as answer:
        return answer.read().decode()


class Machine:
    """Processes started with one environment, as one machine of the topology would run them; stopped at the end."""

    def __init__(self, root: Path, name: str, env: dict[str, str]):
        self.home, self.processes = root / name, []
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)  # a user may start several clients
        self.env = {"PATH": f"{BIN}:{PG_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ["HOME"],
                    "TMPDIR": str(self.home / "tmp"),
                    "PREFECT_HOME": str(self.home / "prefect"), "TESSERA_HOME": str(self.home / "tessera"),
                    "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    def start(self, name: str, *command: str) -> tuple[subprocess.Popen, Path]:
        log = self.home / f"{name}.log"
        process = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process, log

    def start_worker(self, *command: str) -> float:
        """Start `command`, a Prefect worker; seconds until it says it started."""
        started = time.monotonic()
        worker, log = self.start("worker", *command)
        while "started!" not in log.read_text():
            assert worker.poll() is None and time.monotonic() - started < 120, log.read_text()[-3000:]
            time.sleep(0.2)
        return time.monotonic() - started

    def python(self, code: str, timeout: float = 900) -> dict:
        """Run `code` with `fm` imported, here; what it put in `out`."""
        result = self.home / f"out-{time.monotonic_ns()}.json"
        script = "import json, time\nfrom flows import foundation_model as fm\nout = {}\n" + textwrap.dedent(code) + \
            f"\nopen({str(result)!r}, 'w').write(json.dumps(out, default=str))\n"
        self.run(sys.executable, "-c", script, timeout=timeout)
        return json.loads(result.read_text())

    def stop(self) -> None:
        _stop([self])


def _stop(machines: list[Machine], grace_s: float = 10) -> None:
    """SIGTERM every process of `machines` (and its children) at once; SIGKILL what is left after `grace_s`."""
    processes = [process for machine in machines for process in machine.processes]
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def topology(s3_endpoint, aws_env, tmp_path_factory):
    """Every machine of the README's topology on loopback, with their start-up times."""
    root, times, machines = tmp_path_factory.mktemp("topology"), {}, []
    aws = {k: v for k, v in aws_env.items() if v is not None}
    import boto3

    # The MLflow server's artifact store for the whole module (the `s3` fixture would empty it after one test).
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket="tessera")

    # The database machine: a private cluster (the README's is Debian's `postgresql` service), owned by the
    # `postgres` user when this runs as root, as PostgreSQL refuses to run as root.
    pg_root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(pg_root, "postgres")
    (pg_root / "password").write_text(PG_PASSWORD)
    pg_port, started = free_port(), time.monotonic()
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    try:
        db = Machine(root, "db", {"PGPASSWORD": PG_PASSWORD})
        db.run(*as_postgres, "initdb", "-D", str(pg_root / "data"), "-U", "tessera", "-A", "scram-sha-256",
               "-E", "UTF8", "--locale=C", f"--pwfile={pg_root / 'password'}")
        db.run(*as_postgres, "pg_ctl", "-D", str(pg_root / "data"), "-l", str(pg_root / "log"), "-w", "start",
               "-o", f"-p {pg_port} -k {pg_root} -c listen_addresses=127.0.0.1")
        for database in ("prefect", "mlflow", "mlflow_auth", "optuna"):
            db.run("createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "tessera", database)
        times["postgresql"] = time.monotonic() - started
        postgres = f"tessera:{PG_PASSWORD}@127.0.0.1:{pg_port}"

        server = Machine(root, "prefect-server", {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres}/prefect",
            "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH})
        machines.append(server)
        process, log = server.start("server", "prefect", "server", "start", "--host", "0.0.0.0",
                                    "--port", str(prefect_port))
        times["prefect"] = _wait_http(f"{prefect_url}/health", "the Prefect server", process, log)

        auth_ini = root / "mlflow-auth.ini"
        auth_ini.write_text(textwrap.dedent(f"""\
            [mlflow]
            default_permission = NO_PERMISSIONS
            database_uri = postgresql://{postgres}/mlflow_auth
            admin_username = {MLFLOW_ADMIN[0]}
            admin_password = {MLFLOW_ADMIN[1]}
            authorization_function = mlflow.server.auth:authenticate_request_basic_auth
            """))
        tracking = Machine(root, "mlflow-server", {
            **aws, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-0123456",
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        machines.append(tracking)
        process, log = tracking.start("server", "mlflow", "server", "--app-name", "basic-auth",
                                      "--backend-store-uri", f"postgresql://{postgres}/mlflow",
                                      "--artifacts-destination", "s3://tessera/mlflow",
                                      "--host", "0.0.0.0", "--port", str(mlflow_port), "--workers", "1")
        times["mlflow"] = _wait_http(f"{mlflow_url}/health", "the MLflow server", process, log)
        # Once, from the admin's machine: the work pool, and Tessera's deployments on it.
        admin = Machine(root, "admin", {"PREFECT_API_URL": prefect_url, "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
                                        "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0],
                                        "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN[1]})
        started = time.monotonic()
        admin.run("prefect", "work-pool", "create", "tessera", "--type", "process")
        admin.run(sys.executable, "-m", "deployments.deploy", "--pool", "tessera")
        times["pool and deployments"] = time.monotonic() - started
        # MLflow's accounts: the workers' (an admin: it writes every user's runs and models) and each user's.
        admin.run(sys.executable, "-c", textwrap.dedent(f"""
            import os
            from mlflow.server import get_app_client
            auth = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
            for user, password in {[WORKER, *USERS.items()]!r}:
                auth.create_user(user, password)
            auth.update_user_admin({WORKER[0]!r}, True)
            """))

        # Each training machine: a worker taking the runs that fit its GPUs (on this CPU machine: processes), with
        # its own MLflow account, the sweeps' studies in the shared database; the S3 variables for the data it reads.
        trainers, optuna_storage = {}, f"postgresql+psycopg://{postgres}/optuna"
        for gpus in (1, 2):
            trainer = Machine(root, f"trainer-{gpus}", {
                **aws, "PREFECT_API_URL": prefect_url, "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
                "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": WORKER[0],
                "MLFLOW_TRACKING_PASSWORD": WORKER[1], "TESSERA_SWEEP_STORAGE": optuna_storage,
                "PREFECT_WORKER_QUERY_SECONDS": "1"})
            machines.append(trainer)
            times[f"worker ({gpus} GPUs)"] = trainer.start_worker(
                "tessera", "worker", "--pool", "tessera", "--gpus", str(gpus), "--name", f"trainer-{gpus}")
            trainers[gpus] = trainer

        def client(user: str | None) -> Machine:
            env = {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url, **aws}
            if user:
                env |= {"PREFECT_API_AUTH_STRING": PREFECT_AUTH, "MLFLOW_TRACKING_USERNAME": user,
                        "MLFLOW_TRACKING_PASSWORD": USERS[user], "TESSERA_USER": user}
            return Machine(root, f"client-{user or 'anonymous'}", env)

        print("start-up times (s):", {k: round(v, 1) for k, v in times.items()})
        yield dict(prefect=prefect_url, mlflow=mlflow_url, client=client, trainers=trainers, times=times, root=root,
                   ports=(prefect_port, mlflow_port), machines=machines, optuna=optuna_storage, s3=s3)
    finally:
        _stop(machines)
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(pg_root / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(pg_root, ignore_errors=True)


def test_nobody_reaches_the_shared_services_without_credentials(topology):
    prefect, mlflow = topology["prefect"], topology["mlflow"]
    assert _status(f"{prefect}/flow_runs/filter", data=b"{}") == 401
    assert _status(f"{prefect}/flow_runs/filter", ("admin", "wrong"), b"{}") == 401
    assert _status(f"{prefect}/flow_runs/filter", tuple(PREFECT_AUTH.split(":")), b"{}") == 200
    assert _status(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", ("alice", "wrong")) == 401

    anonymous = topology["client"](None)
    out = anonymous.python("""
        try:
            fm.list()
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    """)
    assert out["error"].startswith("ServiceError") and "PREFECT_API_AUTH_STRING" in out["error"], out
    # Every call that reaches Prefect, from a user with MLflow's credentials but not Prefect's: refused, and told what
    # to set (create() met the 401 taking the create lock, and said to redeploy); a refused sweep or retraining
    # leaves no MLflow run showing RUNNING.
    alice = topology["client"]("alice").env
    without = Machine(topology["root"], "client-alice-without-prefect-auth", {
        k: v for k, v in alice.items() if k.startswith(("AWS_", "MLFLOW_", "TESSERA_USER")) or k == "PREFECT_API_URL"})
    out = without.python("""
        from mlflow import MlflowClient
        model, data = "HuggingFaceTB/SmolLM2-135M-Instruct", {"train_data_path": "/data/train.jsonl",
                                                              "eval_data_path": "/data/eval.jsonl"}
        calls = {
            "create": lambda: fm.create(model, register_to="main.alice", validate_inputs=False, **data),
            "sweep": lambda: fm.sweep({"learning_rate": [1e-4, 1e-3]}, model=model, register_to="main.alice",
                                      validate_inputs=False, **data),
            "schedule_retraining": lambda: fm.schedule_retraining("main.alice.m", cron="0 3 * * *", model=model,
                                                                  validate_inputs=False, **data),
            "retrain_now": lambda: fm.retrain_now("main.alice.m", model=model, validate_inputs=False, **data),
            "cancel": lambda: fm.cancel("some-run"),
            "cancel an experiment": lambda: fm.cancel(experiment_id="1"),
            "get_events": lambda: fm.get_events("some-run"),
            "list_retrainings": fm.list_retrainings,
        }
        for name, call in calls.items():
            try:
                call()
                out[name] = "no error"
            except Exception as e:
                out[name] = f"{type(e).__name__}: {e}"
        experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
        out["running"] = [r.info.run_name for r in MlflowClient().search_runs(experiments, "attributes.status = "
                                                                              "'RUNNING'")] if experiments else []
    """)
    running = out.pop("running")
    for call, error in out.items():
        assert error.startswith("ServiceError") and "refused this client's credentials (401)" in error and \
            "PREFECT_API_AUTH_STRING" in error, f"{call}: {error}"
    assert running == [], running
    done = subprocess.run(["tessera", "worker", "--pool", "tessera"], capture_output=True, text=True, timeout=120,
                          env=anonymous.env, cwd=REPO)
    assert done.returncode == 2 and "PREFECT_API_AUTH_STRING" in done.stdout, done.stdout + done.stderr


def test_a_client_with_two_addresses_trains_registers_and_cancels_through_the_work_pool(topology, tiny_model_dir):
    s3 = topology["s3"]
    s3.put_object(Bucket="tessera", Key="data/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in CHAT).encode())
    model, train = str(tiny_model_dir), "s3://tessera/data/train.jsonl"
    alice = topology["client"]("alice").python(f"""
        import mlflow
        started = time.monotonic()
        run = fm.create(model={model!r}, train_data_path={train!r}, register_to="main.team", training_duration="6ba",
                        context_length=64, learning_rate=1e-3)
        out["events"] = [(e.type, time.monotonic() - started) for e in fm.get_events(run, follow=True)]
        got = fm.get(run)
        out["run"] = [got.name, got.status.value, got.created_by, got.experiment_path]
        out["listed"] = [r.name for r in fm.list()]
        out["checkpoints"] = fm.get_checkpoints(run)
        version = mlflow.MlflowClient().get_model_version_by_alias(f"main.team.{{run.name}}", "candidate")
        out["registered"] = [version.version, version.source]

        # Continued from the checkpoint URI get_checkpoints() gave, on 2 processes: only the 2-GPU worker takes it.
        again = fm.create(model={model!r}, train_data_path={train!r}, register_to="main.team", context_length=64,
                          custom_weights_path=out["checkpoints"][-1], training_duration="100000ba",
                          overrides={{"training_config.deepspeed.processes": 2}})
        out["again"] = again.name
        while not any(e.type == "MODEL_INITIALIZED" for e in fm.get_events(again)):
            assert not fm.get(again).status.is_terminal(), fm.get_events(again)
            time.sleep(1)
        out["initialized"] = next(e.message for e in fm.get_events(again) if e.type == "MODEL_INITIALIZED")
        out["cancelled"] = fm.cancel(again)
        while not fm.get(again).status.is_terminal():
            time.sleep(1)
        out["stopped"] = [fm.get(again).status.value, fm.get_events(again)[-1].type]
    """)
    name, status, created_by, experiment_path = alice["run"]
    assert (status, created_by) == ("COMPLETED", "alice") and experiment_path.startswith("/Users/alice/")
    types = [t for t, _ in alice["events"]]
    assert types[0] == "CREATED" and types[-1] == "COMPLETED" and "TRAIN_UPDATED" in types, types
    first_step = next(s for t, s in alice["events"] if t == "TRAIN_UPDATED")
    print(f"create -> first step through the work pool: {first_step:.1f} s;",
          [(t, round(s)) for t, s in alice["events"]])
    assert name in alice["listed"]
    assert alice["checkpoints"] and all(c.startswith("mlflow-artifacts:/") for c in alice["checkpoints"])
    assert alice["initialized"].endswith(f"initialized with the weights of {alice['checkpoints'][-1]}: 3M parameters")
    assert alice["stopped"] == ["STOPPED", "CANCELED"] and alice["cancelled"] == 1
    trainers = topology["trainers"]
    assert (Path(trainers[2].env["TESSERA_HOME"]) / "runs" / alice["again"]).is_dir()
    assert not (Path(trainers[1].env["TESSERA_HOME"]) / "runs" / alice["again"]).exists()
    # Checkpoints and the registered model are objects in S3, through MLflow's artifact proxy.
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="tessera", Prefix="mlflow/")
            for o in page.get("Contents", [])]
    assert any(f"/{name}/checkpoints/ep2-ba6/" in k for k in keys), keys[:20]
    assert any(k.endswith("/model/model.safetensors") and "/models/" in k for k in keys), keys[:20]

    bob = topology["client"]("bob").python(f"""
        import mlflow
        out["listed"] = [r.name for r in fm.list()]
        for what, call in {{"checkpoints": lambda: fm.get_checkpoints({name!r}),
                           "model": lambda: mlflow.MlflowClient().get_registered_model("main.team.{name}")}}.items():
            try:
                call()
            except Exception as e:
                out[what] = f"{{type(e).__name__}}: {{e}}"
    """)
    assert name in bob["listed"]  # one Prefect server, one credential: every user sees the runs (see the README)
    assert bob["checkpoints"].startswith("ServiceError: the MLflow server") and "'bob' (403)" in bob["checkpoints"], bob
    assert "403" in bob["model"], bob  # MLflow's own client, as bob uses it

    # No secret in a flow run's parameters, an event, or a log of the training machine.
    auth = tuple(PREFECT_AUTH.split(":"))
    shown = [_read(f"{topology['prefect']}/flow_runs/filter", auth, b"{}"),
             _read(f"{topology['prefect']}/events/filter", auth,  # Tessera's events: fewer than a page of 50
                   json.dumps({"filter": {"resource": {"id_prefix": [EVENT_PREFIX]}}, "limit": 50}).encode())]
    shown += [p.read_text(errors="replace") for t in topology["trainers"].values() for p in t.home.rglob("*.log")]
    assert name in shown[0] and 10 < json.loads(shown[1])["total"] < 50, shown[1][:300]
    assert not [s for s in SECRETS if any(s in text for text in shown)]



def test_a_sweep_runs_its_trials_on_the_workers_and_keeps_its_study_in_the_shared_database(topology, tiny_model_dir):
    root = topology["root"]
    train, held_out = root / "sweep-train.jsonl", root / "sweep-eval.jsonl"
    for path in (train, held_out):
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    out = topology["client"]("alice").python(f"""
        sweep = fm.sweep(space={{"learning_rate": [1e-3, 1e-5]}}, strategy="grid", max_trials=2, max_parallel=2,
                         prune=False, model={str(tiny_model_dir)!r}, train_data_path={str(train)!r},
                         eval_data_path={str(held_out)!r}, register_to="main.team", training_duration="4ba",
                         context_length=64)
        while not fm.get_sweep(sweep.name).status.is_terminal():
            time.sleep(1)
        sweep = fm.get_sweep(sweep.name)
        out.update(name=sweep.name, status=[sweep.status.value, sweep.details], best=sweep.best.name,
                   trials=[(t.name, t.learning_rate, t.status.value) for t in sweep.trials])
        import mlflow  # registered by a worker, granted to alice, whose sweep it is
        out["registered"] = mlflow.MlflowClient().get_model_version_by_alias(f"main.team.{{out['best']}}",
                                                                             "challenger").version
    """)
    assert out["status"][0] == "COMPLETED", out
    assert [(lr, status) for _, lr, status in out["trials"]] == [(1e-3, "COMPLETED"), (1e-5, "COMPLETED")], out
    assert out["best"] == out["trials"][0][0]  # read from MLflow: the client has no access to the study's database
    assert out["registered"] == "1"
    import optuna

    study = optuna.load_study(study_name=out["name"], storage=topology["optuna"])
    assert [t.user_attrs["run"] for t in study.trials] == [name for name, _, _ in out["trials"]]
    homes = [Path(t.env["TESSERA_HOME"]) / "runs" for t in topology["trainers"].values()]
    assert all(any((home / name).is_dir() for home in homes) for name, _, _ in out["trials"])


def test_a_retraining_runs_on_the_workers_and_only_its_owner_adds_versions_to_the_model(topology, tiny_model_dir):
    root, model = topology["root"], str(tiny_model_dir)
    incoming, held_out = root / "incoming", root / "retrain-eval.jsonl"
    incoming.mkdir()
    for path in (incoming / "day-1.jsonl", held_out):
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    # A model nobody has registered yet: the shared server refuses alice's account to read it, as it would refuse
    # another user's model, and scheduling it must still work.
    alice = topology["client"]("alice").python(f"""
        import mlflow
        fm.schedule_retraining("main.team.assistant", {str(incoming)!r}, {str(held_out)!r}, cron="0 3 * * *",
                               model={model!r}, training_duration="4ba", context_length=64)
        fm.pause_retraining("main.team.assistant")
        retraining = fm.retrain_now("main.team.assistant")
        while not retraining.refresh().status.is_terminal():
            time.sleep(1)
        out["retraining"] = [retraining.status.value, retraining.outcome, retraining.challenger, retraining.details]
        out["events"] = [e.type for e in retraining.get_events()]
        out["champion"] = mlflow.MlflowClient().get_model_version_by_alias("main.team.assistant", "champion").version
    """)
    status, outcome, challenger, details = alice["retraining"]
    assert (status, outcome) == ("COMPLETED", "promoted"), alice
    assert alice["events"][-1] == "COMPLETED" and "RETRAIN_PROMOTED" in alice["events"], alice["events"]
    assert alice["champion"] == "1"  # registered by a worker's account, readable by alice, whose model it is
    homes = [Path(t.env["TESSERA_HOME"]) / "runs" for t in topology["trainers"].values()]
    assert any((home / challenger).is_dir() for home in homes)
    # The registered model the worker loaded from the MLflow server to judge it: not left in its temporary folder.
    assert not [p for t in topology["trainers"].values() for p in Path(t.env["TMPDIR"]).rglob("*.safetensors")]

    # Bob may not add a version to alice's model through a worker's account: refused before anything trains.
    bob = topology["client"]("bob").python(f"""
        run = fm.create(model={model!r}, train_data_path={str(incoming / "day-1.jsonl")!r},
                        register_to="main.team.assistant", training_duration="4ba", context_length=64)
        while not fm.get(run).status.is_terminal():
            time.sleep(1)
        got = fm.get(run)
        out.update(status=got.status.value, details=got.details, events=[e.type for e in fm.get_events(run)])
    """)
    assert bob["status"] == "FAILED" and "TRAIN_UPDATED" not in bob["events"], bob
    assert "register_to main.team.assistant" in bob["details"] and "bob may not add versions" in bob["details"]


# Two test hosts on this machine: network namespaces, each with a veth pair into a bridge on which this machine (the
# servers) is BRIDGE. They share this machine's filesystem, as training machines share one over NFS.
HOSTS = {"host-a": "10.77.0.1", "host-b": "10.77.0.2"}
BRIDGE, BRIDGE_ADDR = "tsr-br", "10.77.0.254"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


def _remove_test_hosts() -> None:
    for host in HOSTS:
        subprocess.run(["ip", "netns", "del", host], capture_output=True)  # takes its end of the pair along
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@contextmanager
def _test_hosts() -> Iterator[None]:
    """Make the hosts (after removing any an interrupted run left); remove them and their links at the end."""
    _remove_test_hosts()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host, addr in HOSTS.items():
            outside, inside = f"{host}-0", f"{host}-1"  # the pair's ends: on the bridge, in the host
            _ip("netns", "add", host)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host)
            _ip("link", "set", outside, "master", BRIDGE)
            _ip("link", "set", outside, "up")
            _ip("-n", host, "addr", "add", f"{addr}/24", "dev", inside)
            _ip("-n", host, "link", "set", inside, "up")
            _ip("-n", host, "link", "set", "lo", "up")
        yield
    finally:
        _remove_test_hosts()


def _processes(host: str, run: str, ranks_only: bool = False) -> list[int]:
    """The processes of `run` in `host`'s network namespace: DeepSpeed's launchers and the ranks, or the ranks."""
    found = []
    for pid in subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        launcher = any(c.startswith("deepspeed.launcher") for c in command)
        if run in command and "tasks.training.worker" in command and _alive(int(pid)) and not (ranks_only and launcher):
            found.append(int(pid))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_one_run_trains_over_two_machines_and_survives_losing_one(topology, tiny_model_dir):
    for trainer in topology["trainers"].values():  # from here on the training machines are the two test hosts
        trainer.stop()
    root, (prefect_port, mlflow_port) = topology["root"], topology["ports"]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    with _test_hosts():
        nodes = {}
        for host, addr in HOSTS.items():
            node = Machine(root, host, {
                "PREFECT_API_URL": f"http://{BRIDGE_ADDR}:{prefect_port}/api", "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
                "MLFLOW_TRACKING_URI": f"http://{BRIDGE_ADDR}:{mlflow_port}", "MLFLOW_TRACKING_USERNAME": WORKER[0],
                "MLFLOW_TRACKING_PASSWORD": WORKER[1], "PREFECT_WORKER_QUERY_SECONDS": "1",
                "GLOO_SOCKET_IFNAME": f"{host}-1"})
            topology["machines"].append(node)
            node.start_worker("ip", "netns", "exec", host, "tessera", "worker", "--pool", "tessera", "--gpus", "2",
                              "--name", host, "--addr", addr)
            nodes[host] = node
        try:
            # The same global batch (8 rows, 4 per micro batch) over 2 ranks: on one machine, then on two. A
            # checkpoint every 2 steps, only the newest kept: the MLflow proxy uploads what is kept, ~40 MB each.
            alice, settings = topology["client"]("alice"), dict(
                model=str(tiny_model_dir), train_data_path=str(data), register_to="main.team",
                training_duration="16ba", context_length=64, learning_rate=1e-3)
            one = alice.python(f"""
                saves = {{"training_config.save_steps": 2, "training_config.save_top_k": 1}}
                run = fm.create(**{settings!r}, overrides={{**saves, "training_config.deepspeed.processes": 2}})
                out["status"] = [e.type for e in fm.get_events(run, follow=True)][-1]
                out["name"] = run.name
                run = fm.create(**{settings!r}, overrides={{**saves, "training_config.deepspeed.processes": 1,
                                                            "training_config.deepspeed.nodes": 2}})
                out["two"] = run.name
            """)
            assert one["status"] == "COMPLETED", one

            # The other machine's rank killed after the first checkpoint: the head's rank does not wait for it, and
            # the train task's retry starts both machines again from that checkpoint.
            name, started = one["two"], time.monotonic()
            while True:
                assert time.monotonic() - started < 300, "no checkpoint with ranks on both hosts in 300 s"
                heads = [h for h in HOSTS if (root / h / "tessera" / "runs" / name).is_dir()]
                ranks = {h: _processes(h, name, ranks_only=True) for h in HOSTS}
                if heads and all(ranks.values()) and \
                        complete_checkpoints(root / heads[0] / "tessera" / "runs" / name / "checkpoints"):
                    break
                time.sleep(0.2)
            head, other = heads[0], next(h for h in HOSTS if h != heads[0])
            os.kill(ranks[other][0], signal.SIGKILL)
            started = time.monotonic()
            while any(_alive(pid) for pid in ranks[head]):
                assert time.monotonic() - started < 60, f"{head}'s rank still runs 60 s after {other}'s was killed"
                time.sleep(0.2)
            print(f"{head}'s rank ended {time.monotonic() - started:.1f} s after {other}'s was killed")

            out = alice.python(f"""
                import mlflow
                for key, name in (("one", {one["name"]!r}), ("two", {name!r})):
                    events, run_id = list(fm.get_events(name, follow=True)), fm.get(name).run_id
                    history = {{metric: sorted(mlflow.MlflowClient().get_metric_history(run_id, metric),
                                               key=lambda m: (m.step, m.timestamp))
                               for metric in ("loss", "tokens_per_s")}}
                    out[key] = dict(status=fm.get(name).status.value, events=[(e.type, e.message) for e in events],
                                    **{{metric: {{m.step: m.value for m in values}}  # a step trained again: its last
                                       for metric, values in history.items()}})
            """)
            one, two = out["one"], out["two"]
            assert (one["status"], two["status"]) == ("COMPLETED", "COMPLETED"), out
            assert any(m.startswith("resumed from ep") for _, m in two["events"]), two["events"]
            assert sorted(one["loss"], key=int) == sorted(two["loss"], key=int) == [str(s) for s in range(1, 17)], out
            assert all(abs(one["loss"][step] - two["loss"][step]) < 1e-5 for step in one["loss"]), out
            print("losses, one node / two nodes:", one["loss"], two["loss"])
            print("seconds per step, one node / two nodes:", _step_seconds(one["tokens_per_s"]),
                  _step_seconds(two["tokens_per_s"]))
            started = time.monotonic()  # and nothing of the run is left on either host
            while any(_processes(h, name) for h in HOSTS):
                assert time.monotonic() - started < 60, {h: _processes(h, name) for h in HOSTS}
                time.sleep(0.5)
        finally:
            for node in nodes.values():
                node.stop()


def _step_seconds(tokens_per_s: dict[str, float], tokens_per_step: int = 8 * 64) -> float:
    """A run's median seconds per optimizer step (8 rows of 64 tokens), from its tokens_per_s metric."""
    speeds = sorted(tokens_per_s.values())
    return round(tokens_per_step / speeds[len(speeds) // 2], 3)
