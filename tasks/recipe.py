"""A run's RunConfig from what the user wrote: a recipe, the anchor's arguments, and overrides by path.

    configure(recipe="examples/recipes/full.yaml", shorthands={"learning_rate": 1e-4},
              overrides={"training_config.trainer.max_steps": 40})

The recipe is the config's own dict or YAML form. The anchor's arguments (tasks/arguments.py) are shorthands for
one path each (SHORTHANDS); both they and overrides win over the recipe. The config is checked once, here; every error
names the setting as the user wrote it (the argument, or the recipe's file and key), the value, and the fix.
"""

import copy
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML, YAMLError

from tasks.arguments import DURATION, SHORTHANDS, refuse_unknown
from tasks.config import DURATION_KEYS, Duration, Rule, RunConfig, leaves, set_path
from tasks.errors import InvalidInputError
from tasks.nova import keys_under, nearest, translate


def configure(recipe: "str | Path | dict | RunConfig | None" = None, shorthands: dict[str, Any] | None = None,
              overrides: dict[str, Any] | None = None, called: str | None = "recipe",
              schema: type[RunConfig] = RunConfig) -> RunConfig:
    """The checked config: the recipe, then the overrides and the shorthands that are not None on top.
    Errors name a recipe file by its path, a dict or RunConfig as `called` (None: each key by its path alone).
    `schema`: RunConfig, or a config that extends it (a sweep's)."""
    if isinstance(recipe, RunConfig):
        recipe = recipe.to_recipe()
    data, source = load_recipe(recipe, called) if recipe is not None else ({}, None)
    nova = translate(data)  # Amazon Nova's own keys, as Tessera's
    data = nova.data
    names = {path: path for path, _ in leaves(data)} | nova.names  # recipe keys, as written
    from_recipe = set(names)
    durations = {path for path, value in (overrides or {}).items() if path in _DURATION_PATHS and value is not None}
    if durations:
        _clear_duration(data, keep=durations)  # a duration given replaces whichever the recipe gave
    for path, value in (overrides or {}).items():
        set_path(data, path, value)
        names[path] = path
    refuse_unknown(shorthands or {}, "configure()")
    for argument, value in (shorthands or {}).items():
        if value is None:
            continue
        if argument == DURATION:
            duration = Duration.parse(value)
            path = f"training_config.trainer.{DURATION_KEYS[duration.unit]}"
            _clear_duration(data, keep={path})
            value = duration.value
        else:
            path = SHORTHANDS[argument]
        set_path(data, path, value)
        names[path] = argument
    shorthand_paths = {path for path, name in names.items() if name in SHORTHANDS}
    recipe_keys = from_recipe - set(overrides or {}) - shorthand_paths
    data.setdefault("run", {})
    problems = [f"{source}: {line}" if source else line for line in nova.problems + nova.duration_problems(data)]
    try:
        config = schema.model_validate(data)
    except ValidationError as e:
        problems += _problems(e, schema, names, recipe_keys if source else set(), source)
    if problems:
        raise InvalidInputError("\n".join(problems))
    # Later checks (paths, the model's context limit) name a setting as given: the argument, or the recipe's key.
    config._names = {path: name for path, name in names.items() if name != path}
    config._names |= {path: f"{source}: {names[path]}" for path in recipe_keys} if source else {}
    config._amazon_only = tuple(nova.amazon_only)
    return config


_DURATION_PATHS = {f"training_config.trainer.{key}" for key in DURATION_KEYS.values()}


def is_setting(path: str) -> bool:
    """Whether `path` names one setting of RunConfig (not a section, not an unknown key)."""
    model: type[BaseModel] | None = RunConfig
    for key in path.split("."):
        field = _field(model, key) if model is not None else None
        if field is None:
            return False
        model = _section_type(field)
    return model is None


def _clear_duration(data: dict, keep: set[str]) -> None:
    for path in _DURATION_PATHS - keep:
        set_path(data, path, None)


