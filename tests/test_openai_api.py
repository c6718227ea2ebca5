"""OpenAI's own Python client against `tessera serve`: files, a fine-tuning job from upload to a served model, events,
checkpoints, cancel, failures and refusals, each answer checked against the client's own types."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.fine_tuning_job import Method
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from conftest import CHAT, KEYS, PAIRS, worker_pids
from tasks.custom_weights import check_custom_weights
from tasks.recipe import configure
from tasks.ports import free_port

pytestmark = pytest.mark.e2e

USER, OTHER = "grace@example.com", "alan@example.com"
KEY, OTHER_KEY = KEYS[USER], KEYS[OTHER]


@pytest.fixture(scope="module")
def base_url(http_api) -> str:
    """The test session's HTTP API (two users' keys, a 1 MiB upload limit), OpenAI's surface of it."""
    return f"{http_api}/v1"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)


def shaped(raw: dict, kind) -> dict:
    """`raw` has exactly the fields of the client's type `kind`, each of its type (pydantic validates them)."""
    fields = {f.alias or name for name, f in kind.model_fields.items()}
    required = {f.alias or name for name, f in kind.model_fields.items() if f.is_required()}
    assert set(raw) <= fields and required <= set(raw), (set(raw) - fields, required - set(raw))
    kind.model_validate(raw)
    return raw


def raw(response) -> dict:
    return response.http_response.json()


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def wait_job(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 300):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in statuses:
            return job, seen
        assert job.status not in ("succeeded", "failed", "cancelled"), (job.status, job.error)
        time.sleep(1)
    raise AssertionError(f"{job_id} stayed {seen[-1]} for {timeout}s")


@pytest.fixture(scope="module")
def finished(client, tiny_model_dir):
    """One job from upload to success: the training and validation files, and the job as it ended."""
    train = client.files.create(file=("train.jsonl", jsonl(CHAT)), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", jsonl(CHAT[:6])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, validation_file=valid.id, suffix="support", seed=7,
        metadata={"team": "nlp", "ticket": "T-1"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 20}}})
    assert job.status in ("queued", "validating_files", "running")
    ended, seen = wait_job(client, job.id)
    return train, valid, job, ended, seen


def test_files_upload_list_read_and_delete(client, base_url):
    data = jsonl(CHAT)
    uploaded = client.files.create(file=("chats.jsonl", data), purpose="fine-tune")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == ("file", len(data),
                                                                                       "chats.jsonl", "fine-tune")
    shaped(raw(client.files.with_raw_response.retrieve(uploaded.id)), FileObject)
    assert client.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in client.files.list()]
    other = openai.OpenAI(base_url=base_url, api_key=OTHER_KEY, max_retries=0)
    assert uploaded.id not in [f.id for f in other.files.list()]
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)  # another user's file is as absent as one that never was
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", data), purpose="assistants")
    too_big = b"x" * (2**20 + 1)
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("big.jsonl", too_big), purpose="fine-tune")
    assert refused.value.status_code == 413 and "TESSERA_MAX_UPLOAD_MB" in refused.value.message


