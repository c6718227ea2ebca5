"""Whole runs through the real embedded services: Prefect server + runner, MLflow store, DeepSpeed worker."""

import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pyarrow as pa
import pytest
import yaml
from deltalake import write_deltalake

from tasks.data.prepare import EVIDENCE
from tasks.errors import InvalidInputError
from tasks.home import tables_root, volumes_root
from tasks.recipe import configure
from tasks.run_record import RunRecord
from tasks.tracking import client, load_components
from tasks.training.checkpoint_names import tag_step
from conftest import CHAT, wait_for

pytestmark = pytest.mark.e2e


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_a_run_goes_from_s3_data_to_a_registered_model(fm, tiny_model_dir, s3, tmp_path, monkeypatch):
    """Trained on S3 data, evaluated on a volume: every step's event, the data's evidence, metrics, checkpoints and
    a registered model that loads and generates."""
    # A record no earlier session wrote: the runner's download and prepared-data caches miss, so the run fetches.
    fresh = {"messages": [{"role": "user", "content": "Which session is this?"},
                          {"role": "assistant", "content": f"Session {uuid.uuid4().hex}."}]}
    s3.create_bucket(Bucket="tessera-data")
    s3.put_object(Bucket="tessera-data", Key="chat/train.jsonl", Body=jsonl([*CHAT, fresh]).encode())
    held_out = Path(volumes_root(), "main", "test", "raw", "eval.jsonl")
    held_out.parent.mkdir(parents=True)
    held_out.write_text(jsonl([fresh, *CHAT[:5]]))
    run = fm.create(model=str(tiny_model_dir), train_data_path="s3://tessera-data/chat/train.jsonl",
                    eval_data_path="dbfs:/Volumes/main/test/raw/eval.jsonl", register_to="main.test",
                    training_duration="2ep", learning_rate=1e-3, context_length=64, eval_prompts=["Hi there"])
    assert re.fullmatch(r"ift-tiny-llama\d*-[a-z0-9]{6}", run.name)
    assert not run.status.is_terminal()  # create() returns at once

    events = list(fm.get_events(run, follow=True))
    types = [e.type for e in events]
    assert types[0] == "CREATED" and types[-1] == "COMPLETED", [(e.type, e.message) for e in events]
    order = ["CREATED", "STARTED", "DATA_VALIDATED", "MODEL_INITIALIZED", "TRAIN_UPDATED", "TRAIN_FINISHED", "COMPLETED"]
    assert [t for t in types if t in order] == sorted([t for t in types if t in order], key=order.index)
    assert set(order) <= set(types)
    updates = [e.message for e in events if e.type == "TRAIN_UPDATED"]
    assert all(re.fullmatch(r"\[epoch=\d/2\]\[batch=\d+/\d+\]\[ETA=\S+\] Train loss: \d+\.\d\d", m) for m in updates), updates
    (validated,) = [e for e in events if e.type == "DATA_VALIDATED"]  # the train split's; eval's is logged only
    p = validated.payload
    assert (p["num_records"], p["num_examples"], p["num_invalid"], p["num_dropped"]) == (25, 25, 0, 0)
    assert 0 < p["num_loss_tokens"] < p["num_tokens"] <= p["num_rows"] * 64
    assert p["training_tokens"] == 2 * (p["num_rows"] // 8 * 8 * 64)  # 2ep: whole global batches of 8 rows of 64
    assert f"25 examples, {p['num_tokens']:,} tokens in {p['num_rows']} rows of 64" in validated.message

    run = wait_for(run, {fm.RunStatus.COMPLETED})
    assert run.completed_at and run.started_at and run.run_id and run.experiment_id
    assert re.fullmatch(rf"/Users/[^/]+/{run.name}", run.experiment_path)
    worker_log = (RunRecord.load(run.name).logs / "worker.log").read_text()
    assert "worker started warm" in worker_log, worker_log[-2000:]  # forked from the runner's warm-start server
    assert fm.get(run.name).status == fm.RunStatus.COMPLETED
    assert run.name in [r.name for r in fm.list(statuses=["COMPLETED"])]

    checkpoints = fm.get_checkpoints(run)
    assert checkpoints and all(re.search(rf"/{run.name}/checkpoints/ep\d-ba\d+$", c) for c in checkpoints)
    assert Path(checkpoints[-1].removeprefix("file://")).is_dir()

    store = client()
    for split, source, count in (("train", "s3://tessera-data/chat/train.jsonl", 25),
                                 ("eval", "dbfs:/Volumes/main/test/raw/eval.jsonl", 6)):
        logged = {Path(a.path).name for a in store.list_artifacts(run.run_id, f"data/{split}")}
        assert set(EVIDENCE) <= logged, logged
        report = Path(store.download_artifacts(run.run_id, f"data/{split}/report.txt")).read_text()
        assert report == f"{source}: {count} valid CHAT_COMPLETION records\n"
    stats = json.loads(Path(store.download_artifacts(run.run_id, "data/train/stats.json")).read_text())
    assert (stats["num_examples"], stats["num_tokens"]) == (25, p["num_tokens"])
    quality = json.loads(Path(store.download_artifacts(run.run_id, "data/train/quality.json")).read_text())
    assert quality["success"] and quality["failed"] == []
    assert len(store.get_metric_history(run.run_id, "loss")) >= 2
    assert len(store.get_metric_history(run.run_id, "eval_loss")) == 2  # at each epoch's checkpoint
    table = store.load_table(run.experiment_id, "eval_generations.json", run_ids=[run.run_id])
    last = tag_step(checkpoints[-1].rsplit("/", 1)[1])
    assert (table["batch"].min(), table["batch"].max()) == (0, last)  # before training, and at each checkpoint
    assert all(table["response"].str.len() > 0)

    registered = f"main.test.{run.name}"
    version = store.get_model_version_by_alias(registered, "candidate")
    assert version.tags["tessera.run_name"] == run.name
    # Loaded as serving and retraining load it: from the default store's own files, no copy (test_shared_services
    # checks that a remote store's download does not outlive the load).
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    parts = load_components(f"models:/{registered}@candidate")
    assert not any(downloads.iterdir())
    prompt = parts["tokenizer"]("Hello", return_tensors="pt")
    generated = parts["model"].generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("overrides, message", [
    (dict(model="acme/no-such-model"), r"unknown model 'acme/no-such-model'"),
    (dict(model="/no/such/folder"), r"model folder /no/such/folder does not exist"),
    (dict(train_data_path="/no/such/train.jsonl"), r"train_data_path /no/such/train.jsonl does not exist"),
    (dict(register_to="main"), r"register_to 'main' is malformed"),
    (dict(task_type="CHAT"), r"task_type 'CHAT' must be 'CHAT_COMPLETION'"),
    (dict(training_duration="two epochs"), r"is not a duration"),
    (dict(context_length=4096), r"context_length 4096 exceeds the maximum of .* \(1024\)"),
    (dict(learning_rate=-1.0), r"learning_rate -1.0 must be at least 1e-06"),
    (dict(learning_rate=1e-4, recipe={"training_config": {"max_length": 4096}}),
     r"recipe: training_config.max_length 4096 exceeds the maximum of .* \(1024\)"),
    (dict(custom_weights_path="/no/such/ep1-ba4"), r"custom_weights_path /no/such/ep1-ba4 does not exist: pass a"),
    (dict(custom_weights_path="/tmp"), r"custom_weights_path /tmp is not a DeepSpeed checkpoint"),
])
def test_bad_input_is_refused_before_any_run_exists(fm, tiny_model_dir, chat_file, overrides, message):
    before = len(fm.list(include_details=False, limit=1000))
    args = dict(model=str(tiny_model_dir), train_data_path=chat_file, register_to="main.test")
    with pytest.raises(InvalidInputError, match=message):
        fm.create(**{**args, **overrides})
    assert len(fm.list(include_details=False, limit=1000)) == before


@pytest.mark.slow
def test_the_bundled_smollm2_fine_tunes_and_registers(fm, chat_file):
    """No eval prompts: two 100-token generations of a 135M model on a loaded CPU take a minute (the tiny model's
    runs test them)."""
    run = fm.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_data_path=chat_file, register_to="main.smol",
                    training_duration="1ba", learning_rate=1e-4, context_length=128)
    events = list(fm.get_events(run, follow=True))
    assert events[-1].type == "COMPLETED", events[-1].message
    assert events[-1].payload["registered_model"] == f"main.smol.{run.name}"


