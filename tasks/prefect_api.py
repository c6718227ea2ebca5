"""Prefect's API client, with one TLS context per process.

Prefect builds a TLS context for every client it makes, loading the whole CA bundle (~30-60 ms of CPU), even for an
http:// server; Tessera makes a client per API call, and fm.get() polled each second spent most of its time there.
The context is the one Prefect would build: its PREFECT_API_TLS_INSECURE_SKIP_VERIFY and PREFECT_API_SSL_CERT_FILE
settings, else certifi's bundle."""

import functools
import ssl

import certifi
from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, PREFECT_API_URL

from tasks.errors import ServiceError


@functools.cache
def _tls_context(insecure: bool, cert_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cert_file)
    if insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def require_api() -> None:
    """Refuse to talk to Prefect with no API URL in force: Prefect would start a temporary server of its own, and what
    it was told (an event, a read) would be lost with it. Talk inside services.connected() or a flow run."""
    if not PREFECT_API_URL.value():
        raise ServiceError("no Prefect server to talk to: set PREFECT_API_URL to the server's API (e.g. "
                           "http://<server>:4200/api), or use Tessera's own through fm or the tessera CLI")


def prefect_client() -> SyncPrefectClient:
    """A synchronous client of the Prefect API in force (use it with `with`)."""
    require_api()
    context = _tls_context(bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
                           PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    return get_client(sync_client=True, httpx_settings={"verify": context})
