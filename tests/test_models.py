"""The catalog's models on this machine: a bundled model's tokenizer without its weights, and context lengths."""

import pytest

from conftest import SMOLLM2
from tasks.data.prepare import tokenizer_hash
from tasks.errors import InvalidInputError
from tasks.models import context_length_for, tokenizer_folder


def test_data_preparation_gets_the_bundled_tokenizer_without_converting_the_weights(smollm2_dir, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path))
    folder = tokenizer_folder(SMOLLM2)
    assert not (tmp_path / "models").exists()  # init-model converts the weights, not validate-data
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names and "model.safetensors" not in names
    # The same tokenizer and chat template as the converted model's: prepared data is keyed alike.
    assert tokenizer_hash(folder) == tokenizer_hash(smollm2_dir)
    assert tokenizer_folder(SMOLLM2) == folder  # extracted once


def test_the_context_length_defaults_to_the_model_and_is_refused_above_it(tiny_model_dir):
    assert context_length_for(SMOLLM2, None) == 8192
    assert context_length_for(str(tiny_model_dir), None) == 1024  # its own maximum is lower than 8192
    assert context_length_for(str(tiny_model_dir), 256) == 256
    with pytest.raises(InvalidInputError, match=r"^recipe.yaml: training_config.max_length 2048 exceeds the maximum "
                                                r"of .* \(1024\): use 1024 or less$"):
        context_length_for(str(tiny_model_dir), 2048, "recipe.yaml: training_config.max_length")
