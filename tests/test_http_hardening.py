"""`tessera serve` as an attacker meets it, on the real server without the services: websockets, the key's scheme,
the GraphQL path's redirect, introspection, oversized and deeply nested requests, error bodies under /v1, what an
unexpected failure tells, and a prompt longer than the model's context. The last test brings the services up from
`tessera serve` itself, which must not start a second HTTP API beside it."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import websockets
from websockets.sync.client import connect

from api.limits import BODY_BYTES, GRAPHQL_BYTES
from conftest import SMOLLM2, tessera_serve
from tasks.ports import free_port

KEY, OTHER_KEY = "hardening-key-0123456789abcdef", "hardening-other-0123456789abcdef"
USER, OTHER = "grace@example.com", "alan@example.com"
GRAPHQL = "/api/2.0/genai-mapi/graphql"
ME = "/api/2.0/preview/scim/v2/Me"


def start(home: Path, **env: str):
    """`tessera serve` with two users' keys in its own home, its output in home/serve.log."""
    return tessera_serve(home / "serve.log", TESSERA_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
                         TESSERA_API_KEYS=f"{USER}:{KEY},{OTHER}:{OTHER_KEY}", **env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, whose files root is a regular file: an upload fails there as a bug would, with an OSError that
    names a server path. Nothing here needs the services, and nothing may start them."""
    home = tmp_path_factory.mktemp("hardening")
    (home / "not-a-folder").write_text("")
    with start(home, TESSERA_FILES_ROOT=str(home / "not-a-folder")) as url:
        yield url, home
    assert not list((home / "services").glob("*.pid")), "a request started the embedded services"


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def refused_quickly(http: httpx.Client, path: str, status: int, **request) -> tuple[dict, float]:
    """POST `request` to `path`: the body of its refusal with `status`, and how long it took."""
    started = time.monotonic()
    answer = http.post(path, **request)
    took = time.monotonic() - started
    assert answer.status_code == status, answer.text[:500]
    return answer.json(), took


def graphql_error(body: dict, code: int = 400) -> str:
    """The message of a GraphQL refusal as the SDK reads it: errors[].extensions.code, no data."""
    assert body.get("data") is None and body["errors"][0]["extensions"] == {"code": code}, body
    return " ".join(e["message"] for e in body["errors"])


def still_answers(http: httpx.Client) -> None:
    assert http.get(ME).json()["userName"] == USER


@pytest.mark.parametrize("path", [GRAPHQL, f"{GRAPHQL}/"])
def test_graphql_over_a_websocket_is_refused_with_no_key_a_wrong_key_or_the_right_one(server, path):
    for headers in ({}, {"Authorization": "Bearer not-a-key-of-this-server"}, {"Authorization": KEY},
                    {"Authorization": f"Bearer {KEY}"}):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            with connect(server[0].replace("http://", "ws://") + path, subprotocols=["graphql-ws"],
                         additional_headers=headers, open_timeout=10) as socket:
                socket.send(json.dumps({"type": "connection_init", "payload": {}}))
                socket.send(json.dumps({"type": "start", "id": "1", "payload": {
                    "query": "{ getFinetunesPaginated(getFinetunesPaginatedData: {}) { finetunes { name } } }"}}))
                pytest.fail(f"a websocket with {headers} opened: {socket.recv(timeout=10)}")
        assert refused.value.response.status_code == 403  # closed before it opened


def test_a_key_without_the_bearer_scheme_is_refused_and_told_the_scheme(server):
    url = server[0]
    for path, shape in ((ME, "error_code"), (GRAPHQL, "error_code"), ("/v1/files", "error")):
        for header in (KEY, f"Basic {KEY}", f"Token {KEY}", "Bearer"):
            answer = httpx.get(url + path, headers={"Authorization": header})
            assert answer.status_code == 401 and shape in answer.json(), answer.text
            assert "Authorization: Bearer <key>" in answer.text and KEY not in answer.text
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 6750: the scheme is case-insensitive
        assert httpx.get(url + ME, headers={"Authorization": f"{scheme} {OTHER_KEY}"}).json()["userName"] == OTHER


def test_the_graphql_path_is_answered_without_a_redirect_with_or_without_its_slash(http):
    for path in (GRAPHQL, f"{GRAPHQL}/"):
        answer = http.post(path, json={"query": "{ __typename }"}, follow_redirects=False)
        assert answer.status_code == 200 and answer.json() == {"data": {"__typename": "Query"}}, answer.text


def test_introspection_is_off(http):
    for query in ("{ __schema { types { name } } }", '{ __type(name: "Finetune") { fields { name } } }'):
        body, _ = refused_quickly(http, GRAPHQL, 400, json={"query": query})
        assert "introspection is disabled" in graphql_error(body)


def nested(depth: int) -> bytes:
    return b'{"query": "{ __typename }", "variables": {"x": ' + b"[" * depth + b"]" * depth + b"}}"


def aliases(count: int) -> str:
    return "{ " + " ".join(f"a{i}: __typename" for i in range(count)) + " }"


@pytest.mark.parametrize("body, said", [
    (nested(1_000), "nests deeper than this server parses"),
    (nested(10_000), "nests deeper than this server parses"),
    (b"[" * 10_000 + b"]" * 10_000, "nests deeper than this server parses"),
    (b'{"query": "{ __typename "', "not a valid JSON"),
    (json.dumps({"query": aliases(52_000)}).encode(), "Document contains more than 2000 tokens"),  # 1 MB
    (json.dumps({"query": aliases(150)}).encode(), "the query selects 150 fields, 1 deep"),
    (json.dumps({"query": "{ " + " ".join(f"f{i}: getFinetuneConstants {{ models {{ ...G }} }}" for i in range(30))
                          + " } fragment G on FinetuneModel { name displayName maxContextLength }"}).encode(),
     "the query selects 150 fields, 3 deep"),  # 300 tokens, but each alias a resolver run, each spread 3 fields
    (json.dumps({"query": "{ " + "a { " * 8 + "b" + " }" * 8 + " }"}).encode(), "the query selects 9 fields, 9 deep"),
    (json.dumps({"query": "{ " + "a { " * 10_000 + "b" + " }" * 10_000 + " }"}).encode(), "Parsing aborted"),
], ids=["json-1000-deep", "json-10000-deep", "bare-10000-deep", "bad-json", "52k-aliases", "150-aliases",
        "fragments", "9-deep", "10000-deep"])
def test_oversized_or_deep_graphql_is_refused_quickly_and_the_server_answers_after(http, body, said):
    answer, took = refused_quickly(http, GRAPHQL, 400, content=body, headers={"content-type": "application/json"})
    assert said in graphql_error(answer) and took < 2, (said, took)
    print(f"{len(body):,} bytes refused in {took * 1000:.0f} ms")
    still_answers(http)


def test_a_graphql_body_over_its_limit_is_refused_before_it_is_read(http):
    answer, took = refused_quickly(http, GRAPHQL, 413, content=b" " * (GRAPHQL_BYTES + 1),
                                   headers={"content-type": "application/json"})
    assert f"over this server's limit of {GRAPHQL_BYTES:,} bytes" in graphql_error(answer, 413)
    still_answers(http)


def chunks(size: int):
    """`size` bytes in 64 KiB pieces: httpx sends a generator chunked, with no Content-Length."""
    while size > 0:
        yield b" " * min(size, 2**16)
        size -= 2**16


def openai_error(answer: httpx.Response, status: int) -> dict:
    """OpenAI's error body, exactly its four fields, with `status`."""
    assert answer.status_code == status and set(answer.json()) == {"error"}, answer.text[:500]
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


@pytest.mark.parametrize("method, path, request_, status, said", [
    ("GET", "/v1/nothing", {}, 404, "Invalid URL (GET /v1/nothing)"),
    ("GET", "/v1/files/file-a/b/c", {}, 404, "Invalid URL"),
    ("DELETE", "/v1/fine_tuning/jobs/ftjob-a/b", {}, 404, "Invalid URL"),
    ("PUT", "/v1/files", {}, 405, "PUT is not allowed on /v1/files: use GET or POST"),
    ("GET", "/v1/chat/completions", {}, 405, "use POST"),
    ("POST", "/v1/chat/completions", {"content": b'{"model": ', "headers": {"content-type": "application/json"}},
     400, "the request body is not valid JSON"),
    ("POST", "/v1/fine_tuning/jobs", {"content": b"[" * 10_000 + b"]" * 10_000,
                                      "headers": {"content-type": "application/json"}}, 400, "nests deeper"),
    ("POST", "/v1/files", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400,
     "Missing boundary in multipart"),
    ("POST", "/v1/files", {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
     400, "Invalid multipart data"),
    ("POST", "/v1/chat/completions", {"content": b" " * (BODY_BYTES + 1),
                                      "headers": {"content-type": "application/json"}}, 413,
     f"is {BODY_BYTES + 1:,} bytes, over this server's limit of {BODY_BYTES:,} bytes"),
    ("POST", "/v1/chat/completions", {"content": chunks(BODY_BYTES + 2**16),
                                      "headers": {"content-type": "application/json"}}, 413,
     f"the request body (sent chunked) is over this server's limit of {BODY_BYTES:,} bytes"),
    ("POST", "/v1/files", {"content": chunks(1000)}, 411, "an upload needs a Content-Length header"),
], ids=["unknown-route", "file-id-with-slashes", "job-id-with-slash", "put", "get-a-post", "bad-json", "deep-json",
        "no-boundary", "bad-multipart", "too-large", "too-large-chunked", "chunked-upload"])
def test_every_refusal_under_v1_is_in_openais_shape(http, method, path, request_, status, said):
    error = openai_error(http.request(method, path, **request_), status)
    assert said in error["message"], error
    still_answers(http)


def test_an_unexpected_failure_answers_an_error_id_and_the_log_has_the_traceback(http, server):
    _, home = server
    answer = http.post("/v1/files", files={"file": ("t.jsonl", b'{"messages": []}\n')}, data={"purpose": "fine-tune"})
    error = openai_error(answer, 500)
    error_id = re.fullmatch(r"the server failed on this request; its log has the details \(error id ([0-9a-f]{12})\)",
                            error["message"]).group(1)
    assert str(home) not in answer.text and "Error" not in answer.text and error["type"] == "server_error"
    deadline = time.monotonic() + 10
    while f"error id {error_id}" not in (log := (home / "serve.log").read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    logged = log[log.index(f"error id {error_id}"):]
    assert "Traceback" in logged and str(home / "not-a-folder") in logged, logged[:2000]


def test_a_prompt_longer_than_the_models_context_is_refused_in_openais_words_before_generating(server, smollm2_dir):
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)
    client.chat.completions.create(model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)  # loads
    long = [{"role": "user", "content": "word " * 9000}]
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM2, messages=long)
    assert time.monotonic() - started < 5  # generating 256 tokens after 9,000 would take far longer on a CPU
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")
    assert re.fullmatch(r"This model's maximum context length is 8192 tokens\. However, your messages resulted in "
                        r"9\d\d\d tokens\. Please reduce the length of the messages\.", refused.value.body["message"])
    fits = [{"role": "user", "content": "word " * 8000}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM2, messages=fits, max_tokens=1000)
    said = refused.value.body["message"]
    prompt = int(re.search(r"\((\d+) in the messages, 1000 in the completion\)", said).group(1))
    assert said == (
        f"This model's maximum context length is 8192 tokens. However, you requested {prompt + 1000} tokens "
        f"({prompt} in the messages, 1000 in the completion). Please reduce the length of the messages or completion.")
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=SMOLLM2, prompt="word " * 9000)
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "prompt")


@pytest.mark.e2e
def test_tessera_serve_brings_the_services_up_without_a_second_http_api(tmp_path):
    """The services' own HTTP API is for a machine without one: `tessera serve` starting them is that API."""
    serve_port = free_port()
    env = {"TESSERA_PREFECT_PORT": str(free_port()), "TESSERA_MLFLOW_PORT": str(free_port()),
           "TESSERA_SERVE_PORT": str(serve_port)}
    try:
        with start(tmp_path, **env) as url:
            answer = httpx.get(f"{url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
            assert answer.status_code == 200 and answer.json()["data"] == [], answer.text
            assert (tmp_path / "services" / "worker.pid").exists()  # the request brought the services up
            assert not (tmp_path / "services" / "http-api.pid").exists()
            assert subprocess.run(["pgrep", "-f", f"cli.main serve --port {serve_port}"]).returncode == 1
    finally:
        subprocess.run([sys.executable, "-m", "cli.main", "server", "stop"], cwd=Path(__file__).parents[1],
                       env={**os.environ, "TESSERA_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect"),
                            **env}, timeout=120, check=True)