# Every data source through create() and fm.validate_data


def test_bad_records_fail_the_run_at_validation_with_where_and_what(fm, tiny_model_dir, tmp_path):
    """A file's bad record by line, a Delta table's by row: both runs fail at validate-data, the why kept."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    rows = [CHAT[0], {"messages": [{"role": "User", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            *CHAT[1:4]]
    write_deltalake(str(Path(tables_root(), "main", "test", "chats")), chat_table(rows))
    runs = [fm.create(model=str(tiny_model_dir), train_data_path=path, register_to="main.test", context_length=64)
            for path in (str(bad), "main.test.chats")]  # started together
    for run, said in zip(runs, ("bad.jsonl line 2, field messages[0].role: found 'bot'",
                                "main.test.chats row 2, field messages[0].role: found 'User'; use lowercase 'user'")):
        events = list(fm.get_events(run, follow=True))
        assert events[-1].type == "FAILED" and said in events[-1].message, events[-1].message
        assert "DATA_VALIDATED" not in [e.type for e in events]  # nothing past validation ran
        run = wait_for(run, {fm.RunStatus.FAILED})
        report = Path(client().download_artifacts(run.run_id, "data/train/report.txt")).read_text()
        assert said.split(": found")[0] in report  # why stays with the run


def chat_table(rows: list[dict]) -> pa.Table:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"messages": pa.array([row["messages"] for row in rows], pa.list_(message))})


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The public API without the services (validate_data needs none), with a prepared-data cache of its own."""
    from flows import foundation_model

    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    return foundation_model


