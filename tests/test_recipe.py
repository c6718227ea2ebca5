"""Nova-style recipes are the config's own YAML form: every key checked where it is, errors naming the file and
the key, the anchor's arguments winning over it, and a run's resolved config a recipe that runs it again."""

from pathlib import Path

import pytest
import yaml

from tasks.config import RunConfig
from tasks.errors import InvalidInputError
from tasks.recipe import configure, load_recipe
from tasks.retraining import RetrainConfig, configure_retraining
from tasks.search import SweepConfig, configure_sweep

EXAMPLES = Path(__file__).parents[1] / "examples" / "recipes"
EXAMPLE = EXAMPLES / "full.yaml"


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


def test_the_example_recipe_sets_the_config():
    config = configure(EXAMPLE)
    run, training = config.run, config.training_config
    assert (run.model_name_or_path, run.train_data_path, run.register_to) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "examples/data/tessera_chat.jsonl", "main.demo")
    assert (str(config.duration), training.max_length, training.model.optim.lr) == ("2ep", 256, 3e-4)
    sched = training.model.optim.sched
    assert (sched.warmup_steps, sched.min_lr, sched.name, training.model.optim.betas) == (2, 3e-5, "cosine", [0.9, 0.95])
    assert (training.trainer.val_check_interval, training.save_steps, training.trainer.gradient_clip_val) == (6, 12, 1.0)
    assert (training.save_top_k, training.early_stopping.patience, training.early_stopping.min_delta) == (2, 3, 0.0)


def test_every_example_recipe_loads():
    for path in EXAMPLES.glob("*.yaml"):
        if "sweep:" in path.read_text():
            assert isinstance(configure_sweep(path), SweepConfig), path
            with pytest.raises(InvalidInputError, match="runs as a sweep: fm.sweep"):
                configure(path)
        elif "retrain:" in path.read_text():
            assert isinstance(configure_retraining(path), RetrainConfig), path
            with pytest.raises(InvalidInputError, match="is a retraining: fm.schedule_retraining"):
                configure(path)
        else:
            assert isinstance(configure(path), RunConfig), path
    lora = configure(EXAMPLES / "lora.yaml").training_config.model.peft
    assert (lora.peft_scheme, lora.lora_tuning.rank, lora.lora_tuning.alpha, lora.lora_tuning.loraplus_lr_ratio) == (
        "lora", 16, 32, 8.0)


def test_arguments_and_overrides_win_over_the_recipe():
    config = configure(EXAMPLE, {"learning_rate": 1e-4, "training_duration": "30ba", "model": "/models/other"})
    assert (config.training_config.model.optim.lr, str(config.duration), config.run.model_name_or_path) == (
        1e-4, "30ba", "/models/other")
    assert config.training_config.trainer.max_epochs is None  # the argument replaced the recipe's duration
    assert str(configure(recipe(training_config__trainer__max_epochs=None, training_config__trainer__max_steps=40))
               .duration) == "40ba"
    assert configure(EXAMPLE, overrides={"training_config.seed": 3}).training_config.seed == 3
    # A duration given by path replaces the recipe's as the argument does.
    assert str(configure(EXAMPLE, overrides={"training_config.trainer.max_steps": 40}).duration) == "40ba"


def test_recipes_read_as_yaml_1_2(tmp_path):
    """`lr: 5e-5` is a number (YAML 1.1 readers say text), `yes` is text."""
    text = EXAMPLE.read_text().replace("lr: 3.0e-4", "lr: 3e-4").replace("name: tessera-demo-full", "name: yes")
    (tmp_path / "short.yaml").write_text(text)
    config = configure(tmp_path / "short.yaml")
    assert (config.training_config.model.optim.lr, config.run.name) == (3e-4, "yes")


def test_a_rule_is_the_recipes_only_when_the_setting_it_is_about_came_from_the_file():
    with pytest.raises(InvalidInputError) as error:
        configure(EXAMPLE, overrides={"training_config.model.optim.sched.min_lr": 0.5})
    assert str(error.value).startswith("training_config.model.optim.sched.min_lr 0.5 must be below")
    with pytest.raises(InvalidInputError) as error:
        configure(recipe(training_config__model__optim__sched__min_lr=0.5))
    assert str(error.value).startswith("recipe: training_config.model.optim.sched.min_lr 0.5 must be below")


