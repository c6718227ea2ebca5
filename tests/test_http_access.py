"""One access rule on every surface of `tessera serve` (api/access.py), tried as an attacker would: bob's key against
alice's runs, files, models, checkpoints, MLflow objects and paths, over the SDK's GraphQL, the MLflow proxy and
OpenAI's /v1, on the real server and services, and under a bounded load."""

import asyncio
import http.client
import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from conftest import CHAT, KEYS

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.com", "bob@example.com"
ALICE_KEY, BOB_KEY = KEYS[ALICE], KEYS[BOB]
GRAPHQL = "/api/2.0/genai-mapi/graphql"
MLFLOW = "/api/2.0/mlflow"
LIST = """query($data: GetFinetunesPaginatedInput!) { getFinetunesPaginated(getFinetunesPaginatedData: $data) {
    finetunes { name createdByEmail details { trainDataPath } } } }"""
EVENTS = """query($name: String!) { getFinetuneEvents(getFinetuneEventsData: {name: $name}) { eventType } }"""
STOP = """mutation($names: [String!]) { stopFinetunes(getFinetunesData: {filters: {name: {in: $names}}}) { name } }"""
CREATE = """mutation($config: FinetuneConfigInput!) { createFinetune(createFinetuneData: {config: $config}) { name } }"""


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def server(http_api) -> str:
    """The test session's HTTP API: alice's and bob's keys, the tiny model's folder offered as a base model."""
    return http_api


def as_user(server: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def graphql(client: httpx.Client, query: str, **variables) -> dict:
    answer = client.post(GRAPHQL, json={"query": query, "variables": variables})
    assert answer.status_code in (200, 400), answer.text  # 400: an answer with errors and no data
    return answer.json()


@pytest.fixture(scope="module")
def alices(server, fm, tiny_model_dir):
    """Alice's uploaded file and a job of hers trained to the end: its run and its registered model."""
    alice = openai.OpenAI(base_url=f"{server}/v1", api_key=ALICE_KEY, max_retries=0)
    upload = alice.files.create(file=("private.jsonl", jsonl(CHAT)), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id, suffix="private",
                                        method={"type": "supervised", "supervised": {"hyperparameters": {
                                            "n_epochs": 1, "batch_size": 2}}})
    deadline = time.monotonic() + 300
    while (job := alice.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(1)
    assert job.status == "succeeded", job.error
    run = fm.get(job.id.removeprefix("ftjob-"))
    return {"file": upload, "job": job, "run": run, "model": job.fine_tuned_model}


def test_bob_sees_and_stops_none_of_alices_runs(server, fm, alices, tiny_model_dir):
    run = alices["run"]
    with as_user(server, BOB_KEY) as bob, as_user(server, ALICE_KEY) as alice:
        for data in ({}, {"entity": {"emails": [ALICE]}}, {"filters": {"name": {"in": [run.name]}}}):
            assert graphql(bob, LIST, data=data)["data"]["getFinetunesPaginated"]["finetunes"] == []
        mine = graphql(alice, LIST, data={})["data"]["getFinetunesPaginated"]["finetunes"]
        assert [r["name"] for r in mine] == [run.name] and mine[0]["createdByEmail"] == ALICE

        # Her events: refused exactly as a run that never was.
        hers = graphql(bob, EVENTS, name=run.name)["errors"][0]
        never = graphql(bob, EVENTS, name="ift-never-was-abc123")["errors"][0]
        assert hers["extensions"] == never["extensions"] == {"code": 404}
        assert hers["message"].replace(run.name, "X") == never["message"].replace("ift-never-was-abc123", "X")
        assert graphql(alice, EVENTS, name=run.name)["data"]["getFinetuneEvents"][-1]["eventType"] == "COMPLETED"

        # A running run of hers: bob's stop counts nothing and changes nothing; hers stops it.
        long = openai.OpenAI(base_url=f"{server}/v1", api_key=ALICE_KEY, max_retries=0).fine_tuning.jobs.create(
            model=str(tiny_model_dir), training_file=alices["file"].id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}})
        name = long.id.removeprefix("ftjob-")
        assert graphql(bob, STOP, names=[name])["data"]["stopFinetunes"] == []
        assert not fm.get(name).status.is_terminal() and fm.get(name).status != fm.RunStatus.TERMINATING
        assert [r["name"] for r in graphql(alice, STOP, names=[name])["data"]["stopFinetunes"]] == [name]


