"""One exception hierarchy for the whole package.

``PreemptwatchError`` is the root. ``RequestError`` and its subclasses are the errors of the
HTTP API: each carries the status code and the error code of ``docs/http-api.md``, so the
server turns them into responses and the client can raise the same classes from responses.
"""

from __future__ import annotations


class PreemptwatchError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PreemptwatchError, ValueError):
    """A setting (command-line flag, environment variable, URL) is invalid."""


class RequestError(PreemptwatchError):
    """An API call that the server refuses; ``status`` and ``code`` as in the HTTP API."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field the error is about, when there is one.
        self.field = field

    def to_json(self) -> dict[str, str]:
        """The error body the server sends."""
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class BadRequest(RequestError):
    """400: malformed JSON, unknown or mistyped fields, bad IDs or names."""

    status = 400
    code = "bad_request"


class Unauthorized(RequestError):
    """401: the API key is missing or wrong."""

    status = 401
    code = "unauthorized"


class NotFound(RequestError):
    """404: no such run, file or route (or it belongs to another project)."""

    status = 404
    code = "not_found"


class Conflict(RequestError):
    """409: the request contradicts the run's state (exists, ended, step backwards...)."""

    status = 409
    code = "conflict"


class StaleIncarnation(Conflict):
    """409: a write from an older incarnation of the run; nothing was changed."""

    code = "stale_incarnation"


class TooLarge(RequestError):
    """413: the body is over the server's limit."""

    status = 413
    code = "too_large"


#: Request errors by error code, for turning a response back into an exception.
ERRORS_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, NotFound, Conflict, StaleIncarnation, TooLarge)
}


class ApiError(PreemptwatchError):
    """A call of the run client failed. ``status`` is the HTTP status (None when the server
    could not be reached), ``code`` the server's error code, ``message`` its explanation."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.message = message
        self.status = status
        self.code = code


class ApiUnavailable(ApiError):
    """The server could not be reached, timed out or kept answering 5xx, despite retries."""


class ApiBadRequest(ApiError):
    """400: the server refused the request as malformed."""


class ApiUnauthorized(ApiError):
    """401: the API key is missing or wrong."""


class ApiNotFound(ApiError):
    """404: no such run, file or sweep in this key's project."""


class ApiConflict(ApiError):
    """409: the request contradicts the run's state (exists, still running, ended...)."""


class ApiStaleIncarnation(ApiConflict):
    """409: a newer process resumed the run; this one may no longer write to it."""


class RunFenced(ApiStaleIncarnation):
    """Refused locally: this run was fenced (resumed elsewhere), so writes are not sent."""


class ApiTooLarge(ApiError):
    """413: the upload is over the server's limit."""


def api_error(status: int, code: str | None, message: str) -> ApiError:
    """The `ApiError` subclass for a refused request's status and error code."""
    if code == "stale_incarnation":
        return ApiStaleIncarnation(message, status=status, code=code)
    cls = {
        400: ApiBadRequest,
        401: ApiUnauthorized,
        404: ApiNotFound,
        409: ApiConflict,
        413: ApiTooLarge,
    }.get(status, ApiUnavailable if status >= 500 else ApiError)
    return cls(message, status=status, code=code)
