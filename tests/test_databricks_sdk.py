"""The databricks-genai SDK (1.1.8, its own pins in its own virtual environment) against `tessera serve`: a Databricks
user's code, unchanged, creates, follows, lists, continues and cancels runs, and is refused as it would be there."""

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tasks.home import volumes_root
from conftest import CHAT, KEYS

pytestmark = pytest.mark.e2e

USER = "ada@example.com"
KEY = KEYS[USER]


@pytest.fixture(scope="module")
def sdk_python() -> str:
    """The virtual environment with databricks-genai 1.1.8 and its pins (mlflow 2.20, databricks-sdk 0.42) that
    `make test-all` builds once (the Makefile's .venv-sdk)."""
    python = Path(__file__).parents[1] / ".venv-sdk" / "bin" / "python"
    assert python.is_file(), f"{python} is missing: run `make .venv-sdk/.installed` (make test-all builds it)"
    return str(python)


def sdk(python: str, url: str, code: str, token: str = KEY) -> dict:
    """Run `code` with the SDK as `fm` against the server; what it put in `out`."""
    from deployments import services

    result = Path(os.environ["TESSERA_HOME"]) / f"sdk-{time.monotonic_ns()}.json"
    script = "import json, time\nfrom databricks.model_training import foundation_model as fm\nout = {}\n" + \
        textwrap.dedent(code) + f"\nopen({str(result)!r}, 'w').write(json.dumps(out, default=str))\n"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DATABRICKS_HOST": url,
           "DATABRICKS_TOKEN": token, "MLFLOW_TRACKING_URI": services.mlflow_ui_url()}
    done = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result.read_text())


