"""Amazon Nova's published recipes load as their users wrote them (tests/data/nova/, copies with only the model and
data paths changed): the keys that mean something here take effect, the keys only Amazon's service acts on are
named once and ignored, a typo still gets the nearest key, and a DPO recipe loads as a DPO run."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.errors import InvalidInputError
from tasks.recipe import configure, read_yaml
from tasks.run_record import current_user
from tasks.tracking import tracking_uri
from tasks.ports import free_port
from conftest import answers, wait_for

NOVA = Path(__file__).parent / "data" / "nova"
AMAZON_RUN_KEYS = {"run.model_type", "run.replicas", "run.output_s3_path"}
LONG = NOVA / "nova_sft_long_keys_of_issue_28.yaml"


def load(path: Path, **shorthands):
    """The recipe as `tessera create --recipe` reads it, with register_to (which Nova's recipes do not hold)."""
    return configure(path, {"register_to": "main.nova", **shorthands})


@pytest.mark.parametrize("name, task_type, duration, batch, length, lr, min_lr, peft, alpha, loraplus", [
    ("nova_micro_1_0_p5_p4d_gpu_sft", "CHAT_COMPLETION", "1ep", 16, 32768, 5e-6, 5e-7, None, None, None),
    ("nova_micro_1_0_p5_p4d_gpu_lora_sft", "CHAT_COMPLETION", "2ep", 64, 32768, 1e-5, 1e-6, "lora", 128, 16.0),
    ("nova_lite_1_0_p5_p4d_gpu_sft", "CHAT_COMPLETION", "1ep", 16, 32768, 5e-6, 5e-7, None, None, None),
    ("nova_pro_1_0_p5_p4d_gpu_lora_sft", "CHAT_COMPLETION", "2ep", 32, 32768, 1e-5, 1e-6, "lora", 128, 16.0),
    ("nova_micro_1_0_p5_p4d_gpu_dpo", "DPO", "3ep", 64, 16384, 1e-5, 1e-6, None, None, None),
    ("nova_micro_1_0_p5_p4d_gpu_lora_dpo", "DPO", "2ep", 64, 16384, 1e-5, 1e-6, "lora", 64, 20.0),
])
def test_each_published_nova_recipe_loads_with_its_meaning(name, task_type, duration, batch, length, lr, min_lr, peft,
                                                            alpha, loraplus):
    config = load(NOVA / f"{name}.yaml")
    run, training = config.run, config.training_config
    optim, lora = training.model.optim, training.model.peft.lora_tuning
    assert (run.model_name_or_path, run.train_data_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "examples/data/tessera_chat.jsonl")
    assert (run.task_type, str(config.duration), training.global_batch_size, training.max_length) == (
        task_type, duration, batch, length)
    assert (optim.name, optim.lr, optim.sched.min_lr, optim.sched.warmup_steps, optim.betas) == (
        "distributed_fused_adam", lr, min_lr, 10, [0.9, 0.999])
    assert training.model.peft.peft_scheme == peft
    if peft:
        assert (lora.alpha, lora.loraplus_lr_ratio, lora.adapter_dropout) == (alpha, loraplus, 0.01)
    kind = "lora" if peft else "fullrank"  # their MLflow keys take effect: the experiment and the run's name
    assert (run.experiment_path, run.mlflow_run_name) == (f"/Users/{current_user()}/my-{kind}-experiment",
                                                          f"my-{kind}-run")
    assert set(config.amazon_only) == AMAZON_RUN_KEYS
    assert training.model.dpo_cfg.beta == 0.1


@pytest.mark.parametrize("name, run_name, peft, alpha, loraplus, ignored", [
    ("nova_lite_2_0_p5_gpu_sft", "my-full-rank-sft-run", None, 32, 0.0, ()),
    ("nova_lite_2_0_p5_gpu_lora_sft", "my-lora-sft-run", "lora", 64, 64.0, ("training_config.model_importance_score",)),
])
def test_each_nova_2_recipe_loads_from_its_flatter_layout(name, run_name, peft, alpha, loraplus, ignored):
    """Nova 2.0 keeps max_steps, the schedule, the optimizer and PEFT directly under training_config, says full rank
    with the string 'null', and checkpoints at ${oc.select:training_config.max_steps}."""
    config = load(NOVA / f"{name}.yaml")
    training = config.training_config
    optim, lora = training.model.optim, training.model.peft.lora_tuning
    assert (str(config.duration), training.save_steps, training.save_top_k, training.global_batch_size) == (
        "100ba", 100, 5, 32)
    assert (optim.lr, optim.weight_decay, optim.betas, optim.sched.warmup_steps, optim.sched.min_lr) == (
        1e-5, 0.0, [0.9, 0.95], 15, 1e-6)
    assert (training.model.peft.peft_scheme, lora.alpha, lora.loraplus_lr_ratio) == (peft, alpha, loraplus)
    assert config.run.mlflow_run_name == run_name
    assert set(config.amazon_only) == AMAZON_RUN_KEYS | {"training_config.reasoning_enabled", *ignored}


def test_a_nova_2_recipes_betas_and_typos_are_named_as_written(tmp_path):
    recipe = read_yaml((NOVA / "nova_lite_2_0_p5_gpu_lora_sft.yaml").read_text())
    recipe["training_config"]["optim_config"]["adam_beta2"] = 0.98
    assert load(recipe).training_config.model.optim.betas == [0.9, 0.98]
    recipe["training_config"]["optim_config"]["adam_beta2"] = 1.5
    recipe["training_config"]["lr_scheduler"]["warmup_step"] = 3
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InvalidInputError) as error:
        load(tmp_path / "recipe.yaml")
    assert str(error.value).splitlines() == [
        f"{tmp_path / 'recipe.yaml'}: training_config.lr_scheduler.warmup_step is not a recipe key; did you mean "
        "warmup_steps?",
        f"{tmp_path / 'recipe.yaml'}: training_config.optim_config.adam_beta2 1.5 must be below 1 (AdamW's two betas, "
        "each in [0, 1)): e.g. [0.9, 0.95]"]
    recipe["training_config"]["lr_scheduler"] = "cosine"  # a section of Nova's written as a value
    with pytest.raises(InvalidInputError, match=r"training_config.lr_scheduler 'cosine' must be a mapping with the keys "
                                                r"min_lr, warmup_steps"):
        load(recipe)


