"""RunConfig, the one typed config: defaults, the anchor's arguments as shorthands, errors that name the setting as
it was given, the schema the Prefect UI renders, and run names."""

import re

import pytest

from tasks.config import Duration, RunConfig, TaskType, run_name_for
from tasks.errors import InvalidInputError
from tasks.recipe import SHORTHANDS, configure

ARGS = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path="train.jsonl", register_to="main.demo")


def config(**shorthands) -> RunConfig:
    return configure(shorthands={**ARGS, **shorthands})


@pytest.mark.parametrize("text, value, unit", [
    ("3ep", 3, "ep"), ("200ba", 200, "ba"), ("1_000_000tok", 1_000_000, "tok"), (" 2ep ", 2, "ep"),
])
def test_durations_parse_like_the_anchor(text, value, unit):
    assert Duration.parse(text) == Duration(value, unit)


@pytest.mark.parametrize("text", ["3", "3 epochs", "0ep", "ep", "1.5ep", "-2ba", "3EP"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(InvalidInputError, match=r"e\.g\. '3ep', '200ba' or '1_000_000tok'"):
        Duration.parse(text)


def test_each_shorthand_sets_its_path():
    c = config(task_type="INSTRUCTION_FINETUNE", experiment_path="/Users/a/x", eval_data_path="eval.jsonl",
               eval_prompts=["Hi"], custom_weights_path="/ckpt/ep1-ba4", allow_percentage_invalid_samples=5,
               context_length=256, learning_rate=1e-4, training_duration="15ep")
    assert (c.run.model_name_or_path, c.run.train_data_path, c.run.register_to) == tuple(ARGS.values())
    assert (c.run.task_type, c.run.experiment_path, c.run.eval_data_path) == (
        TaskType.INSTRUCTION_FINETUNE, "/Users/a/x", "eval.jsonl")
    assert (c.run.eval_prompts, c.run.custom_weights_path, c.run.allow_percentage_invalid_samples) == (
        ["Hi"], "/ckpt/ep1-ba4", 5)
    assert (c.training_config.max_length, c.training_config.model.optim.lr) == (256, 1e-4)
    assert c.training_config.trainer.max_epochs == 15 and str(c.duration) == "15ep"  # the anchor's users write 15ep
    assert str(config(training_duration="200ba").duration) == "200ba"
    assert config(training_duration="1_000_000tok").training_config.trainer.max_tokens == 1_000_000
    assert set(SHORTHANDS) == {"model", "train_data_path", "register_to", "task_type", "experiment_path",
                               "eval_data_path", "eval_prompts", "custom_weights_path",
                               "allow_percentage_invalid_samples", "context_length", "learning_rate",
                               "training_duration"}


def test_defaults_match_the_anchor_and_nova():
    c = config()
    assert (c.run.task_type, str(c.duration), c.training_config.max_length) == ("CHAT_COMPLETION", "1ep", None)
    optim = c.training_config.model.optim
    assert (optim.lr, optim.betas, optim.final_lr) == (5e-5, [0.9, 0.95], pytest.approx(5e-6))
    assert (c.training_config.seed, c.training_config.micro_batch_size, c.training_config.global_batch_size) == (
        17, 4, 8)
    lora = c.training_config.model.peft.lora_tuning
    assert (lora.loraplus_lr_ratio, lora.b_lr_scale) == (0.0, 1.0)  # Nova's 0: LoRA+ off, B learns at 1x
    assert c.registered_model_name("ift-x-abc123") == "main.demo.ift-x-abc123"
    assert config(register_to="main.demo.my_model").registered_model_name("ift-x") == "main.demo.my_model"


@pytest.mark.parametrize("shorthands, message", [
    (dict(task_type="chat"), "task_type 'chat' must be 'CHAT_COMPLETION', 'INSTRUCTION_FINETUNE', "
                             "'CONTINUED_PRETRAIN' or 'DPO'"),
    (dict(register_to="main"), "register_to 'main' is malformed (catalog.schema"),
    (dict(register_to="main.demo.model.extra"), "is malformed"),
    (dict(register_to="main.de mo"), "is malformed"),
    (dict(learning_rate=0), "learning_rate 0 must be at least 1e-06 (The peak learning rate"),
    (dict(learning_rate=2e-3), "learning_rate 0.002 must be at most 0.001"),
    (dict(learning_rate="5e-5"), "learning_rate '5e-5' must be a number"),
    (dict(training_duration="2 epochs"), "training_duration '2 epochs' is not a duration"),
    (dict(context_length=0), "context_length 0 must be at least 8"),
    (dict(context_length=256.0), "context_length 256.0 must be a whole number"),
    (dict(eval_prompts="What is Tessera?"), "eval_prompts 'What is Tessera?' must be a list"),
    (dict(eval_prompts=["ok", " "]), "eval_prompts must be non-empty strings"),
    (dict(allow_percentage_invalid_samples=101), "allow_percentage_invalid_samples 101 must be at most 100"),
    (dict(model=""), "model '' must not be empty"),
    (dict(register_to=None), "register_to is missing: pass register_to or set run.register_to in the recipe"),
])
def test_a_bad_argument_is_named_as_given_with_the_fix(shorthands, message):
    with pytest.raises(InvalidInputError) as error:
        configure(shorthands={**ARGS, **shorthands})
    assert message in str(error.value)


def test_every_problem_is_a_line():
    with pytest.raises(InvalidInputError) as error:
        configure(shorthands={**ARGS, "learning_rate": 1.0, "context_length": 4})
    assert str(error.value).splitlines() == [
        "context_length 4 must be at least 8 (The context length, at most the model's; null: min(8192, the model's "
        "maximum)): e.g. 4096",
        "learning_rate 1.0 must be at most 0.001 (The peak learning rate, reached after warmup: 1e-6 to 1e-3, the "
        "range full fine-tuning trains in (larger diverges, smaller barely moves)): e.g. 5e-05",
    ]


def test_overrides_set_any_path_and_unknown_paths_list_the_keys():
    c = configure(shorthands=ARGS, overrides={"training_config.trainer.max_steps": 40,
                                              "training_config.model.peft.peft_scheme": "lora"})
    assert (str(c.duration), c.training_config.model.peft.peft_scheme) == ("40ba", "lora")
    with pytest.raises(InvalidInputError, match=r"training_config.trainer.max_step is not a recipe key; the keys "
                                                r"allowed under training_config.trainer are max_epochs, max_steps"):
        configure(shorthands=ARGS, overrides={"training_config.trainer.max_step": 40})
    with pytest.raises(InvalidInputError, match=r"give training_config.trainer.max_epochs or "
                                                r"training_config.trainer.max_steps, not both"):
        configure(shorthands=ARGS, overrides={"training_config.trainer.max_steps": 4,
                                              "training_config.trainer.max_epochs": 1})


def test_a_rule_joining_settings_names_each_as_given():
    with pytest.raises(InvalidInputError, match=re.escape(
            "training_config.model.optim.sched.min_lr 0.0001 must be below learning_rate (5e-05)")):
        configure(shorthands={**ARGS, "learning_rate": 5e-5},
                  overrides={"training_config.model.optim.sched.min_lr": 1e-4})
    with pytest.raises(InvalidInputError, match=re.escape("min_lr 0.0001 must be below training_config.model.optim.lr")):
        configure(shorthands=ARGS, overrides={"training_config.model.optim.sched.min_lr": 1e-4})
    with pytest.raises(InvalidInputError, match=re.escape(
            "training_config.trainer.val_check_interval needs run.eval_data_path")):
        configure(shorthands=ARGS, overrides={"training_config.trainer.val_check_interval": 5})
    assert configure(shorthands={**ARGS, "eval_data_path": "e.jsonl"},
                     overrides={"training_config.trainer.val_check_interval": 5})
    dpo = "training_config.model.dpo_cfg."
    with pytest.raises(InvalidInputError, match=re.escape(
            f"{dpo}label_smoothing 0.1 applies to {dpo}loss_type sigmoid or simpo, not ipo: set it to 0")):
        configure(shorthands={**ARGS, "task_type": "DPO"}, overrides={f"{dpo}loss_type": "ipo",
                                                                      f"{dpo}label_smoothing": 0.1})
    with pytest.raises(InvalidInputError, match=re.escape(
            f"{dpo}beta 2 must be at most 0.1 (Nova's range, 0.001-0.1) with {dpo}loss_type sigmoid; only simpo "
            "takes up to 10")):
        configure(shorthands={**ARGS, "task_type": "DPO"}, overrides={f"{dpo}beta": 2.0})
    simpo = configure(shorthands={**ARGS, "task_type": "DPO"}, overrides={f"{dpo}loss_type": "simpo",
                                                                          f"{dpo}beta": 2.0})
    assert simpo.training_config.model.dpo_cfg.reference_free and simpo.training_config.model.dpo_cfg.simpo_gamma == 0.5


def test_the_config_round_trips_as_a_recipe_and_replace_checks_again():
    c = configure(shorthands={**ARGS, "learning_rate": 1e-4, "training_duration": "3ep"},
                  overrides={"training_config.model.peft.peft_scheme": "lora"})
    again = configure(c.to_recipe())
    assert again == c and again.to_recipe() == c.to_recipe()
    assert c.params()["training_config.model.optim.lr"] == 1e-4 and "run.eval_data_path" not in c.params()
    assert c.replace({"training_config.max_length": 512}).training_config.max_length == 512
    assert c.training_config.max_length is None  # frozen: replace made a copy
    with pytest.raises(Exception):
        c.replace({"training_config.max_length": 2})


def test_the_schema_is_nested_typed_described_and_closed():
    """What the Prefect UI's form renders and the server checks parameters against."""
    schema = RunConfig.model_json_schema()
    defs = schema["$defs"]
    assert schema["additionalProperties"] is False and set(schema["properties"]) == {"run", "training_config"}
    lr = defs["Optim"]["properties"]["lr"]
    assert (lr["minimum"], lr["maximum"], lr["default"]) == (1e-6, 1e-3, 5e-5) and "learning rate" in lr["description"]
    assert defs["Sched"]["properties"]["name"]["enum"] == ["cosine", "linear", "constant"]
    assert defs["Run"]["required"] == ["model_name_or_path", "train_data_path", "register_to"]
    assert all(d.get("additionalProperties") is False for d in defs.values() if d.get("type") == "object")
    assert defs["LoraTuning"]["properties"]["alpha"]["enum"] == [32, 64, 96, 128, 160, 192]


def test_run_names_follow_the_anchor_and_rfc1123():
    name = run_name_for("HuggingFaceTB/SmolLM2-135M-Instruct", "CHAT_COMPLETION")
    assert re.fullmatch(r"ift-smollm2-135m-instruct-[a-z0-9]{6}", name)
    assert run_name_for("m", "CONTINUED_PRETRAIN").startswith("contd-pretrain-m-")
    long = run_name_for("/models/" + "Very_Long.Name" * 10, "CONTINUED_PRETRAIN")
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)
    assert run_name_for("m", "CHAT_COMPLETION") != run_name_for("m", "CHAT_COMPLETION")
