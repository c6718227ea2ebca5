"""A run's flow process, a sweep's, the client API and the HTTP server import no training stack: torch, transformers,
peft and DeepSpeed cost seconds of every process that imports them, and only the training worker and the steps that
load a model (in their own functions) need them."""

import subprocess
import sys
from pathlib import Path

import pytest

TRAINING_STACK = ("torch", "transformers", "peft", "deepspeed")


@pytest.mark.parametrize("module", ["flows.finetune", "flows.sweep", "flows.train_node", "flows.foundation_model",
                                    "api.app"])
def test_a_module_imports_no_training_stack(module):
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(*[m for m in {TRAINING_STACK!r} if m in sys.modules])"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == [], f"importing {module} loads {loaded.stdout.strip()}"
