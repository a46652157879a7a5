"""Exceptions raised by the client.

Every answer of the daemon that is not a success raises an :class:`APIError`
subclass chosen by the HTTP status, carrying the server's ``code`` (stable,
machine-readable: ``invalid_field``, ``queue_full``, ``not_found``…),
``message``, ``field`` (the JSON path at fault, on a 400) and ``id`` (the
conversation's id when it was accepted and the wait ended early). A request
that never got an answer raises :class:`TransportError`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

__all__ = [
    "ConvstoreError",
    "TransportError",
    "APIError",
    "BadRequestError",
    "UnauthorizedError",
    "ForbiddenError",
    "NotFoundError",
    "RequestTimeoutError",
    "ConflictError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "TooManyRequestsError",
    "ServerError",
    "UnavailableError",
    "WaitTimeoutError",
]


class ConvstoreError(Exception):
    """Base class of everything this package raises."""


class TransportError(ConvstoreError):
    """The request did not get an answer: the daemon is not listening, the
    connection broke, or the client's ``timeout`` passed. Whether a
    conversation sent this way was accepted is unknown: resend it with the
    same ``id`` (a retry with the same content is stored once)."""


class APIError(ConvstoreError):
    """The daemon answered with an error.

    Attributes:
        status: the HTTP status.
        code: the server's error code (``invalid_field``, ``queue_full``…).
        message: the server's message, for people.
        field: the JSON path of the field at fault (400 ``invalid_field``),
            e.g. ``messages[0].content``; else ``None``.
        id: the id of a conversation that was accepted but did not reach the
            level waited for (504, 500, 409); else ``None``.
        retry_after: seconds from the ``Retry-After`` header, if any.
        body: the decoded JSON body (``{}`` when it was not JSON).
    """

    status: int
    code: str
    message: str
    field: Optional[str]
    id: Optional[str]
    retry_after: Optional[float]
    body: Dict[str, Any]

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: Optional[str] = None,
        id: Optional[str] = None,
        retry_after: Optional[float] = None,
        body: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.id = id
        self.retry_after = retry_after
        self.body = body if body is not None else {}
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [f"{self.status} {self.code}: {self.message}"]
        if self.field is not None:
            parts.append(f"field={self.field}")
        if self.id is not None:
            parts.append(f"id={self.id}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, field={self.field!r}, id={self.id!r})"
        )


class BadRequestError(APIError):
    """400: invalid JSON (``invalid_json``), a wrong field (``invalid_field``,
    with :attr:`field`), or a bad query parameter (``bad_request``)."""


class UnauthorizedError(APIError):
    """401: a bearer token is required and was missing or unknown."""


class ForbiddenError(APIError):
    """403: the token lacks the scope the route needs (``delete`` to delete
    or erase)."""


class NotFoundError(APIError):
    """404: no such conversation (or route)."""


class RequestTimeoutError(APIError):
    """408: the body did not arrive within ``server.body_timeout_ms``."""


class ConflictError(APIError):
    """409 ``discarded``: accepted, then deleted before it was stored."""


class PayloadTooLargeError(APIError):
    """413: over ``server.max_body_bytes`` or ``server.max_batch_items``."""


class UnsupportedMediaTypeError(APIError):
    """415: wrong ``Content-Type`` (a client bug)."""


class TooManyRequestsError(APIError):
    """429: the queue or journal is full, or the token's rate limit is
    reached. Raised only after the client's retries ran out of
    ``retry_deadline``."""


class ServerError(APIError):
    """5xx."""


class UnavailableError(ServerError):
    """503: shutting down, not ready, or the database is unavailable."""


class WaitTimeoutError(ServerError):
    """504 ``wait_timeout``: accepted (see :attr:`id`), but not durable or
    stored within the wait; poll ``get(id)``."""


_BY_STATUS: Dict[int, Type[APIError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: TooManyRequestsError,
    503: UnavailableError,
    504: WaitTimeoutError,
}


def error_class(status: int) -> Type[APIError]:
    """The exception class for an HTTP status."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls
    if status >= 500:
        return ServerError
    return APIError


def from_error_object(
    status: int,
    error: Mapping[str, Any],
    *,
    retry_after: Optional[float] = None,
    body: Optional[Dict[str, Any]] = None,
) -> APIError:
    """Builds the exception for a ``{"code","message","field"?,"id"?}`` object."""
    field = error.get("field")
    ident = error.get("id")
    return error_class(status)(
        status,
        str(error.get("code", "unknown")),
        str(error.get("message", "")),
        field=field if isinstance(field, str) else None,
        id=ident if isinstance(ident, str) else None,
        retry_after=retry_after,
        body=body,
    )
