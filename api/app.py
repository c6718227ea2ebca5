"""The HTTP server: every surface behind one API-key check, started by the embedded default or `tessera serve`."""

import ipaddress
import json

import uvicorn
from fastapi import FastAPI

from api.databricks import graphql, mlflow_proxy, workspace
from api.keys import api_keys, user_for
from api.openai import errors, files, inference, jobs
from tasks.errors import InvalidInputError
from tasks.run_record import ACTING_USER


class RequireApiKey:
    """ASGI middleware: a request acts as the user its bearer key names; without keys configured, only loopback
    callers are answered. Refusals come in OpenAI's error body under /v1, else in Databricks' (which the SDK and
    databricks-sdk read)."""

    def __init__(self, app, keys: dict[str, str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode()
        token = header.removeprefix("Bearer ").strip()
        if self.keys:
            user = user_for(token, self.keys) if token else None
            if user is None:
                return await _refuse(scope, send, "no API key given: send Authorization: Bearer <key>" if not token else
                                     "the API key is not one of this server's (TESSERA_API_KEYS)")
            reset = ACTING_USER.set(user)
        else:
            if not _loopback(scope.get("client", ("", 0))[0]):
                return await _refuse(scope, send, "this server has no API keys, so it answers this machine only")
            reset = None
        try:
            await self.app(scope, receive, send)
        finally:
            if reset is not None:
                ACTING_USER.reset(reset)


async def _refuse(scope, send, message: str) -> None:
    openai = scope["path"].startswith(errors.PREFIX)
    body = json.dumps(errors.body(message, code="invalid_api_key") if openai else
                      {"error_code": "UNAUTHENTICATED", "message": message}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(keys: dict[str, str] | None = None) -> FastAPI:
    app = FastAPI(title="Tessera", description="Fine-tuning runs over HTTP: the databricks-genai SDK's protocol, and "
                                               "OpenAI's files, fine-tuning jobs and inference under /v1.")
    app.mount(graphql.PATH, graphql.app())
    app.include_router(workspace.router)
    app.include_router(mlflow_proxy.router)
    for surface in (files, jobs, inference):
        app.include_router(surface.router)
    errors.install(app)
    app.add_middleware(files.LimitUploads)
    app.add_middleware(RequireApiKey, keys=api_keys() if keys is None else keys)
    return app


def serve(host: str, port: int) -> None:
    """Serve until stopped; binding beyond this machine needs API keys."""
    keys = api_keys()
    if not keys and not _loopback(host):
        raise InvalidInputError(f"--host {host} serves other machines, so set API keys first "
                                "(TESSERA_API_KEYS=user:key or TESSERA_API_KEYS_FILE), or serve on 127.0.0.1")
    uvicorn.run(create_app(keys), host=host, port=port, log_level="info")
