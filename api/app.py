"""The HTTP server: every surface behind one API-key check, started by the embedded default or `tessera serve`."""

import ipaddress

import uvicorn
from fastapi import FastAPI

from api.databricks import graphql, mlflow_proxy, workspace
from api.keys import api_keys, user_for
from api.limits import LimitBodies, answer
from api.openai import errors, files, inference, jobs
from tasks.errors import InvalidInputError
from tasks.run_record import ACTING_USER


class RequireApiKey:
    """ASGI middleware: a request, or a websocket, acts as the user its bearer key names; without keys configured,
    only loopback callers are answered. Refusals come in OpenAI's error body under /v1, else in Databricks' (which
    the SDK and databricks-sdk read); a websocket is closed before it opens (the server answers 403)."""

    def __init__(self, app, keys: dict[str, str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the server starting and stopping: no caller
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if self.keys:
            if scheme.lower() != "bearer" or not token.strip():
                return await _refuse(scope, send, "no API key given: send Authorization: Bearer <key>" if not header
                                     else "the Authorization header is not Bearer <key> (RFC 6750): send "
                                          "Authorization: Bearer <key>")
            user = user_for(token.strip(), self.keys)
            if user is None:
                return await _refuse(scope, send, "the API key is not one of this server's (TESSERA_API_KEYS)")
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
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})  # policy violation
    openai = scope["path"].startswith(errors.PREFIX)
    await answer(send, 401, errors.body(message, code="invalid_api_key") if openai else
                 {"error_code": "UNAUTHENTICATED", "message": message})


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(keys: dict[str, str] | None = None) -> FastAPI:
    app = FastAPI(title="Tessera", description="Fine-tuning runs over HTTP: the databricks-genai SDK's protocol, and "
                                               "OpenAI's files, fine-tuning jobs and inference under /v1.")
    schema = graphql.app()
    for path in (graphql.PATH, f"{graphql.PATH}/"):  # HTTP only, each answered itself (a Mount redirects the first)
        app.add_route(path, schema, include_in_schema=False)
    app.include_router(workspace.router)
    app.include_router(mlflow_proxy.router)
    for surface in (files, jobs, inference):
        app.include_router(surface.router)
    errors.install(app)
    app.add_middleware(LimitBodies)
    app.add_middleware(RequireApiKey, keys=api_keys() if keys is None else keys)
    return app


def serve(host: str, port: int) -> None:
    """Serve until stopped; binding beyond this machine needs API keys."""
    keys = api_keys()
    if not keys and not _loopback(host):
        raise InvalidInputError(f"--host {host} serves other machines, so set API keys first "
                                "(TESSERA_API_KEYS=user:key or TESSERA_API_KEYS_FILE), or serve on 127.0.0.1")
    uvicorn.run(create_app(keys), host=host, port=port, log_level="info")
