"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for every refusal under /v1."""

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from api.failures import unexpected
from tasks.errors import InvalidInputError, RunNotFoundError, TesseraError, TooManyActiveRunsError

PREFIX = "/v1/"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def body(message: str, param: str | None = None, code: str | None = None,
         kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_tessera(error: TesseraError, param: str | None = None) -> OpenAIError:
    """Tessera's typed error as the status OpenAI gives the same kind of refusal; its message kept whole."""
    if isinstance(error, RunNotFoundError):
        return OpenAIError(404, str(error), param, "not_found")
    if isinstance(error, TooManyActiveRunsError):
        return OpenAIError(429, str(error), param, "rate_limit_exceeded", "rate_limit_error")
    if isinstance(error, InvalidInputError):
        return OpenAIError(400, str(error), param, "invalid_value")
    return OpenAIError(500, str(error), param, None, "server_error")


def install(app: FastAPI) -> None:
    """Answer OpenAIError, and under /v1 Tessera's own errors, FastAPI's request validation, Starlette's refusals (no
    such route, a method the route lacks, a body it cannot parse) and anything unexpected, in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(body(error.message, error.param, error.code, error.kind), status_code=error.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        """A Tessera error no route turned into its answer (the services down, a run gone): its message; a bug: an
        error id, its traceback in the server's log under that id."""
        if not request.url.path.startswith(PREFIX):
            return PlainTextResponse("Internal Server Error", status_code=500)
        known = from_tessera(error) if isinstance(error, TesseraError) else OpenAIError(
            500, unexpected(error), kind="server_error")
        return await _openai(request, known)

    @app.exception_handler(HTTPException)
    async def _starlette(request: Request, error: HTTPException):
        if not request.url.path.startswith(PREFIX):
            return await http_exception_handler(request, error)
        headers = {"Allow": ", ".join(_allowed(request))} if error.status_code == 405 else error.headers
        return JSONResponse(body(_refused(request, error)), status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        if not request.url.path.startswith(PREFIX):
            return await request_validation_exception_handler(request, error)
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(body(f"the request body is not valid JSON: {first['ctx']['error']} at character "
                                     f"{first['loc'][-1]}"), status_code=400)
        param = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path"))
        given = f" (got {repr(first['input'])[:200]})" if "input" in first and first["type"] != "missing" else ""
        return JSONResponse(body(f"{param}: {first['msg']}{given}", param or None, "invalid_value"), status_code=400)


def _refused(request: Request, error: HTTPException) -> str:
    """What Starlette refused, said for the request it refused."""
    if error.status_code == 404:
        return f"Invalid URL ({request.method} {request.url.path}): this server has no such route"
    if error.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}: use {' or '.join(_allowed(request))}"
    if isinstance(error.__cause__, RecursionError):
        return "the request body nests deeper than this server parses: flatten it"
    return str(error.detail)


def _allowed(request: Request) -> list[str]:
    """The methods some route answers on the request's path (Starlette's Allow names its first route's only)."""
    return [method for method in ("GET", "POST", "DELETE") if any(
        route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)]
