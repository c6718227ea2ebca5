"""Request bodies within bounds, refused before they are read: an upload to /v1/files within TESSERA_MAX_UPLOAD_MB
(streamed to disk), a GraphQL request within GRAPHQL_BYTES and any other within BODY_BYTES (each read whole into
memory by its route). A body that states its length is judged by it; a chunked one is counted as it comes."""

import json

from api.databricks import graphql
from api.openai import errors
from api.openai.files import max_upload_bytes

# A chat at the longest context of the catalog (128k tokens: ~0.5 MB of text); MLflow's own log-batch limit (1 MB).
BODY_BYTES = 4 * 2**20
# createFinetune's eval prompts: up to 100 of 20,000 characters, each 6 bytes where the SDK's json.dumps escapes a
# non-ASCII one (\uXXXX): 12 MB, and the rest of the config. The query itself is bounded apart (graphql.py).
GRAPHQL_BYTES = 16 * 2**20


class LimitBodies:
    """ASGI middleware: a body over its route's limit gets a 413 in that surface's error body, from its
    Content-Length before a byte is read, or once a chunked one passes the limit; an upload must state its length."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        upload = scope["method"] == "POST" and path == f"{errors.PREFIX}files"
        limit = max_upload_bytes() if upload else GRAPHQL_BYTES if _graphql(path) else BODY_BYTES
        length = headers.get(b"content-length", b"")
        if length.isdigit():  # the server passes on no more than it says
            if int(length) > limit:
                return await answer(send, 413, _too_large(path, upload, limit, int(length)))
            return await self.app(scope, receive, send)
        if upload:
            return await answer(send, 411, refusal(path, 411, "an upload needs a Content-Length header",
                                                   "length_required", "file"))
        if b"chunked" not in headers.get(b"transfer-encoding", b""):  # no body
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await answer(send, 413, _too_large(path, upload, limit, None))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            """The body read above, then whatever the client sends next (its disconnect)."""
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def _too_large(path: str, upload: bool, limit: int, size: int | None) -> dict:
    """The 413's body: the request's size (None: sent chunked), the limit, and for an upload the setting that moves
    it (an upload always states its size)."""
    if upload:
        return refusal(path, 413, f"the upload is {size:,} bytes, over this server's limit of {limit:,} bytes "
                                  "(TESSERA_MAX_UPLOAD_MB): split the file, or raise the limit",
                       "file_too_large", "file")
    said = f"is {size:,} bytes, over" if size is not None else "(sent chunked) is over"
    return refusal(path, 413, f"the request body {said} this server's limit of {limit:,} bytes", "request_too_large",
                   None)


def _graphql(path: str) -> bool:
    return path.rstrip("/") == graphql.PATH


def refusal(path: str, status: int, message: str, code: str, param: str | None) -> dict:
    """A refusal in the error body of the surface `path` is on, the one its clients read: OpenAI's under /v1,
    GraphQL's errors[] with the status as extensions.code (the SDK's), else Databricks' REST body."""
    if path.startswith(errors.PREFIX):
        return errors.body(message, param, code)
    if _graphql(path):
        return {"errors": [{"message": message, "extensions": {"code": status}}]}
    return {"error_code": "BAD_REQUEST", "message": message}


async def answer(send, status: int, payload: dict) -> None:
    """Send `payload` as the whole JSON response, before the app has seen the request."""
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
