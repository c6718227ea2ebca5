"""What a caller is told of a failure Tessera did not mean: an error id, never the exception's text (it can carry
server paths and internals); the traceback goes to the server's log under that id."""

import logging
import secrets

log = logging.getLogger("tessera.api")


def unexpected(error: BaseException) -> str:
    """Log `error` with its traceback under a new id; the message that names the id to the caller."""
    error_id = secrets.token_hex(6)
    log.error("error id %s: %s", error_id, type(error).__name__, exc_info=error)
    return f"the server failed on this request; its log has the details (error id {error_id})"