def test_validate_data_reads_a_hugging_face_dataset_split(api, tiny_model_dir, tmp_path):
    import datasets

    folder = tmp_path / "chats"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT),
                          "test": datasets.Dataset.from_list(CHAT[:3])}).save_to_disk(str(folder))
    result = api.validate_data(f"{folder}/train", model=str(tiny_model_dir), context_length=64)
    assert result.ok, result.report
    assert result.report == f"{folder}/train: 24 valid CHAT_COMPLETION records"
    assert (result.stats["num_examples"], result.prepared.num_records) == (24, 24)
    assert result.training_tokens == result.prepared.num_rows // 8 * 8 * 64


def test_validate_data_reads_a_delta_table(api, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_TABLES_ROOT", str(tmp_path / "tables"))
    # Rows with `response` and rows with `completion`: the table holds both columns, null where not given.
    rows = [{"prompt": f"Q{i}: what is {i} + {i}?", "response": f" {2 * i}."} for i in range(12)]
    rows += [{"prompt": f"Q{i}: what is {i} times 3?", "completion": f" {3 * i}."} for i in range(12)]
    columns = {key: [row.get(key) for row in rows] for key in ("prompt", "response", "completion")}
    write_deltalake(str(tmp_path / "tables" / "main" / "demo" / "qa"), pa.table(columns))
    result = api.validate_data("main.demo.qa", task_type="INSTRUCTION_FINETUNE", model=str(tiny_model_dir),
                               context_length=64)
    assert result.ok, result.report
    assert result.report == "main.demo.qa: 24 valid INSTRUCTION_FINETUNE records"
    assert result.stats["num_examples"] == 24 and result.stats["num_truncated"] == 0


def test_validate_data_reads_a_folder_of_documents_on_s3(api, tiny_model_dir, s3):
    s3.create_bucket(Bucket="corpus")
    texts = {"books/a.txt": "Tessera fine-tunes language models. " * 40,
             "books/deep/b.txt": "Packing puts several documents in one row. " * 40,
             "books/c.txt": "Every run is a Prefect flow. " * 40, "books/notes.json": "{}"}
    for key, text in texts.items():
        s3.put_object(Bucket="corpus", Key=key, Body=text.encode())
    result = api.validate_data("s3://corpus/books", task_type="CONTINUED_PRETRAIN", model=str(tiny_model_dir),
                               context_length=64)
    assert result.ok, result.report
    assert result.report == "s3://corpus/books: 3 valid CONTINUED_PRETRAIN records"
    prepared = result.prepared
    assert prepared.num_examples == 3 and prepared.num_tokens > 3 * 200
    assert prepared.num_rows == -(-prepared.num_tokens // 64)  # documents run on from row to row
    assert result.training_tokens == prepared.num_rows // 8 * 8 * 64


def test_validate_data_reads_bedrock_conversations(api, tiny_model_dir, tmp_path):
    records = [{"schemaVersion": "bedrock-conversation-2024", "system": [{"text": "Be brief."}],
                "messages": [{"role": "user", "content": [{"text": f"What is {i} + {i}?"}]},
                             {"role": "assistant", "content": [{"text": f"{2 * i}."}, {"text": "Anything else?"}]}]}
               for i in range(24)]
    (tmp_path / "converse.jsonl").write_text(jsonl(records))
    result = api.validate_data(str(tmp_path / "converse.jsonl"), model=str(tiny_model_dir), context_length=64)
    assert result.ok, result.report
    assert result.report.endswith("converse.jsonl: 24 valid CHAT_COMPLETION records")
    assert result.stats["num_examples"] == 24 and result.quality["success"]
    assert result.training_tokens == result.prepared.num_rows // 8 * 8 * 64


def test_a_recipe_sets_the_engine_knobs_and_the_resolved_config_is_kept(fm, tiny_model_dir, chat_file):
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file, "eval_data_path": chat_file,
                "register_to": "main.test"},
        "training_config": {
            "max_length": 64, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 1, "save_top_k": 1,
            "early_stopping": {"monitor": "val_loss", "patience": 1, "min_delta": 100.0},  # 2nd eval stops it
            "trainer": {"max_steps": 6, "val_check_interval": 2},
            "model": {"optim": {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.99],
                                "sched": {"name": "linear", "warmup_steps": 1, "min_lr": 1e-4}}},
        },
    }
    run = fm.create(recipe=recipe, learning_rate=5e-4)  # an argument overrides the recipe
    run = wait_for(run, {fm.RunStatus.COMPLETED, fm.RunStatus.FAILED})
    assert run.status == fm.RunStatus.COMPLETED, run.details
    finished = next(e for e in fm.get_events(run, follow=True) if e.type == "TRAIN_FINISHED")  # stored a few s late
    assert finished.message.startswith("training stopped early at batch 4: eval loss did not improve")
    kept = [c.rsplit("/", 1)[-1] for c in fm.get_checkpoints(run)]
    assert len(kept) == 1 and re.fullmatch(r"ep\d-ba4", kept[0]), kept  # save_top_k=1

    mlflow.set_tracking_uri(f"sqlite:///{os.environ['TESSERA_HOME']}/mlflow/mlflow.db")
    client = mlflow.MlflowClient()
    params = client.get_run(run.run_id).data.params
    assert (params["training_config.model.optim.lr"], params["training_config.model.optim.sched.name"],
            params["training_config.model.optim.weight_decay"]) == ("0.0005", "linear", "0.01")
    # The resolved config, kept with the run and beside each checkpoint, is a recipe that runs it again.
    resolved_path = Path(client.download_artifacts(run.run_id, "config/resolved.yaml"))
    resolved = yaml.safe_load(resolved_path.read_text())
    assert resolved["training_config"]["model"]["optim"]["betas"] == [0.9, 0.99]
    assert resolved["training_config"]["trainer"]["max_steps"] == 6 and resolved["training_config"]["max_length"] == 64
    assert run.config == configure(resolved_path) == configure(recipe, {"learning_rate": 5e-4})
    beside = Path(client.download_artifacts(run.run_id, f"{run.name}/checkpoints/{kept[0]}/recipe.yaml"))
    assert configure(beside) == run.config
    # The embedded store holds them as hard links of the run folder's files, not a second copy of its GBs.
    stored = Path(urlparse(client.get_run(run.run_id).info.artifact_uri).path) / run.name / "checkpoints" / kept[0]
    assert os.path.samefile(stored / "recipe.yaml", RunRecord.load(run.name).checkpoints / kept[0] / "recipe.yaml")
    again = fm.create(recipe=str(resolved_path))
    assert again.config == run.config and again.experiment_path == f"/Users/{again.created_by}/{again.name}"
    assert fm.cancel(again) == 1
    lrs = [m.value for m in sorted(client.get_metric_history(run.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(5e-4)  # one warmup step, then linear decay towards min_lr
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and 1e-4 < lrs[-1] < 5e-4
    assert len(client.get_metric_history(run.run_id, "eval_loss")) >= 2  # every 2 steps


def test_a_lora_run_registers_a_merged_model_and_keeps_the_adapter(fm, tiny_model_dir, chat_file):
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file, "register_to": "main.test"},
        "training_config": {
            "max_length": 64, "global_batch_size": 4, "micro_batch_size": 2, "trainer": {"max_steps": 3},
            "model": {"optim": {"lr": 1e-3},
                      "peft": {"peft_scheme": "lora", "lora_tuning": {"alpha": 32, "rank": 8, "loraplus_lr_ratio": 8}}},
        },
    }
    run = wait_for(fm.create(recipe=recipe), {fm.RunStatus.COMPLETED, fm.RunStatus.FAILED})
    assert run.status == fm.RunStatus.COMPLETED, run.details

    mlflow.set_tracking_uri(f"sqlite:///{os.environ['TESSERA_HOME']}/mlflow/mlflow.db")
    registered = f"main.test.{run.name}"
    generator = mlflow.transformers.load_model(f"models:/{registered}@candidate")  # merged: no peft needed
    assert "Lora" not in type(generator.model).__name__
    assert generator("Hello", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("Hello")
    artifacts = mlflow.MlflowClient().list_artifacts(run.run_id, f"{run.name}/checkpoints/huggingface")
    exports = [a.path for a in artifacts if a.is_dir]
    adapter = [a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id, f"{exports[-1]}/adapter")]
    assert any(p.endswith("adapter_config.json") for p in adapter), adapter

    # Continued training: a new LoRA run from this one's latest checkpoint, named as the artifact store holds it.
    latest = fm.get_checkpoints(run)[-1].rsplit("/", 1)[0] + "/latest-sharded-rank0.symlink"
    assert latest.startswith("file://")
    again = wait_for(fm.create(recipe=recipe, custom_weights_path=latest), {fm.RunStatus.COMPLETED, fm.RunStatus.FAILED})
    assert again.status == fm.RunStatus.COMPLETED, again.details
    initialized = next(e for e in fm.get_events(again, follow=True) if e.type == "MODEL_INITIALIZED")
    assert initialized.message.endswith(f"initialized with the weights of {latest}: 3M parameters")
    spec = json.loads((Path(os.environ["TESSERA_HOME"]) / "runs" / again.name / "spec.json").read_text())
    assert Path(spec["init_from"]).name == fm.get_checkpoints(run)[-1].rsplit("/", 1)[-1]


