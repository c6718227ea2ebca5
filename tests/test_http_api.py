"""`tessera serve` without the services: who a key is, who is refused and how, and the error body the SDK reads."""

import re

import pytest
from fastapi.testclient import TestClient

from graphql import GraphQLError

from api.app import create_app, serve
from api.databricks.graphql import format_error
from api.keys import api_keys
from tasks.errors import InvalidInputError, RunNotFoundError, TooManyActiveRunsError

KEY = "k" * 24
GRAPHQL = "/api/2.0/genai-mapi/graphql"


def test_a_key_names_its_user_and_a_wrong_or_missing_key_is_refused():
    client = TestClient(create_app({KEY: "ada@example.com"}))
    me = client.get("/api/2.0/preview/scim/v2/Me", headers={"Authorization": f"Bearer {KEY}"})
    assert me.status_code == 200 and me.json()["userName"] == "ada@example.com"
    for headers, said in (({}, "no API key given"), ({"Authorization": "Bearer nope"}, "is not one of this server's")):
        refused = client.post(GRAPHQL, json={"query": "{ getFinetuneConstants { models { name } } }"}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHENTICATED"
        assert said in refused.json()["message"]


def test_without_keys_only_this_machine_is_answered(monkeypatch):
    monkeypatch.setenv("TESSERA_USER", "local@example.com")
    assert TestClient(create_app({}), client=("127.0.0.1", 50000)).get(
        "/api/2.0/preview/scim/v2/Me").json()["userName"] == "local@example.com"
    assert TestClient(create_app({}), client=("10.1.2.3", 50000)).get("/api/2.0/preview/scim/v2/Me").status_code == 401
    monkeypatch.delenv("TESSERA_API_KEYS", raising=False)
    monkeypatch.delenv("TESSERA_API_KEYS_FILE", raising=False)
    with pytest.raises(InvalidInputError, match="--host 0.0.0.0 serves other machines, so set API keys first"):
        serve("0.0.0.0", 8000)


def test_keys_come_from_the_variable_and_a_file_and_a_bad_one_is_named_by_its_line(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"# team\nbob@example.com:{'b' * 20}\n")
    monkeypatch.setenv("TESSERA_API_KEYS", f"ada@example.com:{KEY}")
    monkeypatch.setenv("TESSERA_API_KEYS_FILE", str(keys))
    assert api_keys() == {KEY: "ada@example.com", "b" * 20: "bob@example.com"}
    keys.write_text("# team\nbob@example.com:short\n")
    with pytest.raises(InvalidInputError, match=rf"{keys} line 2: an API key is user:key with a key of 16"):
        api_keys()


def test_graphql_errors_carry_an_integer_status_the_sdk_does_not_retry():
    client = TestClient(create_app({}), client=("127.0.0.1", 50000))
    wrong = client.post(GRAPHQL, json={"query": "{ noSuchField }", "variables": {}}).json()
    assert wrong["errors"][0]["extensions"] == {"code": 400} and wrong.get("data") is None
    for cause, code in ((RunNotFoundError("run ift-x not found"), 404), (TooManyActiveRunsError("10 runs"), 400),
                        (InvalidInputError("learning_rate 0.5 must be at most 0.001"), 400)):
        formatted = format_error(GraphQLError(str(cause), original_error=cause))
        assert formatted["extensions"] == {"code": code} and formatted["message"] == str(cause)
    bug = format_error(GraphQLError("x", original_error=OSError(2, "No such file", "/srv/tessera/secret")))
    assert bug["extensions"] == {"code": 500} and "/srv" not in bug["message"]  # an error id: the log has the rest
    assert re.fullmatch(r"the server failed on this request; its log has the details \(error id [0-9a-f]{12}\)",
                        bug["message"])


def test_the_sdks_default_experiment_path_is_tesseras_default(monkeypatch):
    from api.databricks.graphql import _experiment_path

    monkeypatch.setenv("TESSERA_USER", "local@example.com")
    assert _experiment_path("/Users/local@example.com/{}") is None  # /Users/<user>/<run name>, made by create()
    assert _experiment_path("/Shared/tuning") == "/Shared/tuning"
    with pytest.raises(InvalidInputError, match=r"\{\} stands for the run's name only in the default path"):
        _experiment_path("/Shared/{}")
