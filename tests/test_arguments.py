"""The anchor's arguments are declared once (tasks/arguments.py): each place that writes them out agrees with the
declaration, the CLI takes its options and help from it, and an argument that is none of them is one typed error."""

import dataclasses
import inspect
import io
import re
import types
from enum import Enum
from pathlib import Path
from typing import Annotated, Union, get_args, get_origin

import pytest
from rich.console import Console

from cli import main as cli
from flows import foundation_model as fm
from flows.finetune import finetune
from tasks.arguments import ARGUMENTS, BY_NAME, DURATION, Argument
from tasks.config import RunConfig
from tasks.errors import UnknownArgumentError

README = Path(__file__).parents[1] / "README.md"


def _parameters(function) -> dict[str, object]:
    return {p.name: p.annotation for p in inspect.signature(function).parameters.values()}


# Each place that writes the arguments out for IDEs, docs or Prefect's form: its names and their types, and whether
# it lists them in the declaration's order (TrainingRun keeps the anchor's field order; validate_data takes a few).
PLACES = {
    "fm.create": (lambda: _parameters(fm.create), "all, in order"),
    "the finetune flow": (lambda: _parameters(finetune.fn), "all, in order"),
    "TrainingRun": (lambda: {f.name: f.type for f in dataclasses.fields(fm.TrainingRun)}, "all"),
    "fm.validate_data": (lambda: _parameters(fm.validate_data), "some"),
}


def _accepted(argument: Argument) -> set:
    """The types a place may give an argument: its own or, for an enum, str (its values); either optional."""
    own = {argument.type} | ({str} if isinstance(argument.type, type) and issubclass(argument.type, Enum) else set())
    return own | {t | None for t in own}


@pytest.mark.parametrize("place", PLACES)
def test_each_place_that_writes_the_arguments_out_agrees_with_the_declaration(place):
    read, takes = PLACES[place]
    found = read()
    named = [name for name in found if name in BY_NAME]
    if takes.startswith("all"):
        assert sorted(named) == sorted(BY_NAME), f"{place} lacks {sorted(set(BY_NAME) - set(named))}"
    if takes == "all, in order":
        assert named == list(BY_NAME), f"{place} lists them as {named}, not as tasks/arguments.py does"
    wrong = {name: found[name] for name in named if found[name] not in _accepted(BY_NAME[name])}
    assert not wrong, f"{place} types them otherwise than tasks/arguments.py: {wrong}"


def _plain(annotation):
    """The Python type under a config field's constraints and optionality: PathText is str, list[Prompt] list[str]."""
    if get_origin(annotation) is Annotated:
        return _plain(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        (kept,) = [a for a in get_args(annotation) if a is not type(None)]
        return _plain(kept)
    if get_origin(annotation) is list:
        return list[_plain(get_args(annotation)[0])]
    return annotation


@pytest.mark.parametrize("argument", [a for a in ARGUMENTS if a.name != DURATION], ids=lambda a: a.name)
def test_each_argument_is_typed_as_the_setting_it_sets(argument):
    model, field = RunConfig, None
    for key in argument.path.split("."):
        field = model.model_fields[key]
        model = field.annotation
    assert _plain(field.annotation) == argument.type


def test_the_readmes_table_lists_each_argument_and_the_path_it_sets():
    text = README.read_text()
    table = text[text.index("| argument (`create()`"):].split("\n\n")[0].splitlines()[2:]
    rows = [[re.findall(r"`([\w.]+)`", cell) for cell in row.split("|")[1:3]] for row in table]
    listed = {name: paths for names, paths in rows for name in names}
    assert sorted(listed) == sorted(BY_NAME)
    for argument in ARGUMENTS:
        assert any(path.startswith(argument.path) for path in listed[argument.name]), argument.name


@pytest.mark.parametrize("command", ["create", "validate"])
def test_the_cli_takes_its_options_and_their_help_from_the_declaration(command):
    shown = io.StringIO()
    cli.app.help_print([command], console=Console(file=shown, width=1000))
    lines = shown.getvalue().splitlines()
    options = [a for a in ARGUMENTS if f"--{a.name.replace('_', '-')} " in shown.getvalue()]
    assert len(options) == (len(ARGUMENTS) if command == "create" else 5)
    for argument in options:
        line = next(line for line in lines if f"--{argument.name.replace('_', '-')} " in line)
        assert argument.help.replace("`", "") in line, line


def test_validate_takes_a_runs_defaults():
    defaults = {name: p.default for name, p in inspect.signature(fm.validate_data).parameters.items()}
    assert {name: defaults[name] for name in ("task_type", "training_duration", "context_length",
                                              "allow_percentage_invalid_samples", "global_batch_size")} == {
        "task_type": "CHAT_COMPLETION", "training_duration": "1ep", "context_length": None,
        "allow_percentage_invalid_samples": 0.0, "global_batch_size": 8}


@pytest.mark.parametrize("call, said", [
    (lambda: fm.sweep(space={"learning_rate": [1e-4]}, lr=1e-4), "sweep() has no argument lr"),
    (lambda: fm.schedule_retraining("main.demo.m", cron="0 3 * * *", lr=1e-4, epochs=2),
     "schedule_retraining() has no argument epochs, lr"),
    (lambda: fm.retrain_now("main.demo.m", lr=1e-4), "retrain_now() has no argument lr"),
])
def test_an_argument_create_does_not_take_is_one_typed_error(call, said):
    with pytest.raises(UnknownArgumentError) as refused:
        call()
    assert str(refused.value) == f"{said}: use create()'s ({', '.join(BY_NAME)})"