def test_a_job_trains_registers_and_serves_its_model(client, finished, fm):
    train, valid, created, job, seen = finished
    assert job.status == "succeeded", job.error
    assert seen[-1] == "succeeded" and set(seen) <= {"queued", "validating_files", "running", "succeeded"}
    got = shaped(raw(client.fine_tuning.jobs.with_raw_response.retrieve(job.id)), FineTuningJob)
    assert got["training_file"] == train.id and got["validation_file"] == valid.id and got["seed"] == 7
    assert got["hyperparameters"] == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 20.0}
    assert got["metadata"] == {"team": "nlp", "ticket": "T-1"} and got["error"] is None
    assert got["fine_tuned_model"].startswith("main.openai.support-") and got["trained_tokens"] > 0
    assert got["finished_at"] >= got["created_at"]
    run = fm.get(job.id.removeprefix("ftjob-"))
    assert run.created_by == USER and run.config.training_config.global_batch_size == 2
    assert run.learning_rate == pytest.approx(1e-3) and run.training_duration == "2ep"
    results = client.files.content(got["result_files"][0]).text.splitlines()
    assert results[0] == "step,train_loss,valid_loss" and len(results) > 1

    listed = client.fine_tuning.jobs.list(metadata={"team": "nlp"})
    assert [j.id for j in listed] == [job.id]
    assert not client.fine_tuning.jobs.list(metadata={"team": "vision"}).data
    shaped(raw(client.fine_tuning.jobs.with_raw_response.list())["data"][0], FineTuningJob)

    events = raw(client.fine_tuning.jobs.with_raw_response.list_events(job.id, limit=100))["data"]
    for event in events:
        shaped(event, FineTuningJobEvent)
    assert events[0]["data"]["tessera_type"] == "COMPLETED" and events[-1]["data"]["tessera_type"] == "CREATED"
    assert any(e["type"] == "metrics" for e in events)
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in page.data] == [e["id"] for e in events[:2]] and page.has_more
    assert [e.id for e in page.get_next_page().data] == [e["id"] for e in events[2:4]]

    checkpoints = raw(client.fine_tuning.jobs.checkpoints.with_raw_response.list(job.id))["data"]
    for checkpoint in checkpoints:
        shaped(checkpoint, FineTuningJobCheckpoint)
        check_custom_weights(checkpoint["fine_tuned_model_checkpoint"])  # a new job can start from it
    assert checkpoints[0]["step_number"] > checkpoints[-1]["step_number"] or len(checkpoints) == 1

    model = got["fine_tuned_model"]
    served = [m.id for m in client.models.list()]
    assert model in served and f"{model}@candidate" in served
    shaped(raw(client.models.with_raw_response.retrieve(model)), Model)
    messages = [{"role": "user", "content": "What is fact number 3?"}]
    answer = raw(client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8,
                                                                   temperature=0))
    shaped(answer, ChatCompletion)
    text = answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] <= 8 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    chunks = list(client.chat.completions.create(model=f"{model}@candidate", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        shaped(chunk.model_dump(exclude_unset=True), ChatCompletionChunk)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer["usage"]["completion_tokens"]
    chunks = chunks[:-1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # greedy: the same answer, streamed
    assert chunks[-1].choices[0].finish_reason == answer["choices"][0]["finish_reason"]
    sampled = [client.chat.completions.create(model=model, messages=messages, max_tokens=8, seed=5, n=2)
               for _ in range(2)]
    assert [c.index for c in sampled[0].choices] == [0, 1] and all(c.message.content for c in sampled[0].choices)
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    completion = shaped(raw(client.completions.with_raw_response.create(model=model, prompt="Fact 3 is", max_tokens=5,
                                                                        temperature=0)), Completion)
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] <= 5
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="main.openai.no-such-model", messages=messages)
    assert unknown.value.body["code"] == "model_not_found"

    # The fine-tuned model, fine-tuned further: from the last checkpoint of the run that made it.
    further = client.fine_tuning.jobs.create(model=model, training_file=train.id, hyperparameters={
        "n_epochs": 1, "batch_size": 2})
    assert wait_job(client, further.id)[0].status == "succeeded"
    again = fm.get(further.id.removeprefix("ftjob-"))
    assert again.model == run.model and again.custom_weights_path == checkpoints[0]["fine_tuned_model_checkpoint"]


def test_mlflow_serves_what_a_job_registered(finished, fm):
    """MLflow's own scoring server on the registered model's candidate alias."""
    from deployments import services

    model = finished[3].fine_tuned_model
    port = free_port()
    server = subprocess.Popen(
        [Path(sys.executable).with_name("mlflow"), "models", "serve", "-m", f"models:/{model}@candidate",
         "--env-manager", "local", "--port", str(port), "--host", "127.0.0.1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": services.mlflow_ui_url(),  # it starts uvicorn from PATH
             "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                    json={"inputs": ["Fact 3 is"], "params": {"max_new_tokens": 4}})
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(1)
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["predictions"][0], str)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_second_job_is_cancelled_and_a_malformed_file_fails_by_its_line(client, base_url, tiny_model_dir):
    many = [{"messages": [{"role": "user", "content": f"Tell me fact {j}."}, *c["messages"][1:]]}
            for j, c in enumerate(CHAT * 40)]  # rows enough for thousands of steps
    train = client.files.create(file=("train.jsonl", jsonl(many)), purpose="fine-tune")
    long = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id,
                                          hyperparameters={"n_epochs": 50, "batch_size": 1})
    bad = client.files.create(file=("broken.jsonl", jsonl(CHAT[:2]) + b'{"messages": [{"role": "bot"}]}\n'),
                              purpose="fine-tune")
    failing = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id)
    other = openai.OpenAI(base_url=base_url, api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(long.id)
    assert long.id not in [j.id for j in other.fine_tuning.jobs.list()]

    wait_job(client, long.id, ("running",))
    client.fine_tuning.jobs.cancel(long.id)
    cancelled, _ = wait_job(client, long.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert worker_pids(long.id.removeprefix("ftjob-")) == []
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(long.id)

    failed, _ = wait_job(client, failing.id)
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert failed.error.code == "invalid_training_file"
    assert f"training_file {bad.id} (broken.jsonl) line 3" in failed.error.message, failed.error.message
    shaped(raw(client.fine_tuning.jobs.with_raw_response.retrieve(failing.id)), FineTuningJob)


@pytest.mark.parametrize("request_body, param, said", [
    ({"method": {"type": "reinforcement"}}, "method.type", "Input should be 'supervised' or 'dpo'"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "greater than or equal to 1"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e6}}, "hyperparameters.learning_rate_multiplier", "20"),
    ({"integrations": [{"type": "wandb"}]}, "integrations", "at most 0 items"),
    ({"suffix": "Bad Suffix!"}, "suffix", "should match pattern"),
    ({"beta": 0.1}, "beta", "Extra inputs are not permitted"),
    ({"training_file": "file-nope"}, "training_file", "No such File object: file-nope"),
    ({"model": "gpt-4o-mini"}, "model", "'gpt-4o-mini' is not a model this server offers you"),
    ({"metadata": {"a:b": "c"}}, "metadata.a:b.[key]", "should match pattern"),
])
def test_what_tessera_cannot_do_is_refused_with_the_param(client, tiny_model_dir, request_body, param, said):
    train = client.files.create(file=("t.jsonl", jsonl(CHAT)), purpose="fine-tune")
    body = {"model": str(tiny_model_dir), "training_file": train.id} | request_body
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as refused:
        client.post("/fine_tuning/jobs", body=body, cast_to=FineTuningJob)
    assert refused.value.body["param"] == param and said in refused.value.body["message"], refused.value.body