def test_bob_names_none_of_alices_paths_and_no_server_path(server, fm, alices, tiny_model_dir):
    from api.openai import files

    run = alices["run"]
    her_file = files.store().data_uri(alices["file"].id)  # where her upload lies on the server
    checkpoint = fm.get_checkpoints(run)[-1]
    local_checkpoint = next(Path(os.environ["TESSERA_HOME"], "runs", run.name, "checkpoints").glob("ep*"))
    base = {"model": str(tiny_model_dir), "trainDataPath": "dbfs:/Volumes/main/access/raw/none.jsonl",
            "trainingDuration": "2ba", "experimentTracker": {"mlflow": {"modelRegistryPath": "main.bob"}}}
    with as_user(server, BOB_KEY) as bob:
        def refused(**config) -> str:
            answer = graphql(bob, CREATE, config=base | config)
            assert answer.get("data") is None and answer["errors"][0]["extensions"] == {"code": 400}, answer
            return answer["errors"][0]["message"]

        assert "train_data_path" in refused(trainDataPath=her_file) and "is not yours" in refused(trainDataPath=her_file)
        assert "is not yours" in refused(trainDataPath=f"file://{her_file}")
        assert "is not yours" in refused(evalDataPath=str(Path(her_file).parent / ".." / Path(her_file).parent.name /
                                                          Path(her_file).name))
        assert "custom_weights_path" in refused(customWeightsPath=checkpoint)
        assert "is not yours" in refused(customWeightsPath=str(local_checkpoint))
        # Whether a server path exists, or is a folder, is not told: every one gets the same answer.
        said = {refused(model=path).replace(path, "X") for path in ("/etc", "/etc/passwd", "/no/such/dir", "~",
                                                                    str(local_checkpoint))}
        assert len(said) == 1 and "is not a model this server offers you" in said.pop()
        assert "is another user's registered model" in refused(
            experimentTracker={"mlflow": {"modelRegistryPath": alices["model"]}})
        assert "another user's folder" in refused(
            experimentTracker={"mlflow": {"experimentPath": f"/Users/{ALICE}/mine", "modelRegistryPath": "main.bob"}})
    assert fm.list(user_emails=[BOB]) == []  # nothing of bob's was created

    bob = openai.OpenAI(base_url=f"{server}/v1", api_key=BOB_KEY, max_retries=0)
    upload = bob.files.create(file=("mine.jsonl", jsonl(CHAT)), purpose="fine-tune")
    for model in (str(local_checkpoint.parent), "/etc", alices["model"], f"{alices['model']}@candidate"):
        with pytest.raises(openai.BadRequestError) as refusal:
            bob.fine_tuning.jobs.create(model=model, training_file=upload.id)
        assert refusal.value.body["param"] == "model", refusal.value.body
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(alices["file"].id)