def test_nova_names_and_empty_sections():
    nova = recipe(run__train_data_path=None, run__data_s3_path="train.jsonl",
                  run__eval_data_path=None, run__validation_data_s3_path="eval.jsonl")
    config = configure(nova)
    assert (config.run.train_data_path, config.run.eval_data_path) == ("train.jsonl", "eval.jsonl")
    # Nova 2.0 advises a warmup of about 15% of max_steps: a long run's is well past Nova 1.0's 20 steps.
    long = configure(recipe(training_config__trainer__max_epochs=None, training_config__trainer__max_steps=1000,
                            training_config__model__optim__sched__warmup_steps=150))
    assert long.training_config.model.optim.sched.warmup_steps == 150
    emptied = recipe(training_config__model__peft=None)
    emptied["training_config"]["model"]["peft"] = None  # `peft:` with nothing under it
    assert configure(emptied).training_config.model.peft.peft_scheme is None


@pytest.mark.parametrize("changes, message", [
    (dict(training_config__model__optim__lr=2e-3),
     "recipe: training_config.model.optim.lr 0.002 must be at most 0.001 (The peak learning rate"),
    (dict(training_config__model__optim__sched__warmup_steps=0),
     "recipe: training_config.model.optim.sched.warmup_steps 0 must be at least 1 (Steps of linear warmup"),
    (dict(training_config__model__optim__sched__min_lr=5e-4),
     "recipe: training_config.model.optim.sched.min_lr 0.0005 must be below training_config.model.optim.lr (0.0003)"),
    (dict(training_config__model__attention_dropout=1.5),
     "recipe: training_config.model.attention_dropout 1.5 must be below 1"),
    (dict(training_config__trainer__max_epochs=0), "recipe: training_config.trainer.max_epochs 0 must be at least 1"),
    (dict(training_config__trainer__max_steps=10), "recipe: give training_config.trainer.max_epochs or "
                                                   "training_config.trainer.max_steps, not both"),
    (dict(training_config__model__optim__sched__name="step"),
     "training_config.model.optim.sched.name 'step' must be 'cosine', 'linear' or 'constant'"),
    (dict(training_config__model__optim__name="sgd"),
     "training_config.model.optim.name 'sgd' must be 'adamw', 'distributed_fused_adam' or 'fused_adam'"),
    (dict(training_config__model__optim__adam_w_mode=False), "training_config.model.optim.adam_w_mode False must be True"),
    (dict(training_config__model__optim__betas=[0.9]),
     "training_config.model.optim.betas [0.9] must have at least 2 item(s)"),
    (dict(training_config__model__optim__betas=[0.9, 1.0]), "recipe: training_config.model.optim.betas[1] 1.0 must be below 1"),
    (dict(training_config__max_lenght=256),
     "recipe: training_config.max_lenght is not a recipe key; the keys allowed under training_config are max_length"),
    (dict(run__model_typ="amazon.nova-lite-v1:0:300k"),  # Nova's run.model_type is accepted: tests/test_nova.py
     "recipe: run.model_typ is not a recipe key; the keys allowed under run are name, model_name_or_path"),
    (dict(run__model="m"), "run.model is not a recipe key; the keys allowed under run are name, model_name_or_path"),
    (dict(training_config__max_length=1000000.5), "recipe: training_config.max_length 1000000.5 must be a whole number"),
    (dict(training_config__model__peft__peft_scheme="dora"),
     "training_config.model.peft.peft_scheme 'dora' must be 'lora'"),
    (dict(training_config__model__peft__lora_tuning={"alpha": 48}),
     "recipe: training_config.model.peft.lora_tuning.alpha 48 must be 32, 64, 96, 128, 160 or 192"),
    (dict(training_config__model__peft__lora_tuning={"adapter_dropout": 1.0}),
     "training_config.model.peft.lora_tuning.adapter_dropout 1.0 must be below 1"),
    (dict(training_config__model__peft__lora_tuning={"loraplus_lr_ratio": 120}),
     "training_config.model.peft.lora_tuning.loraplus_lr_ratio 120 must be at most 100"),
    (dict(training_config__model__peft__lora_tuning={"rank": 0}), "lora_tuning.rank 0 must be at least 1"),
    (dict(training_config__model__peft__lora_tuning={"target_modules": []}),
     "lora_tuning.target_modules must be all-linear or a non-empty list of module names"),
    (dict(training_config__model__peft__lora_tuning={"target_modules": 5}), "lora_tuning.target_modules 5 is not valid"),
    (dict(training_config__early_stopping={"monitor": "train_loss"}),
     "training_config.early_stopping.monitor 'train_loss' must be 'val_loss'"),
    (dict(training_config__early_stopping={"patience": 0}), "training_config.early_stopping.patience 0 must be at least 1"),
    (dict(training_config__save_top_k=0), "recipe: training_config.save_top_k 0 must be at least 1"),
    (dict(training_config__seed=True), "recipe: training_config.seed True must be a whole number"),
    (dict(training_config__model__hidden_dropout=1.5), "training_config.model.hidden_dropout 1.5 must be below 1"),
    (dict(training_config__deepspeed={"offload_optimizer": True}),
     "recipe: training_config.deepspeed.offload_optimizer needs training_config.deepspeed.zero_stage 1, 2 or 3"),
    (dict(training_config__deepspeed={"zero_stage": 4}),
     "training_config.deepspeed.zero_stage 4 must be 0, 1, 2 or 3"),
    (dict(training_config__deepspeed={"processes": 3}),
     "recipe: training_config.global_batch_size 8 must be a multiple of training_config.micro_batch_size 4 x "
     "training_config.deepspeed.processes 3"),
    (dict(training_config__deepspeed={"nodes": 2}),
     "recipe: training_config.deepspeed.nodes 2 needs training_config.deepspeed.processes: the ranks on each machine"),
    (dict(training_config__deepspeed={"nodes": 3, "processes": 1}),
     "recipe: training_config.global_batch_size 8 must be a multiple of training_config.micro_batch_size 4 x "
     "training_config.deepspeed.processes 1 x training_config.deepspeed.nodes 3"),
    (dict(run__eval_data_path=None), "recipe: training_config.trainer.val_check_interval needs run.eval_data_path"),
    (dict(run__register_to=None), "register_to is missing: pass register_to or set run.register_to in the recipe"),
    (dict(training_config__trainer=[1]), "recipe: training_config.trainer [1] must be a mapping"),
])
def test_bad_recipes_name_the_file_the_key_and_the_fix(changes, message):
    with pytest.raises(InvalidInputError) as error:
        configure(recipe(**changes))
    assert message in str(error.value)


def test_an_argument_is_named_as_the_argument_and_a_recipe_key_with_its_file(tmp_path):
    with pytest.raises(InvalidInputError) as error:
        configure(EXAMPLE, {"context_length": 2})
    assert str(error.value).startswith("context_length 2 must be at least 8")
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(recipe(training_config__max_length=2)))
    with pytest.raises(InvalidInputError) as error:
        configure(tmp_path / "short.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'short.yaml'}: training_config.max_length 2 must be at least 8")


def test_a_file_that_is_not_yaml_names_its_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("run:\n  model: a\n training_config: [\n")
    with pytest.raises(InvalidInputError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(InvalidInputError, match="recipe .*missing.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(InvalidInputError, match="must be a mapping with the sections run and training_config"):
        load_recipe(tmp_path / "list.yaml")


def test_a_resolved_config_written_as_yaml_is_a_recipe_for_the_same_run(tmp_path):
    config = configure(EXAMPLES / "lora.yaml", {"learning_rate": 5e-4, "context_length": 128})
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(config.to_recipe(), sort_keys=False))
    assert configure(tmp_path / "resolved.yaml") == config
