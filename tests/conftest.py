"""Shared fixtures: an isolated Tessera home per session, a tiny model built locally, and an S3 store."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.ports import free_port

# Isolate every test session from the user's ~/.tessera and any running Prefect, before imports use them.
_SESSION_HOME = Path(os.environ.get("TESSERA_TEST_HOME", "/tmp/tessera-test")) / f"s{os.getpid()}"
_SESSION_HOME.mkdir(parents=True, exist_ok=True)
os.environ["TESSERA_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's default profile starts a temporary server for a client that has no API URL; what it is told is then lost
# with that server. A test that talks to Prefect outside the session's services fails instead.
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")  # the worker picks up a new run within a second
# Prefect's scheduler makes a new schedule's runs within seconds (its loop for recently changed deployments); its main
# loop, every 60 s by default, is the fallback when a busy server misses that: every 10 s, a schedule set a minute or
# two ahead (test_retraining.py) still gets its run in time.
os.environ.setdefault("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "10")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The users of the test session's HTTP API (the embedded `tessera serve`), each with their key: set before it starts.
KEYS = {user: f"{user.split('@')[0]}-key-0123456789abcdef" for user in
        ("grace@example.com", "alan@example.com", "ada@example.com", "alice@example.com", "bob@example.com")}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The team topology's module first, then the other end-to-end ones: each takes minutes on one xdist worker, so
    the many short modules fill in around them instead of one long module running alone at the end. xdist keeps
    this order with --no-loadscope-reorder (pyproject's addopts); by default it starts the modules with most tests."""
    items.sort(key=lambda item: (item.get_closest_marker("shared") is None, item.get_closest_marker("e2e") is None))
CHAT = [
    {"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                  {"role": "assistant", "content": f"Fact {i} is that Tessera fine-tunes models."}]}
    for i in range(24)
]
# CHAT's questions as preference pairs (OpenAI's format): the right fact preferred to not knowing it.
PAIRS = [{"input": {"messages": c["messages"][:1]}, "preferred_output": c["messages"][1:],
          "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]} for c in CHAT]


def worker_pids(run_name: str) -> list[str]:
    """The pids of the run's training worker processes (none once it has stopped)."""
    found = subprocess.run(["pgrep", "-f", f"tasks.training.worker --run-name {run_name}"], capture_output=True,
                           text=True)
    return found.stdout.split()


def wait_for(run, statuses=None, timeout: float = 240):
    """Refresh a run, sweep or retraining until its status is one of `statuses` (None: any terminal one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.refresh()
        if run.status in statuses if statuses else run.status.is_terminal():
            return run
        time.sleep(1)
    raise AssertionError(f"{run.name} stayed {run.status} for {timeout}s")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (converted from GGUF once per machine)."""
    from tasks.models import resolve_model

    return resolve_model(SMOLLM2)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template: trains in a second on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, target / name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    return target


@pytest.fixture(scope="session", autouse=True)
def _remove_session_home():
    """Runs leave GBs of checkpoints behind (SmolLM2: 1.6 GB each); a test session removes its own."""
    yield
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on loopback, one per session: real HTTP, no AWS account."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def aws_env(s3_endpoint: str, tmp_path_factory) -> dict[str, str | None]:
    """The standard AWS_* variables for the moto server (None: unset), with no profile, config file or instance
    metadata of this machine. `s3` sets them for one test; test_runs.py for the services it starts, whose runs
    read S3 in the runner's process."""
    none = tmp_path_factory.mktemp("no-aws")
    return {
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(none / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(none / "credentials"),
        "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None, "AWS_ENDPOINT_URL_S3": None, "AWS_REGION": None,
    }


def _set_env(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str | None]) -> None:
    for name, value in variables.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def s3(s3_endpoint: str, aws_env: dict[str, str | None], monkeypatch):
    """A boto3 S3 client on the moto server, and the variables of `aws_env` for this test only, so a test may
    change or remove them; the store is emptied afterwards."""
    import boto3

    _set_env(monkeypatch, aws_env)
    yield boto3.session.Session().client("s3")
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).close()


@pytest.fixture(scope="session")
def fm(aws_env, tmp_path_factory, tiny_model_dir):
    """The public API with the embedded services started on free ports, once per session; stopped afterwards.

    A run reads its data in the runner's process, with the environment the services started with, as a user's
    runs do: so S3 (the moto server), the volumes root and the tables root are set before they start; and the HTTP
    API serves KEYS' users, offers the tiny model's folder as a base model and takes uploads of up to 1 MiB."""
    os.environ["TESSERA_PREFECT_PORT"] = str(free_port())
    os.environ["TESSERA_MLFLOW_PORT"] = str(free_port())
    os.environ["TESSERA_SERVE_PORT"] = str(free_port())
    stores = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as env:
        _set_env(env, aws_env)
        env.setenv("TESSERA_VOLUMES_ROOT", str(stores / "volumes"))
        env.setenv("TESSERA_TABLES_ROOT", str(stores / "tables"))
        env.setenv("TESSERA_API_KEYS", ",".join(f"{user}:{key}" for user, key in KEYS.items()))
        env.setenv("TESSERA_MODELS_ROOT", str(tiny_model_dir.parent))
        env.setenv("TESSERA_MAX_UPLOAD_MB", "1")
        from api import service as http_api
        from deployments import services
        from flows import foundation_model

        http_api.ensure_serving()  # its keys are set above, before it starts
        yield foundation_model
        services.stop()


@pytest.fixture(scope="session")
def http_api(fm) -> str:
    """The address of the test session's HTTP API, once it answers."""
    from api import service as http_api

    url = http_api.url()
    deadline = time.monotonic() + 60
    while not answers(url):
        assert time.monotonic() < deadline, f"the embedded HTTP API at {url} does not answer"
        time.sleep(0.25)
    return url


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url`, whatever it says (the HTTP API asks for a key)."""
    return subprocess.run(["curl", "-s", "-o", "/dev/null", f"{url}/docs"]).returncode == 0


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> str:
    """24 short conversations, for runs of the tiny model."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    return str(path)


@contextmanager
def tessera_serve(log: Path | None = None, **env: str) -> Iterator[str]:
    """`tessera serve` as a user starts it, on a free port with `env` added (its output in `log`, if given); its URL
    once it answers, and stopped afterwards."""
    port = free_port()
    out = open(log, "wb") if log else None
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                               cwd=Path(__file__).parents[1], env={**os.environ, **env}, stdout=out,
                               stderr=subprocess.STDOUT if out else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while not answers(url):
            assert process.poll() is None and time.monotonic() < deadline, \
                log.read_text() if log else "tessera serve did not start"
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        if out:
            out.close()
