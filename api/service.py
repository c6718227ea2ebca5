"""The HTTP API as one of this home's embedded services, beside the Prefect server, the worker and the MLflow UI:
started by `tessera server start` and `make demo` (the client's first call starts only those below it), stopped with
them (`tessera server stop`)."""

import sys

from deployments import services

HTTP_API = services.Service("http-api", "TESSERA_SERVE_PORT", 8000)


def url() -> str:
    return f"http://127.0.0.1:{HTTP_API.port}"


def ensure_serving() -> str:
    """Start the embedded services and the HTTP API beside them, those not running; returns the API's address."""
    services.ensure_running(HTTP_API, lambda port: [sys.executable, "-m", "cli.main", "serve", "--port", str(port)])
    return url()