def test_no_key_or_a_wrong_key_is_refused(base_url):
    for key in ("", "not-a-key-of-this-server"):
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=base_url, api_key=key or "x", max_retries=0,
                          default_headers={"Authorization": key}).models.list()
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"


def dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_a_dpo_job_trains_on_pairs_and_echoes_its_method(client, base_url, tiny_model_dir, fm):
    train = client.files.create(file=("pairs.jsonl", jsonl(PAIRS)), purpose="fine-tune")
    valid = client.files.create(file=("pairs_valid.jsonl", jsonl(PAIRS[:6])), purpose="fine-tune")
    method = dpo(beta=0.05, n_epochs=2, batch_size=2, learning_rate_multiplier="auto")
    other = openai.OpenAI(base_url=base_url, api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as hidden:  # another user's pairs are as absent as none
        other.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, method=method)
    assert hidden.value.body["param"] == "training_file"
    assert train.id not in [f.id for f in other.files.list()]

    created = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, validation_file=valid.id,
                         method=method, metadata={"method": "dpo"})
    hyperparameters = {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0}  # "auto": Tessera's rate
    echoed = {"type": "dpo", "dpo": {"hyperparameters": hyperparameters | {"beta": 0.05}}}
    assert created.method.model_dump(exclude_none=True) == echoed
    got = shaped(raw(client.fine_tuning.jobs.with_raw_response.retrieve(created.id)), FineTuningJob)
    assert got["method"] == echoed and got["hyperparameters"] == hyperparameters
    listed = [j for j in client.fine_tuning.jobs.list(metadata={"method": "dpo"})]
    assert [(j.id, j.method.model_dump(exclude_none=True)) for j in listed] == [(created.id, echoed)]
    run = fm.get(created.id.removeprefix("ftjob-"))
    assert run.task_type == "DPO" and run.config.training_config.model.dpo_cfg.beta == 0.05
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.list_events(created.id)
    assert created.id not in [j.id for j in other.fine_tuning.jobs.list()]

    job, seen = wait_job(client, created.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("main.openai.") and job.method.dpo.hyperparameters.beta == 0.05
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data


def test_a_dpo_job_on_a_bad_pair_fails_by_its_line(client, tiny_model_dir):
    bad = client.files.create(file=("pairs.jsonl", jsonl(PAIRS[:2] + [{**PAIRS[2], "non_preferred_output": []}])),
                              purpose="fine-tune")
    failing = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id, method=dpo())
    failed, _ = wait_job(client, failing.id)
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert f"training_file {bad.id} (pairs.jsonl) line 3" in failed.error.message, failed.error.message


