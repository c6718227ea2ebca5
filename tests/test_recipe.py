"""Nova-style recipes: every key lands in one RunConfig field, checked; unknown and unsupported keys are refused."""

import re
from pathlib import Path

import pytest
import yaml

from flows.foundation_model import config_from
from tasks.errors import InvalidInputError
from tasks.recipe import load_recipe

EXAMPLE = Path(__file__).parents[1] / "examples" / "recipes" / "full.yaml"


def recipe(**changes) -> dict:
    """The example recipe with `changes` applied at dotted keys (None removes a key)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        section = data
        for key in path:
            section = section.setdefault(key, {})
        if value is None:
            section.pop(last, None)
        else:
            section[last] = value
    return data


def test_the_example_recipe_sets_the_run_config():
    config = config_from(EXAMPLE, {})
    assert (config.model, config.train_data_path, config.register_to) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "examples/data/tessera_chat.jsonl", "main.demo")
    assert (config.training_duration, config.context_length, config.learning_rate) == ("2ep", 256, 3e-4)
    assert (config.warmup_steps, config.min_lr, config.lr_schedule, config.adam_betas) == (2, 3e-5, "cosine", [0.9, 0.95])
    assert (config.eval_every_n_steps, config.save_every_n_steps, config.gradient_clip) == (6, 12, 1.0)


def test_checkpoint_pruning_and_early_stopping_come_from_the_recipe():
    config = config_from(recipe(training_config__save_top_k=2,
                                training_config__early_stopping={"monitor": "val_loss", "patience": 3,
                                                                 "min_delta": 0.01}), {})
    assert (config.save_top_k, config.early_stopping_patience, config.early_stopping_min_delta) == (2, 3, 0.01)


def test_a_lora_recipe():
    config = config_from(recipe(training_config__model__peft={
        "peft_scheme": "lora", "lora_tuning": {"alpha": 64, "adapter_dropout": 0.01, "loraplus_lr_ratio": 8.0,
                                               "rank": 8, "target_modules": ["q_proj", "v_proj"]}}), {})
    assert (config.peft_scheme, config.lora_alpha, config.lora_dropout, config.loraplus_lr_ratio, config.lora_rank,
            config.lora_target_modules) == ("lora", 64, 0.01, 8.0, 8, ["q_proj", "v_proj"])


def test_arguments_override_the_recipe():
    config = config_from(EXAMPLE, {"learning_rate": 1e-4, "training_duration": "30ba", "model": "/models/other"})
    assert (config.learning_rate, config.training_duration, config.model) == (1e-4, "30ba", "/models/other")
    assert config_from(recipe(training_config__trainer__max_epochs=None, training_config__trainer__max_steps=40),
                       {}).training_duration == "40ba"


@pytest.mark.parametrize("changes, message", [
    (dict(training_config__model__optim__lr=2e-3),
     "recipe: training_config.model.optim.lr: learning_rate 0.002 is outside 1e-06 to 0.001"),
    (dict(training_config__model__optim__sched__warmup_steps=30),
     "training_config.model.optim.sched.warmup_steps: warmup_steps 30 must be an integer from 1 to 20"),
    (dict(training_config__model__optim__sched__min_lr=5e-4),
     "training_config.model.optim.sched.min_lr: min_lr 0.0005 must be at least 0 and below learning_rate"),
    (dict(training_config__model__attention_dropout=1.5),
     "training_config.model.attention_dropout: attention_dropout 1.5 must be from 0 to below 1"),
    (dict(training_config__trainer__max_epochs=6), "training_config.trainer.max_epochs 6 must be an integer from 1 to 5"),
    (dict(training_config__trainer__max_steps=10), "give training_config.trainer.max_epochs or "
                                                   "training_config.trainer.max_steps, not both"),
    (dict(training_config__model__optim__sched__name="step"), "lr_schedule 'step' is unknown: use one of cosine"),
    (dict(training_config__model__optim__name="sgd"), "training_config.model.optim.name 'sgd' is unknown"),
    (dict(training_config__model__optim__betas=[0.9]), "adam_betas [0.9] must be two numbers in [0, 1)"),
    (dict(training_config__max_lenght=256),
     "training_config.max_lenght is not a recipe key; the keys allowed under training_config are max_length"),
    (dict(run__model_type="amazon.nova-lite-v1:0:300k"), "run.model_type is not a recipe key"),
    (dict(training_config__model__peft__peft_scheme="dora"), "peft_scheme 'dora' is unknown: use null"),
    (dict(training_config__model__peft__lora_tuning={"alpha": 48}),
     "training_config.model.peft.lora_tuning.alpha: lora_alpha 48 must be one of 32, 64, 96, 128, 160, 192"),
    (dict(training_config__model__peft__lora_tuning={"adapter_dropout": 1.0}), "lora_dropout 1.0 must be from 0"),
    (dict(training_config__model__peft__lora_tuning={"loraplus_lr_ratio": 120}), "loraplus_lr_ratio 120 must be"),
    (dict(training_config__model__peft__lora_tuning={"rank": 0}), "lora_rank 0 must be an integer from 1 to 256"),
    (dict(training_config__early_stopping={"monitor": "train_loss"}), "'train_loss': only val_loss can be monitored"),
    (dict(training_config__early_stopping={"patience": 0}), "early_stopping_patience 0 must be an integer of at least 1"),
    (dict(training_config__save_top_k=0), "training_config.save_top_k: save_top_k 0 must be an integer of at least 1"),
    (dict(training_config__model__hidden_dropout=1.5), "training_config.model.hidden_dropout: hidden_dropout 1.5 must be"),
    (dict(training_config__deepspeed={"offload_optimizer": True}), "offload_optimizer needs zero_stage 1, 2 or 3"),
    (dict(training_config__deepspeed={"processes": 3}),
     "global_batch_size 8 must be a multiple of micro_batch_size 4 x processes 3"),
    (dict(run__eval_data_path=None), "eval_every_n_steps 6 needs eval_data_path"),
    (dict(run__register_to=None), "register_to is missing: pass it to create() or set it in the recipe's run"),
])
def test_bad_recipes_name_the_key_and_the_fix(changes, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        config_from(recipe(**changes), {})


def test_a_file_that_is_not_yaml_names_its_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("run:\n  model: a\n training_config: [\n")
    with pytest.raises(InvalidInputError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(InvalidInputError, match="recipe .*missing.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_the_lora_example_recipe_loads():
    config = config_from(EXAMPLE.with_name("lora.yaml"), {})
    assert (config.peft_scheme, config.lora_rank, config.lora_alpha, config.loraplus_lr_ratio) == ("lora", 16, 32, 8.0)
