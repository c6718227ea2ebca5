"""RunConfig and run names: bad values are refused with a message that says what to write instead."""

import re

import pytest

from tasks.config import Duration, RunConfig, run_name_for
from tasks.errors import InvalidInputError


def config(**overrides) -> RunConfig:
    args = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path="train.jsonl", register_to="main.demo")
    return RunConfig(**{**args, **overrides})


@pytest.mark.parametrize("text, value, unit", [
    ("3ep", 3, "ep"), ("200ba", 200, "ba"), ("1_000_000tok", 1_000_000, "tok"), (" 2ep ", 2, "ep"),
])
def test_durations_parse_like_the_anchor(text, value, unit):
    assert Duration.parse(text) == Duration(value, unit)


@pytest.mark.parametrize("text", ["3", "3 epochs", "0ep", "ep", "1.5ep", "-2ba", "3EP"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(InvalidInputError, match=r"e\.g\. '3ep', '200ba' or '1_000_000tok'"):
        Duration.parse(text)


@pytest.mark.parametrize("overrides, message", [
    (dict(task_type="chat"), r"task_type 'chat' is unknown: use one of CHAT_COMPLETION, INSTRUCTION_FINETUNE"),
    (dict(task_type="chat_completion"), r"case-sensitive"),
    (dict(register_to="main"), r"register_to 'main' is malformed: write catalog.schema"),
    (dict(register_to="main.demo.model.extra"), r"malformed"),
    (dict(register_to="main.de mo"), r"malformed"),
    (dict(learning_rate=0), r"learning_rate 0 must be a positive number"),
    (dict(learning_rate=-1e-5), r"must be a positive number"),
    (dict(training_duration="2 epochs"), r"training_duration '2 epochs' is not a duration"),
    (dict(context_length=0), r"context_length 0 must be an integer"),
    (dict(eval_prompts="What is Tessera?"), r"eval_prompts must be a list of non-empty strings"),
    (dict(micro_batch_size=3, global_batch_size=8), r"must be a multiple of micro_batch_size 3"),
    (dict(zero_stage=4), r"zero_stage 4 must be 0, 1, 2 or 3"),
    (dict(model=""), r"model is empty"),
])
def test_bad_config_values_are_refused_with_the_fix(overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        config(**overrides)


def test_defaults_match_the_anchor():
    c = config()
    assert (c.task_type, c.training_duration, c.context_length) == ("CHAT_COMPLETION", "1ep", None)
    assert c.registered_model_name("ift-x-abc123") == "main.demo.ift-x-abc123"
    assert config(register_to="main.demo.my_model").registered_model_name("ift-x") == "main.demo.my_model"


def test_run_names_follow_the_anchor_and_rfc1123():
    name = run_name_for("HuggingFaceTB/SmolLM2-135M-Instruct", "CHAT_COMPLETION")
    assert re.fullmatch(r"ift-smollm2-135m-instruct-[a-z0-9]{6}", name)
    assert run_name_for("m", "CONTINUED_PRETRAIN").startswith("contd-pretrain-m-")
    long = run_name_for("/models/" + "Very_Long.Name" * 10, "CONTINUED_PRETRAIN")
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)
    assert run_name_for("m", "CHAT_COMPLETION") != run_name_for("m", "CHAT_COMPLETION")