def test_the_long_sft_recipes_keys_take_effect():
    config = load(LONG)
    run, training = config.run, config.training_config
    trainer = training.trainer
    assert (run.task_type, run.eval_data_path) == ("CHAT_COMPLETION", "examples/data/tessera_chat_eval.jsonl")
    assert (str(config.duration), trainer.max_epochs) == ("120ba", None)  # max_epochs -1: max_steps decides
    assert (trainer.val_check_interval, trainer.log_every_n_steps, trainer.gradient_clip_val) == (20, 5, 1.0)
    # exp_manager's callbacks: every_n_train_steps is ${recipes.training_config.trainer.val_check_interval}
    assert (training.save_steps, training.save_top_k) == (20, 3)
    stopping = training.early_stopping
    assert (stopping.monitor, stopping.patience, stopping.min_delta) == ("val_loss", 3, 0.001)
    assert training.model.optim.sched.name == "cosine"  # CosineAnnealing
    assert (run.experiment_path, run.mlflow_run_name) == (f"/Users/{current_user()}/my-sft-run-experiment",
                                                          "my-sft-run")  # ${recipes.run.name}
    assert config.amazon_only == (
        "run.model_type", "run.replicas", "run.output_s3_path", "training_config.training_validation",
        "training_config.exp_manager.exp_dir", "training_config.model.sequence_parallel",
        "training_config.model.mm_cfg", "training_config.model.optim.bucket_cap_mb",
        "training_config.model.optim.overlap_grad_sync", "training_config.model.optim.contiguous_grad_buffer")