def test_a_databricks_notebook_runs_unchanged_against_tessera(sdk_python, http_api, fm, tiny_model_dir):
    raw = Path(volumes_root(), "main", "sdk", "raw")
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (raw / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT[:6]))
    model, train = str(tiny_model_dir), "dbfs:/Volumes/main/sdk/raw/train.jsonl"

    out = sdk(sdk_python, http_api, f"""
        from datetime import datetime, timedelta, timezone
        out["models"] = [m.name for m in fm.get_models()]
        run = fm.create(model={model!r}, train_data_path={train!r}, register_to="main.sdk",
                        eval_data_path="dbfs:/Volumes/main/sdk/raw/eval.jsonl", eval_prompts=["Hi"],
                        training_duration="6ba", learning_rate=1e-3, context_length=64)  # validate_inputs=True
        out["created"] = [run.name, run.created_by, run.experiment_id, run.run_id, run.status.value]
        out["events"] = [e.type for e in fm.get_events(run, follow=True)]
        run = fm.get(run.name)
        out["run"] = [run.status.value, run.register_to, run.submitted_config.train_data_path,
                      run.submitted_config.eval_prompts, run.submitted_config.training_duration]
        now = datetime.now(timezone.utc)
        out["listed"] = {{
            "names": [r.name for r in fm.list([run.name])],
            "completed": [r.name for r in fm.list(statuses=["COMPLETED"], user_emails=[{USER!r}])],
            "running": [r.name for r in fm.list(statuses=["RUNNING"])],
            "window": [r.name for r in fm.list(after=now - timedelta(hours=1), before=now + timedelta(hours=1))],
            "earlier": [r.name for r in fm.list(before=now - timedelta(hours=1))],
        }}
        out["checkpoints"] = fm.get_checkpoints(run)

        # Continued training from the checkpoint path the SDK returned, without the SDK's checks: Tessera's own run.
        again = fm.create(model={model!r}, train_data_path={train!r}, register_to="main.sdk", context_length=64,
                          custom_weights_path=out["checkpoints"][-1], training_duration="100000ba",
                          validate_inputs=False)
        while not any(e.type == "MODEL_INITIALIZED" for e in fm.get_events(again)):
            assert not fm.get(again).status.is_terminal(), fm.get_events(again)
            time.sleep(1)
        out["initialized"] = next(e.message for e in fm.get_events(again) if e.type == "MODEL_INITIALIZED")
        out["by_experiment"] = fm.cancel(experiment_id=fm.get(again).experiment_id)
        # The SDK's own checks of an experiment path and a checkpoint go to MLflow at the workspace address.
        latest = out["checkpoints"][-1].rsplit("/", 1)[0] + "/latest-sharded-rank0.symlink"
        # A run that would train for long: cancelled by name, it must be stopped, not have failed first. (At the
        # default context length the 24 conversations pack into 2 rows, fewer than a global batch: such a run
        # fails within seconds of starting, and a warm-started run can get there before the cancel does.)
        queued = fm.create(model={model!r}, train_data_path={train!r}, register_to="main.sdk",
                           experiment_path="/Users/{USER}/sdk-continued", custom_weights_path=latest,
                           context_length=64, training_duration="100000ba")
        got = fm.get(queued)
        out["queued"] = [got.name, got.submitted_experiment_path, got.submitted_config.custom_weights_path == latest]
        out["by_name"] = fm.cancel(queued.name)
        for stopped in (again, queued):
            while not fm.get(stopped).status.is_terminal():
                time.sleep(1)
        out["stopped"] = [fm.get(r).status.value for r in (again, queued)]
        out["stopped_events"] = fm.get_events(queued)[-1].type

        for name, call in {{
            "bad_learning_rate": lambda: fm.create(model={model!r}, train_data_path={train!r},
                                                   register_to="main.sdk", learning_rate=0.5),
            "bad_register_to": lambda: fm.create(model={model!r}, train_data_path={train!r}, register_to="main"),
            "bad_register_to_unchecked": lambda: fm.create(model={model!r}, train_data_path={train!r},
                                                           register_to="main", validate_inputs=False),
            "missing": lambda: fm.create(model={model!r}, train_data_path="dbfs:/Volumes/main/sdk/raw/no.jsonl",
                                         register_to="main.sdk"),
        }}.items():
            try:
                call()
            except Exception as e:
                out[name] = f"{{type(e).__name__}}: {{e}}"
    """)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out["models"]
    name, created_by, experiment_id, run_id, status = out["created"]
    assert created_by == USER and experiment_id and run_id and status in ("PENDING", "QUEUED", "STARTING", "RUNNING")
    assert out["events"][0] == "CREATED" and out["events"][-1] == "COMPLETED", out["events"]
    assert out["run"] == ["COMPLETED", "main.sdk", train, ["Hi"], "6ba"]
    listed = out["listed"]
    assert listed["names"] == [name] and name in listed["completed"] and name in listed["window"]
    assert name not in listed["running"] and name not in listed["earlier"]
    assert out["checkpoints"] and all(
        c.startswith(f"dbfs:/databricks/mlflow-tracking/{experiment_id}/{run_id}/artifacts/{name}/checkpoints/ep")
        for c in out["checkpoints"]), out["checkpoints"]
    assert out["initialized"].endswith(f"initialized with the weights of {out['checkpoints'][-1]}: 3M parameters")
    assert (out["by_experiment"], out["by_name"], out["stopped"]) == (1, 1, ["STOPPED", "STOPPED"])
    queued, experiment_path, same_weights = out["queued"]
    assert out["stopped_events"] == "CANCELED" and same_weights
    assert experiment_path == fm.get(queued).experiment_path == f"/Users/{USER}/sdk-continued"
    assert "MultiMAPIException: Error 400: learning_rate 0.5 must be at most 0.001" in out["bad_learning_rate"]
    assert out["bad_register_to"].startswith("ValidationError: register_to must be in the format catalog.schema")
    assert "Error 400: register_to 'main' is malformed" in out["bad_register_to_unchecked"]
    assert out["missing"].startswith("ValidationError: Failed to access Unity Catalog path "
                                     "dbfs:/Volumes/main/sdk/raw/no.jsonl"), out["missing"]
    assert fm.get(name).created_by == USER
    assert fm.get(name).experiment_path == f"/Users/{USER}/{name}"  # the SDK's /Users/<me>/{{}}


def test_a_wrong_or_missing_key_is_refused_as_the_sdk_reports_it(sdk_python, http_api):
    refusal = """
        try:
            fm.get_models()
        except Exception as e:
            out["refused"] = f"{type(e).__name__}: {e}"
    """
    assert sdk(sdk_python, http_api, refusal, token="not-a-key")["refused"] == (
        "MAPIException: Error UNAUTHENTICATED: the API key is not one of this server's (TESSERA_API_KEYS)")
    # No token at all: databricks-sdk itself refuses to build a client, before any request.
    assert sdk(sdk_python, http_api, refusal, token="")["refused"].startswith(
        "ValueError: default auth: cannot configure default credentials")
