"""A run's flow process, a sweep's, a retraining's, the runner, the client API and the HTTP server import no training
stack: torch, transformers, peft and DeepSpeed cost seconds of every process that imports them, and only the training
worker and the steps that load a model need them, in children of the warm-start server (tasks/warm_start.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAINING_STACK = ("torch", "transformers", "peft", "deepspeed")


@pytest.mark.parametrize("module", ["flows.finetune", "flows.sweep", "flows.retrain", "flows.train_node",
                                    "flows.foundation_model", "deployments.serve", "api.app"])
def test_a_module_imports_no_training_stack(module):
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(*[m for m in {TRAINING_STACK!r} if m in sys.modules])"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == [], f"importing {module} loads {loaded.stdout.strip()}"


def test_a_run_tokenizes_its_data_without_importing_the_training_stack(tiny_model_dir, chat_file, tmp_path):
    """The data step's tokenizer needs transformers, and so torch: it runs in a child of the warm-start server that
    the runner keeps, and the flow process stays without them."""
    script = f"""
import os, sys
from pathlib import Path
from tasks import warm_start
from tasks.data.prepare import prepare_dataset
warm_start.start_server()
warm_start.wait_until_listening(Path(os.environ[warm_start.ADDRESS]))
prepared = warm_start.run(prepare_dataset, {chat_file!r}, Path({str(tiny_model_dir)!r}), "CHAT_COMPLETION", 64, 0.0)
print(prepared.num_examples, *[m for m in {TRAINING_STACK!r} if m in sys.modules])
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parents[1],  # a cache of its own: the data is tokenized here
                            env={**os.environ, "TESSERA_HOME": str(tmp_path), "TESSERA_CACHE": str(tmp_path / "cache")})
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["24"], loaded.stdout