def test_the_mlflow_proxy_shows_bob_nothing_of_alices(server, alices):
    run, model = alices["run"], alices["model"]
    with as_user(server, BOB_KEY) as bob, as_user(server, ALICE_KEY) as alice:
        names = [e["name"] for e in bob.post(f"{MLFLOW}/experiments/search", json={"max_results": 100}).json().get(
            "experiments", [])]
        assert run.experiment_path not in names
        assert run.experiment_path in [e["name"] for e in alice.post(f"{MLFLOW}/experiments/search",
                                                                     json={"max_results": 100}).json()["experiments"]]
        assert model not in [m["name"] for m in bob.get(f"{MLFLOW}/registered-models/search").json().get(
            "registered_models", [])]
        assert model in [m["name"] for m in alice.get(f"{MLFLOW}/registered-models/search").json()["registered_models"]]
        assert bob.post(f"{MLFLOW}/runs/search", json={"experiment_ids": [run.experiment_id]}).json().get(
            "runs", []) == []
        for method, path, params in (
                ("GET", "runs/get", {"run_id": run.run_id}),
                ("GET", "artifacts/list", {"run_id": run.run_id, "path": "config"}),
                ("GET", "metrics/get-history", {"run_uuid": run.run_id, "metric_key": "loss"}),
                ("GET", "experiments/get", {"experiment_id": run.experiment_id}),
                ("GET", "experiments/get-by-name", {"experiment_name": run.experiment_path}),
                ("GET", "registered-models/get", {"name": model}),
                ("GET", "registered-models/alias", {"name": model, "alias": "candidate"}),
                ("POST", "runs/set-tag", {"run_id": run.run_id, "key": "owned", "value": "by bob"}),
                ("POST", "registered-models/set-tag", {"name": model, "key": "owned", "value": "by bob"})):
            answer = bob.request(method, f"{MLFLOW}/{path}", **({"params": params} if method == "GET" else
                                                                 {"json": params}))
            assert answer.status_code == 404 and answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST", (path,
                                                                                                          answer.text)
        assert alice.get(f"{MLFLOW}/runs/get", params={"run_id": run.run_id}).json()["run"]["data"]["tags"]
        assert "owned" not in {t["key"] for t in alice.get(f"{MLFLOW}/runs/get", params={"run_id": run.run_id}).json()[
            "run"]["data"]["tags"]}
        # Calls Tessera does not forward, and a path that would leave the proxy's prefix once normalised.
        for path in ("runs/create", "experiments/delete", "users/get"):
            assert bob.post(f"{MLFLOW}/{path}", json={}).status_code == 403
    address = urlparse(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request("GET", f"{MLFLOW}/%2e%2e/%2e%2e/%2e%2e/health", headers={"Authorization": f"Bearer {BOB_KEY}"})
    escaped = connection.getresponse()
    assert escaped.status in (403, 404) and b"OK" != escaped.read().strip()


def test_a_model_is_its_owners_until_she_shares_it(server, alices):
    model = alices["model"]
    bob = openai.OpenAI(base_url=f"{server}/v1", api_key=BOB_KEY, max_retries=0)
    listed = {m.id for m in bob.models.list()}
    assert model not in listed and f"{model}@candidate" not in listed and "HuggingFaceTB/SmolLM2-135M-Instruct" in listed
    for name in (model, f"{model}@candidate"):
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve(name)
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model=name, prompt="Hi", max_tokens=2)

    with as_user(server, ALICE_KEY) as alice, as_user(server, BOB_KEY) as bob_http:
        assert alice.post(f"{MLFLOW}/registered-models/set-tag",
                          json={"name": model, "key": "tessera.shared_with", "value": BOB}).status_code == 200
        answer = bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert answer.choices[0].message.role == "assistant" and model in {m.id for m in bob.models.list()}
        # Shared to use, not to change: only alice changes her model or adds versions to it.
        refused = bob_http.post(f"{MLFLOW}/registered-models/set-tag",
                                json={"name": model, "key": "tessera.shared_with", "value": "*"})
        assert refused.status_code == 403 and "only its owner changes it" in refused.json()["message"]
        assert alice.request("DELETE", f"{MLFLOW}/registered-models/delete-tag",
                             json={"name": model, "key": "tessera.shared_with"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve(model)


def test_a_bounded_load_from_bob_is_answered_and_leaks_nothing(server, alices):
    """200 requests from bob at once across the surfaces, bounded in count and time, on loopback."""
    secrets = (alices["run"].name, alices["model"], alices["file"].id)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {BOB_KEY}"},
                                     timeout=120) as bob:
            calls = [lambda: bob.post(GRAPHQL, json={"query": LIST, "variables": {"data": {}}}),
                     lambda: bob.get(f"{MLFLOW}/registered-models/search"), lambda: bob.get("/v1/models"),
                     lambda: bob.get("/v1/files"), lambda: bob.get("/v1/fine_tuning/jobs")]
            return await asyncio.gather(*(calls[i % len(calls)]() for i in range(200)))

    answers = asyncio.run(asyncio.wait_for(load(), timeout=300))
    assert len(answers) == 200 and all(a.status_code < 500 for a in answers), {a.status_code for a in answers}
    assert not any(secret in a.text for a in answers for secret in secrets)