@pytest.mark.parametrize("data, method, param, said", [
    ({"training_file": CHAT}, dpo(), "training_file",
     "line 1: found a conversation for the supervised method, not a preference pair; a dpo job trains on pairs"),
    ({"training_file": PAIRS, "validation_file": CHAT}, dpo(), "validation_file", "(v.jsonl) line 1: found a "
                                                                                  "conversation"),
    ({"training_file": PAIRS}, {"type": "supervised"}, "training_file",
     "(t.jsonl) line 1: found a preference pair, not a conversation; a supervised job trains on conversations"),
    ({"training_file": [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}]}, None, "training_file",
     "found a preference pair"),
    ({"training_file": PAIRS}, dpo(beta=0.5), "method.dpo.hyperparameters.beta",
     "method.dpo.hyperparameters.beta 0.5 must be at most 0.1"),
    ({"training_file": PAIRS}, dpo(beta=0), "method.dpo.hyperparameters.beta", "must be at least 0.001"),
    ({"training_file": PAIRS}, dpo(beta="strong"), "method.dpo.hyperparameters.beta", "should be a valid number"),
    ({"training_file": PAIRS}, dpo(n_epochs=0), "method.dpo.hyperparameters.n_epochs", "greater than or equal to 1"),
    ({"training_file": PAIRS}, dpo(batch_size=0), "method.dpo.hyperparameters.batch_size", "greater than or equal"),
    ({"training_file": PAIRS}, {"type": "dpo", "supervised": {}}, "method",
     "a dpo method takes its hyperparameters in method.dpo, not method.supervised"),
])
def test_a_dpo_jobs_bad_beta_or_data_is_refused_with_the_param(client, tiny_model_dir, data, method, param, said):
    body = {"model": str(tiny_model_dir)} | ({"method": method} if method else {})
    for field, records in data.items():
        body[field] = client.files.create(file=(f"{field[0]}.jsonl", jsonl(records)), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/fine_tuning/jobs", body=body, cast_to=FineTuningJob)
    assert refused.value.body["param"] == param and said in refused.value.body["message"], refused.value.body
    assert refused.value.body["type"] == "invalid_request_error"


def test_a_dpo_run_is_shown_as_a_dpo_job_with_what_it_resolved():
    """The echo itself, for any DPO run (one made through fm.create or a Nova recipe too): beta "auto" is the
    config's default."""
    from api.openai.jobs import resolved

    arguments = {"model": "m", "train_data_path": "pairs.jsonl", "register_to": "main.openai", "task_type": "DPO",
                 "training_duration": "3ep"}
    for overrides, beta in (({}, 0.1), ({"training_config.model.dpo_cfg.beta": 0.02}, 0.02)):
        config = configure(shorthands=arguments, overrides=overrides, called=None)
        hyperparameters, method = resolved(config, 1e-4)
        assert hyperparameters == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.0}
        assert method == {"type": "dpo", "dpo": {"hyperparameters": hyperparameters | {"beta": beta}}}
        Method.model_validate(method)
    supervised = configure(shorthands=arguments | {"task_type": "CHAT_COMPLETION"}, called=None)
    assert resolved(supervised, None)[1]["type"] == "supervised"
