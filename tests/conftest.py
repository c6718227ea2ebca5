"""Shared fixtures: an isolated Tessera home per session, and a tiny model built locally."""

import os
import shutil
from pathlib import Path

import pytest

# Isolate every test session from the user's ~/.tessera and any running Prefect, before imports use them.
_SESSION_HOME = Path(os.environ.get("TESSERA_TEST_HOME", "/tmp/tessera-test")) / f"s{os.getpid()}"
_SESSION_HOME.mkdir(parents=True, exist_ok=True)
os.environ["TESSERA_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (converted from GGUF once per machine)."""
    from tasks.models import resolve_model

    return resolve_model(SMOLLM2)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template: trains in a second on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, target / name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    return target


@pytest.fixture(scope="session", autouse=True)
def _remove_session_home():
    """Runs leave GBs of checkpoints behind (SmolLM2: 1.6 GB each); a test session removes its own."""
    yield
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
