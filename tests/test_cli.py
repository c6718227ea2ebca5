"""The `tessera` command: same API, readable output, and errors without tracebacks."""

import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from flows.foundation_model import _parse_time, get_models
from tasks.errors import InvalidInputError


def tessera(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps table cells to the terminal width
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120, env=env)


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
