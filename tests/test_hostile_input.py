"""Hostile input: every argument and recipe value is checked before anything runs, and refused with a typed error
that names the setting, shows the value (cut short when long) and says what it must be; an unusable TESSERA_HOME
is an error line, not a traceback. No services are needed: these are refused before they would start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import foundation_model as fm
from tasks.errors import InvalidInputError

BASE = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path="examples/data/tessera_chat.jsonl",
            register_to="main.demo")

CORPUS = [
    # names: anchored to the end (no trailing newline), Unity Catalog's 255 characters a part
    (dict(register_to="main.demo\n"), r"register_to 'main.demo\\n' is malformed"),
    (dict(register_to="main.demo." + "m" * 256), r"register_to 'main.demo.mmm.*\(268 characters\) is malformed"),
    (dict(register_to="main.démo"), r"register_to 'main.démo' is malformed"),
    # the experiment: an absolute workspace path, no way out of the artifact root, within MLflow's 500 characters
    (dict(experiment_path="/Users/me/../../etc"), r"experiment_path '/Users/me/../../etc' must be an absolute"),
    (dict(experiment_path="/.."), r"without empty, '.' or '..' segments"),
    (dict(experiment_path="Users/me/x"), r"must be an absolute workspace path"),
    (dict(experiment_path="/Users/" + "e" * 600), r"\(609 characters\) is longer than 500 characters"),
    # control characters, overlong strings
    (dict(model="HuggingFaceTB/SmolLM2\x00"), r"model .* must not hold control characters \('\\x00' at position 21\)"),
    (dict(train_data_path="train.jsonl\n"), r"train_data_path .* must not hold control characters \('\\n'"),
    (dict(eval_data_path="\x1b[31meval.jsonl"), r"eval_data_path .* must not hold control characters \('\\x1b'"),
    (dict(custom_weights_path="ckpt\r"), r"custom_weights_path .* must not hold control characters"),
    (dict(train_data_path="t" * 5000), r"\(5002 characters\) is longer than 4096 characters"),
    (dict(eval_prompts=["say \x07"]), r"eval_prompts\[0\] .* must not hold control characters"),
    (dict(eval_prompts=["p" * 20_001]), r"is longer than 20000 characters"),
    (dict(eval_prompts=["p"] * 101), r"must have at most 100 item\(s\)"),
    (dict(eval_prompts="What is Tessera?"), r"eval_prompts 'What is Tessera\?' must be a list"),
    # wrong types, NaN and infinity, numbers past what anything downstream can hold
    (dict(learning_rate=float("nan")), r"learning_rate nan must be a finite number"),
    (dict(learning_rate="1e-4"), r"learning_rate '1e-4' must be a number"),
    (dict(allow_percentage_invalid_samples=float("inf")), r"allow_percentage_invalid_samples inf must be a finite"),
    (dict(context_length=True), r"context_length True must be a whole number"),
    (dict(context_length=2**40), r"context_length 1099511627776 must be at most 1048576"),
    (dict(training_duration="99999999999999999999ba"), r"training_duration 99999999999999999999 must be at most"),
    (dict(training_duration="-3ep"), r"training_duration '-3ep' is not a duration"),
    (dict(task_type="chat_completion"), r"task_type 'chat_completion' must be 'CHAT_COMPLETION'"),
]


@pytest.mark.parametrize("bad, message", CORPUS, ids=[next(iter(bad)) for bad, _ in CORPUS])
def test_create_refuses_hostile_arguments(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        fm.create(**{**BASE, **bad})


@pytest.mark.parametrize("path, value, message", [
    ("training_config.seed", 2**70, r"training_config.seed 1180591620717411303424 must be at most 4294967295"),
    ("training_config.trainer.gradient_clip_val", float("inf"), r"gradient_clip_val inf must be a finite number"),
    ("training_config.model.optim.betas", [float("nan"), 0.9], r"betas\[0\] nan must be a finite number"),
    ("training_config.model.peft.lora_tuning.target_modules", ["q_proj\n"],
     r"target_modules\[0\] 'q_proj\\n' is not valid"),
    ("run.name", "job\x00", r"run.name 'job\\x00' must not hold control characters"),
])
def test_overrides_refuse_hostile_values(path, value, message):
    with pytest.raises(InvalidInputError, match=message):
        fm.create(**BASE, overrides={path: value})


def test_a_recipe_with_hostile_values_names_its_file_and_keys(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run:\n  model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct\n"
                      "  train_data_path: examples/data/tessera_chat.jsonl\n  register_to: main.demo\n"
                      "  experiment_path: /Shared/../../outside\n"
                      "training_config:\n  model:\n    optim:\n      lr: .nan\n")
    with pytest.raises(InvalidInputError) as refused:
        fm.create(recipe=str(recipe))
    lines = str(refused.value).splitlines()
    assert lines == [
        f"{recipe}: run.experiment_path '/Shared/../../outside' must be an absolute workspace path without empty, "
        "'.' or '..' segments, e.g. '/Users/<you>/<name>' (The MLflow experiment, an absolute workspace path; default "
        "/Users/<user>/<run name>): e.g. '/Users/me/assistant'",
        f"{recipe}: training_config.model.optim.lr nan must be a finite number (The peak learning rate, reached after "
        "warmup: 1e-6 to 1e-3, the range full fine-tuning trains in (larger diverges, smaller barely moves)): "
        "e.g. 5e-05",
    ]


def test_sweeps_and_retrainings_take_the_same_checks():
    with pytest.raises(InvalidInputError, match=r"retrain.registered_model 'main.demo.a\\n' is malformed"):
        fm.schedule_retraining("main.demo.a\n", "incoming/", "eval.jsonl", cron="0 3 * * *", model=BASE["model"])
    with pytest.raises(InvalidInputError, match=r"learning_rate inf must be a finite number"):
        fm.sweep(space={"training_duration": ["1ep", "2ep"]}, strategy="grid", metric="train_loss", max_trials=2,
                 **BASE, learning_rate=float("inf"))


def tessera(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **env}, cwd=Path(__file__).parents[1])


def test_the_cli_refuses_hostile_values_with_an_error_line():
    done = tessera("create", BASE["model"], BASE["train_data_path"], "main.demo", "--set",
                   "training_config.seed=-1", "--set", "run.experiment_path=/a/./b")
    said = " ".join(done.stdout.split())
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "training_config.seed -1 must be at least 0" in said and "run.experiment_path '/a/./b' must be" in said


def test_an_unusable_home_is_an_error_line_not_a_traceback(tmp_path):
    home = tmp_path / "a-file"
    home.write_text("not a folder")
    done = tessera("list", TESSERA_HOME=str(home))
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert f"error: TESSERA_HOME {home} cannot be used as a folder (File exists)" in " ".join(done.stdout.split())


def test_a_home_on_a_full_disk_is_refused_before_anything_starts(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        done = tessera("list", TESSERA_HOME=str(disk / "home"))
        said = " ".join(done.stdout.split())
        assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
        assert (f"error: TESSERA_HOME {disk / 'home'} is on a full disk (4 MiB free, Tessera needs at least 64 MiB)"
                in said)
        assert not (disk / "home" / "services").exists()  # nothing started
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("listing", [fm.list, fm.list_sweeps, fm.list_retrainings])
def test_a_listing_refuses_an_unknown_status_by_name(listing):
    with pytest.raises(InvalidInputError, match=r"^status 'RUNING' is unknown: use one of PENDING, QUEUED"):
        listing(statuses=["RUNING"])
