"""Every import points down the layers: steps (tasks) → flows → execution (deployments) → client → HTTP API and CLI.

Lazy imports count, and so does a module started by name (`python -m pkg.mod`, a warm-start target "pkg.mod:fn"):
a process started by a lower layer running a higher one is an import up closed through a subprocess.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The longest matching prefix decides. `flows.foundation_model` is the client's documented name (the README's
# `from flows import foundation_model as fm`), so it sits with the client it re-exports.
LAYERS = {"tasks": 0, "flows": 1, "deployments": 2, "client": 3, "flows.foundation_model": 3, "api": 4, "cli": 4}
PACKAGES = sorted({name.split(".")[0] for name in LAYERS})
STARTED_BY_NAME = re.compile(rf"^((?:{'|'.join(PACKAGES)})(?:\.\w+)+)(?::\w+)?$")


def layer_of(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def references(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each import in the file and each module it starts by name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if match := STARTED_BY_NAME.match(node.value):
                found.append((node.lineno, match.group(1)))
    return sorted(found)


def upward_imports() -> list[str]:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            here = layer_of(module_name(path))
            for line, target in references(path):
                there = layer_of(target)
                if there is not None and here is not None and there > here:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({here}) -> {target} ({there})")
    return wrong


def test_every_import_points_down():
    assert upward_imports() == []


def test_the_check_sees_lazy_imports_and_modules_started_by_name(tmp_path):
    source = tmp_path / "example.py"
    source.write_text('def f():\n    from api.app import app\n\ncmd = ["python", "-m", "deployments.serve"]\n'
                      'target = "tasks.scoring:score"\n')
    assert references(source) == [(2, "api.app.app"), (4, "deployments.serve"), (5, "tasks.scoring")]
    assert layer_of("flows.foundation_model.runs") == 3 and layer_of("flows.finetune") == 1
