"""The anchor's arguments as a `tessera` command's options, their types and help from tasks/arguments.py."""

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Literal, get_origin

from cyclopts import Parameter

from tasks.arguments import ARGUMENTS, BY_NAME, Argument

Kind = inspect.Parameter  # its kinds: positional or keyword, keyword-only


def with_arguments(*names: str, defaults: Callable | None = None, positional: bool = True):
    """Give the command the options `names` (none: every argument), which reach it as the dict `arguments`.

    An option's default is the one `defaults` (the function the command calls) has, else None: not given, and its
    help says the config's default. `positional`: the anchor's first arguments (model, ...) may come by position."""
    declared = [BY_NAME[name] for name in names] if names else ARGUMENTS

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "arguments"]
        given = {a.name: _option(a, positional, _default_in(defaults, a.name)) for a in declared}
        order = [p for p in own if p.kind is not Kind.KEYWORD_ONLY]
        order += sorted(given.values(), key=lambda p: p.kind) + [p for p in own if p.kind is Kind.KEYWORD_ONLY]
        signature = inspect.Signature(order)

        @functools.wraps(command)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            return command(**{k: v for k, v in values.items() if k not in given},
                           arguments={k: v for k, v in values.items() if k in given})

        run.__signature__ = signature  # cyclopts reads the options off this
        run.__annotations__ = {p.name: p.annotation for p in order}
        return run

    return decorate


def _default_in(function: Callable | None, name: str) -> Any:
    parameter = inspect.signature(function).parameters.get(name) if function else None
    return None if parameter is None or parameter.default is Kind.empty else parameter.default


def _option(argument: Argument, positional: bool, default: Any) -> inspect.Parameter:
    kind = Kind.POSITIONAL_OR_KEYWORD if positional and argument.positional else Kind.KEYWORD_ONLY
    help = argument.help
    if default is None and argument.default is not None:
        help += f" (default {argument.default})"
    parameter = Parameter(help=help, consume_multiple=get_origin(argument.type) is list)  # --eval-prompts a b
    return inspect.Parameter(argument.name, kind, default=default,
                             annotation=Annotated[_cli_type(argument.type) | None, parameter])


def _cli_type(type_: Any) -> Any:
    """An enum is given and shown by its values."""
    is_enum = isinstance(type_, type) and issubclass(type_, Enum)
    return Literal[tuple(member.value for member in type_)] if is_enum else type_