def test_a_nova_recipes_resolved_config_is_tesseras_layout_and_runs_it_again(tmp_path):
    config = load(LONG)
    resolved = config.to_recipe()
    assert set(resolved["run"]) >= {"experiment_path", "mlflow_run_name"}
    assert not {"model_type", "replicas", "output_s3_path", "data_s3_path", "mlflow_experiment_name"} & set(
        resolved["run"])
    assert not {"exp_manager", "training_validation"} & set(resolved["training_config"])
    assert not {"sequence_parallel", "mm_cfg"} & set(resolved["training_config"]["model"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    again = configure(tmp_path / "recipe.yaml")
    assert again == config and again.amazon_only == ()


@pytest.mark.parametrize("path, value, message", [
    ("training_config.exp_manager.checkpoint_callback_params.every_n_train_step", 5,
     "training_config.exp_manager.checkpoint_callback_params.every_n_train_step is not a recipe key; did you mean "
     "every_n_train_steps?"),
    ("training_config.model.optim.overlap_grad_synk", False,
     "training_config.model.optim.overlap_grad_synk is not a recipe key; the keys allowed under "
     "training_config.model.optim are name, adam_w_mode"),
    ("training_config.model.optim.overlap_grad_synk", False, "; did you mean overlap_grad_sync?"),
    ("training_config.trainer.max_epoch", 2, "; did you mean max_epochs?"),
    ("run.replica", 2, "recipe.yaml: run.replica is not a recipe key"),
    ("run.replica", 2, "; did you mean replicas?"),
])
def test_a_typo_is_refused_naming_the_path_and_the_nearest_key(tmp_path, path, value, message):
    recipe = read_yaml(LONG.read_text())
    *sections, key = path.split(".")
    section = recipe
    for name in sections:
        section = section[name]
    section[key] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InvalidInputError) as error:
        load(tmp_path / "recipe.yaml")
    assert message in str(error.value)


def test_max_epochs_minus_one_needs_max_steps_or_another_duration(tmp_path):
    recipe = read_yaml(LONG.read_text())
    del recipe["training_config"]["trainer"]["max_steps"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InvalidInputError, match=r"recipe.yaml: training_config.trainer.max_epochs -1 means 'stop at "
                                                r"max_steps' \(Nova's\): set training_config.trainer.max_steps"):
        load(tmp_path / "recipe.yaml")
    assert str(load(tmp_path / "recipe.yaml", training_duration="30ba").duration) == "30ba"


def test_an_interpolation_of_a_missing_key_is_a_typed_error(tmp_path):
    (tmp_path / "recipe.yaml").write_text(LONG.read_text().replace("${recipes.run.name}-experiment",
                                                                   "${recipes.run.nmae}-experiment"))
    with pytest.raises(InvalidInputError) as error:
        load(tmp_path / "recipe.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'recipe.yaml'}: run.mlflow_experiment_name: ")
    assert "nmae" in str(error.value) and "a ${...} must name a key of the recipe" in str(error.value)


def test_mlflow_tracking_uri_is_the_store_in_use_amazons_or_a_server_of_the_users(tmp_path):
    recipe = read_yaml((NOVA / "nova_micro_1_0_p5_p4d_gpu_sft.yaml").read_text())
    recipe["run"]["mlflow_tracking_uri"] = tracking_uri()  # every run is tracked there: nothing more to do
    assert load(recipe).run.mlflow_tracking_uri is None and load(recipe).run.mlflow_run_name == "my-fullrank-run"
    recipe["run"]["mlflow_tracking_uri"] = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/mine"
    assert "run.mlflow_tracking_uri" in load(recipe).amazon_only
    recipe["run"]["mlflow_tracking_uri"] = "http://mlflow.elsewhere:5000/"
    assert load(recipe).run.mlflow_tracking_uri == "http://mlflow.elsewhere:5000"  # logged to as well: the e2e test
    for uri, message in (("file:///tmp/mlruns", r"must be an MLflow tracking server's http\(s\) URL"),
                         ("https://me:secret@mlflow.elsewhere", "must not hold a login .* ~/.netrc")):
        recipe["run"]["mlflow_tracking_uri"] = uri
        with pytest.raises(InvalidInputError, match=rf"run.mlflow_tracking_uri '{uri}' {message}"):
            load(recipe)


def test_a_dpo_recipe_loads_as_a_dpo_run_that_passes_the_path_checks():
    from tasks.validate_paths import check_paths

    recipe = NOVA / "nova_micro_1_0_p5_p4d_gpu_dpo.yaml"
    config = check_paths(load(recipe, context_length=256))  # once refused here: DPO trains now
    assert (config.run.task_type, config.training_config.model.dpo_cfg.beta) == ("DPO", 0.1)
    assert config.training_config.model.dpo_cfg.loss_type == "sigmoid"  # Nova's recipes name no loss: DPO's own
    written = read_yaml(recipe.read_text())
    written["run"]["task_type"] = "dpo"  # Nova's lower-case name, said outright
    written["training_config"]["model"]["dpo_cfg"]["beta"] = 0.05
    assert (load(written).run.task_type, load(written).training_config.model.dpo_cfg.beta) == ("DPO", 0.05)


@pytest.fixture
def users_mlflow_server(tmp_path) -> Iterator[str]:
    """An MLflow tracking server of the user's own (not Tessera's store), as `mlflow server` starts one."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'own.db'}", "--workers", "1",
                               "--default-artifact-root", (tmp_path / "own-artifacts").as_uri()],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    try:
        while not answers(url):
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
def test_a_nova_lora_recipe_runs_from_the_cli_and_names_the_amazon_keys_once(fm, tiny_model_dir, chat_file, tmp_path,
                                                                             users_mlflow_server, monkeypatch, capsys):
    """`tessera create --recipe` with Nova's LoRA recipe as published: the model, data and registry from the usual
    arguments, and what the tiny model needs (its context, a batch its 24 conversations fill) from --set; its
    mlflow_tracking_uri naming the user's own MLflow server, where the run is logged as well."""
    from mlflow import MlflowClient

    from cli import main as cli

    recipe = tmp_path / "nova_micro_1_0_p5_p4d_gpu_lora_sft.yaml"
    recipe.write_text((NOVA / recipe.name).read_text().replace(
        'mlflow_tracking_uri: ""', f'mlflow_tracking_uri: "{users_mlflow_server}"'))
    monkeypatch.setattr(sys, "argv", [
        "tessera", "create", str(tiny_model_dir), chat_file, "main.nova", "--recipe", str(recipe),
        "--context-length", "64", "--set", "training_config.global_batch_size=8"])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    out = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0, out
    warned = ("warning: run.model_type, run.replicas, run.output_s3_path: mean something only on Amazon's service "
              "(SageMaker HyperPod or training jobs); accepted and ignored here")
    assert out.count("warning:") == 1 and warned in out, out
    name = out.split("created ")[1].split()[0]
    run = wait_for(fm.get(name))
    assert run.status == fm.RunStatus.COMPLETED, run.details
    warnings = [e for e in fm.get_events(run) if e.type == "WARNING"]
    assert len(warnings) == 1 and warnings[0].payload["keys"] == "run.model_type, run.replicas, run.output_s3_path"
    from tasks.tracking import client

    mlflow_run = client().get_run(run.run_id)
    assert mlflow_run.info.run_name == "my-lora-run"
    assert client().get_experiment(mlflow_run.info.experiment_id).name == f"/Users/{current_user()}/my-lora-experiment"
    lora = run.config.training_config.model.peft
    assert (lora.peft_scheme, lora.lora_tuning.alpha, lora.lora_tuning.loraplus_lr_ratio) == ("lora", 128, 16.0)
    beside = Path(client().download_artifacts(run.run_id, "config/resolved.yaml")).read_text()
    assert "model_type" not in beside and "replicas" not in beside and configure(read_yaml(beside)) == run.config
    # The user's server has the run too, as Nova's trainer logs it there: named, its parameters, metrics, end.
    own = MlflowClient(users_mlflow_server)
    [twin] = own.search_runs([own.get_experiment_by_name(f"/Users/{current_user()}/my-lora-experiment").experiment_id])
    assert (twin.info.run_name, twin.info.status, twin.data.tags["tessera.run_name"]) == ("my-lora-run", "FINISHED",
                                                                                         name)
    assert twin.data.params == {k: v for k, v in mlflow_run.data.params.items() if "." in k}  # the config's
    assert [m.step for m in own.get_metric_history(twin.info.run_id, "loss")] == \
        [m.step for m in client().get_metric_history(run.run_id, "loss")] != []


@pytest.mark.e2e
def test_a_tracking_server_that_does_not_answer_is_refused_before_the_run_exists(fm, tiny_model_dir, chat_file):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    before = len(fm.list())
    with pytest.raises(InvalidInputError, match=rf"run.mlflow_tracking_uri {url}: the MLflow server there did not "
                                                r"take the run \(.*\): start it, correct the URL, or remove the key"):
        fm.create(str(tiny_model_dir), chat_file, "main.nova", overrides={"run.mlflow_tracking_uri": url})
    assert len(fm.list()) == before
