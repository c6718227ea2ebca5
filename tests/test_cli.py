"""The `tessera` command: same API, readable output, and errors without tracebacks."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.client.schemas.actions import WorkPoolCreate

from client.runs import _parse_time
from deployments import services
from flows.foundation_model import get_models
from tasks.errors import InvalidInputError
from tasks.prefect_api import prefect_client


def tessera(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps table cells to the terminal width
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120, env=env)


def test_models_lists_the_catalog_and_what_can_run_here():
    done = tessera("models")
    assert done.returncode == 0, done.stderr
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in done.stdout and "yes" in done.stdout
    smol = next(m for m in get_models() if m.name == "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (smol.max_context_length, smol.available) == (8192, True)
    assert not next(m for m in get_models() if m.name == "meta-llama/Meta-Llama-3.1-8B").available


def test_bad_input_is_an_error_line_not_a_traceback(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    done = tessera("create", "acme/unknown", str(data), "main.demo")
    assert done.returncode == 2
    assert "error:" in done.stdout and "unknown model 'acme/unknown'" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_a_worker_serves_a_pool_of_the_local_server(fm):
    """`tessera worker` without PREFECT_API_URL joins the embedded default's server, as the services' own worker
    does: a pool it lacks is refused by name, and on one it has, the worker comes online."""
    done = tessera("worker", "--pool", "no-such-pool")
    assert done.returncode == 2 and "no work pool 'no-such-pool' on http://127.0.0.1:" in done.stdout, \
        done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    with services.connected(), prefect_client() as prefect:
        prefect.create_work_pool(WorkPoolCreate(name="cli-test", type="process"))
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--pool", "cli-test", "--name", "cli"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _online("cli-test", "cli"):
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not come online"
            time.sleep(1)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def _online(pool: str, name: str) -> bool:
    with services.connected(), prefect_client() as prefect:
        return any(w.name == name and w.status == "ONLINE" for w in prefect.read_workers_for_work_pool(pool))


@pytest.mark.parametrize("text, expected", [
    ("2026-11-24", datetime(2026, 11, 24, tzinfo=timezone.utc)),
    ("11-24-2026", datetime(2026, 11, 24, tzinfo=timezone.utc)),
    ("2026-11-24 13:05:09", datetime(2026, 11, 24, 13, 5, 9, tzinfo=timezone.utc)),
    ("11-24-2026 13:05:09", datetime(2026, 11, 24, 13, 5, 9, tzinfo=timezone.utc)),
])
def test_list_takes_the_anchors_date_formats(text, expected):
    assert _parse_time(text, "before") == expected


def test_a_bad_date_says_which_formats_work():
    with pytest.raises(InvalidInputError, match=r"before='24/11/2026' is not a date: use a datetime or 'YYYY-MM-DD'"):
        _parse_time("24/11/2026", "before")


# `tessera validate`, through the console script the package installs

TESSERA = Path(sys.executable).with_name("tessera")
CHAT = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(24)]
BAD_ROLE = {"messages": [{"role": "User", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.fixture(scope="module")
def validated(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """`tessera validate` on valid data, bad data and a missing path, run side by side: each takes seconds to start."""
    folder = tmp_path_factory.mktemp("validate")
    (folder / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (folder / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [CHAT[0], BAD_ROLE, *CHAT[1:]]))
    env = {**os.environ, "COLUMNS": "200", "TESSERA_CACHE": str(folder / "cache")}
    settings = ["--model", str(tiny_model_dir), "--context-length", "64", "--training-duration", "2ep"]
    started = {
        name: subprocess.Popen([TESSERA, "validate", str(folder / f"{name}.jsonl"), *settings], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("good", "bad", "missing")
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=180)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return folder, done


def test_validate_shows_the_token_counts_and_the_estimate(validated):
    folder, done = validated
    good = done["good"]
    assert good.returncode == 0, good.stdout + good.stderr
    out = good.stdout
    assert f"valid: {folder / 'good.jsonl'}: 24 valid CHAT_COMPLETION records" in out
    assert "tokens at context_length 64" in out
    counts = re.search(r"│ 24 +│ ([\d,]+) +│ ([\d,]+) +│ (\d+) / (\d+) / (\d+) / (\d+) +│ 0 +│ 0 +│", out)
    assert counts, out
    tokens, loss_tokens = (int(counts[i].replace(",", "")) for i in (1, 2))
    assert 0 < loss_tokens < tokens and 24 * int(counts[3]) <= tokens <= 24 * int(counts[6])
    rows = int(re.search(r"packed into (\d+) rows", out)[1])
    steps = rows // 8 * 2  # 2ep of whole global batches of 8 rows
    assert (f"estimate: 2ep is {steps} optimizer steps, {steps * 8 * 64:,} token positions ({tokens:,} data tokens "
            "per epoch)") in out
    assert "quality checks (great-expectations): passed" in out
    assert "Traceback" not in out + good.stderr


def test_validate_names_file_line_and_field_of_bad_data(validated):
    folder, done = validated
    bad = done["bad"]
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"not valid: {folder / 'bad.jsonl'}: 1 of 25 records are not valid CHAT_COMPLETION" in bad.stdout
    assert "bad.jsonl line 2, field messages[0].role: found 'User'; use lowercase 'user'" in bad.stdout
    assert "quality checks (great-expectations): failed" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_validate_of_a_missing_path_is_an_argument_error(validated):
    folder, done = validated
    missing = done["missing"]
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert f"error: data_path {folder / 'missing.jsonl'} does not exist: check the path" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr


def test_create_from_a_recipe_refuses_a_bad_key_before_any_run(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text((Path(__file__).parents[1] / "examples" / "recipes" / "full.yaml").read_text()
                   .replace("lr: 3.0e-4", "lr: 3.0e-2"))
    done = subprocess.run([str(Path(sys.executable).parent / "tessera"), "create", "--recipe", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{bad}: training_config.model.optim.lr 0.03 must be at most 0.001" in " ".join(done.stdout.split())


@pytest.mark.parametrize("setting, said", [
    ("training_config.trainer.max_step=40",
     "training_config.trainer.max_step is not a recipe key; the keys allowed under training_config.trainer are "
     "max_epochs, max_steps"),
    ("training_config.seed=1.5", "training_config.seed 1.5 must be a whole number"),
    ("training_config.model.optim.lr=5e-2", "training_config.model.optim.lr 0.05 must be at most"),  # YAML 1.2
    ("training_config.seed", "--set 'training_config.seed' is not PATH=VALUE"),
])
def test_create_sets_any_setting_by_its_path_and_refuses_a_wrong_one_before_any_run(setting, said, monkeypatch,
                                                                                       capsys):
    from cli import main as cli

    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "full.yaml"
    monkeypatch.setattr(sys, "argv", ["tessera", "create", "--recipe", str(recipe), "--set", setting])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    out = capsys.readouterr().out
    assert exit.value.code == 2 and said in " ".join(out.split()) and "Traceback" not in out