def load_recipe(recipe: "str | Path | dict", called: str | None = "recipe") -> tuple[dict, str | None]:
    """A recipe's content (a copy) and how errors name it: its file, or `called` for a dict (None: by path alone)."""
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe), called
    path = Path(recipe).expanduser()
    try:
        data = read_yaml(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"recipe {path} does not exist: check the path") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InvalidInputError(f"recipe {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"recipe {path} must be a mapping with the sections run and training_config")
    return data, str(path)


def read_yaml(text: str) -> Any:
    """YAML as version 1.2 reads it, so `lr: 5e-5` is a number (1.1, and so PyYAML, reads a string) and `yes` text."""
    return YAML(typ="safe", pure=True).load(text)


# --- errors, worded -------------------------------------------------------------------------------------------

_RULES = {  # pydantic's error type -> what the value must be
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
    "greater_than": "must be above {gt}", "less_than": "must be below {lt}",
    "int_type": "must be a whole number", "int_from_float": "must be a whole number",
    "float_type": "must be a number", "bool_type": "must be true or false", "string_type": "must be a string",
    "string_too_short": "must not be empty", "string_too_long": "is longer than {max_length} characters",
    "string_pattern_mismatch": "is malformed", "finite_number": "must be a finite number",
    "list_type": "must be a list", "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)", "literal_error": "must be {expected}",
    "enum": "must be {expected}",
}


def _problems(error: ValidationError, schema: type[BaseModel], names: dict[str, str], recipe_keys: set[str],
              source: str | None) -> list[str]:
    """One line per problem: `<file>: <path> <value> <what it must be> (<the setting>): e.g. <example>`."""
    lines: list[str] = []
    for e in error.errors():
        path, branch = _path(schema, e["loc"])
        cause = e.get("ctx", {}).get("error")
        paths = [path]
        if branch:  # a union's branches each say how the value misses them: say once that it fits none
            line = f"{names.get(path, path)} {_shown(e['input'])} is not valid{_fix(_field_at(schema, path))}"
        elif isinstance(cause, Rule):  # a validator's rule joining settings: name each as the user wrote it
            paths = [f"{path}.{p}" if path else p for p in cause.paths]
            line = cause.message.format(*(names.get(p, p) for p in paths))
        elif e["type"] == "missing":
            shorthand = next((s for s, p in SHORTHANDS.items() if p == path), None)
            paths, line = [], (f"{shorthand} is missing: pass {shorthand} or set {path} in the recipe" if shorthand
                               else f"{path} is missing")
        elif e["type"] == "extra_forbidden":
            parent, _, key = path.rpartition(".")
            known = [*_model_at(schema, parent).model_fields, *keys_under(parent)]
            line = (f"{path} is not a recipe key; the keys allowed {f'under {parent}' if parent else 'at the top'} "
                    f"are {_keys(schema, parent)}{nearest(key, known)}")
            if path == "sweep":
                line += " (a recipe with a sweep section runs as a sweep: fm.sweep(recipe=...), tessera sweep --recipe)"
            elif path == "retrain":
                line += (" (a recipe with a retrain section is a retraining: fm.schedule_retraining(recipe=...), "
                         "tessera retrain schedule --recipe)")
        elif e["type"] == "model_type":  # a section that is not a mapping
            line = f"{names.get(path, path)} {_shown(e['input'])} must be a mapping with the keys {_keys(schema, path)}"
        else:  # a value of the wrong type or out of range
            line = f"{names.get(path, path)} {_shown(e['input'])} {_rule(e)}{_fix(_field_at(schema, path))}"
        if source and paths and _within(paths[0], recipe_keys):  # the setting the line is about is the recipe's
            line = f"{source}: {line}"
        if line not in lines:  # each branch of a union reports the same value
            lines.append(line)
    return lines


def _within(path: str, keys: set[str]) -> bool:
    """Whether `path` is one of `keys` or inside one (an item of a list the recipe gave)."""
    return any(path == key or path.startswith((f"{key}.", f"{key}[")) for key in keys)


def _keys(schema: type[BaseModel], section: str) -> str:
    return ", ".join(_model_at(schema, section).model_fields)


def _path(schema: type[BaseModel], loc: tuple) -> tuple[str, bool]:
    """`training_config.model.optim.betas[1]` from pydantic's loc, keys as written, and whether it went through a
    union's branch (whose tags are left out of the path)."""
    path, model, keyed, branch = "", schema, False, False
    for part in loc:
        field = _field(model, part) if model is not None and isinstance(part, str) else None
        if isinstance(part, int):
            path += f"[{part}]"
        elif field is not None or model is not None or keyed:  # a key, an unknown key, or a mapping's own key
            path += f".{part}" if path else part
        else:
            branch = True
        keyed = field is not None and get_origin(field.annotation) is dict  # its next part is one of its keys
        model = _section_type(field) if field is not None else None
    return path, branch


def _shown(value: Any, limit: int = 80) -> str:
    """The value as the user gave it, cut short when long (a 100 kB string is not echoed back)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _rule(e: dict) -> str:
    ctx = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in e.get("ctx", {}).items()}
    return _RULES[e["type"]].format(**ctx) if e["type"] in _RULES else e["msg"][:1].lower() + e["msg"][1:]


def _fix(field: FieldInfo | None) -> str:
    """What the setting is and an example, from its docstring and examples."""
    if field is None:
        return ""
    text = " ".join((field.description or "").split()).rstrip(".")
    described = f" ({text})" if text else ""
    example = f": e.g. {field.examples[0]!r}" if field.examples else ""
    return described + example


def _field_at(schema: type[BaseModel], path: str) -> FieldInfo | None:
    """The field a path is in: an item of a list or a mapping is described by the list's or mapping's field."""
    model, field = schema, None
    for key in path.split("[")[0].split("."):
        if model is None:
            break
        field = _field(model, key)
        model = _section_type(field) if field is not None else None
    return field


def _model_at(schema: type[BaseModel], path: str) -> type[BaseModel] | None:
    model = schema
    for key in filter(None, path.split(".")):
        field = _field(model, key) if model is not None else None
        model = _section_type(field) if field is not None else None
    return model


def _field(model: type[BaseModel], key: str) -> FieldInfo | None:
    """The field named `key`, or whose alias it is (Nova's data_s3_path for train_data_path)."""
    for name, field in model.model_fields.items():
        if key == name or key in getattr(field.validation_alias, "choices", ()):
            return field
    return None


def _section_type(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
