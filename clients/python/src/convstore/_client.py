"""`Client` (blocking) and `AsyncClient` (asyncio or trio): the same methods,
driving the same protocol (`_core`)."""

from __future__ import annotations

import os
import time
from types import TracebackType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Type, TypeVar

import anyio
import httpx

from . import _core
from ._core import Op, Protocol, Request, Sleep
from ._endpoint import Endpoint, resolve
from .errors import TransportError
from .models import (
    Ack,
    BatchResult,
    ConversationLike,
    Deleted,
    Erased,
    Health,
    MessageLike,
    RetryEvent,
    SearchResults,
    StoredConversation,
    WaitLevel,
)

__all__ = ["Client", "AsyncClient"]

T = TypeVar("T")
_VERSION = "0.1.0"


def _headers(token: Optional[str], extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    headers = {"user-agent": f"convstore-python/{_VERSION}", "accept": "application/json"}
    if token is None:
        token = os.environ.get("CONVSTORE_TOKEN") or None
    if token:
        headers["authorization"] = f"Bearer {token}"
    if extra:
        headers.update(extra)
    return headers


def _request_kwargs(request: Request) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {}
    if request.params:
        kwargs["params"] = request.params
    if request.content is not None:
        kwargs["content"] = request.content
        kwargs["headers"] = {"content-type": request.content_type or _core.JSON}
    if request.timeout is not None:
        kwargs["timeout"] = request.timeout
    return kwargs


def _transport_error(endpoint: Endpoint, request: Request, error: Exception) -> TransportError:
    return TransportError(
        f"{request.method} {request.path} on {endpoint.describe()}: "
        f"{type(error).__name__}: {error}"
    )


class Client(Protocol):
    """A blocking client; use it as a context manager (or call :meth:`close`).

    Args:
        base_url: ``http://127.0.0.1:7070`` style URL of the daemon's TCP
            listener.
        unix_socket: path of the daemon's Unix socket (give one of the two).
            Neither: ``CONVSTORE_URL``, else ``CONVSTORE_SOCKET``, else the
            daemon's default socket when it exists, else
            ``http://127.0.0.1:7070``.
        token: bearer token (``[[auth.tokens]]``); default
            ``CONVSTORE_TOKEN``.
        timeout: seconds for one request (connect, read, write). A request
            that waits for ``durable``/``stored`` gets at least its wait plus
            5 s.
        retry_deadline: how long one call keeps resending a request refused
            with 429 (queue or journal full, rate limited) or 503 with
            ``Retry-After``, waiting ``Retry-After`` between tries. 0: never.
        on_retry: called with a :class:`RetryEvent` before each such wait.
        max_batch_items, max_batch_bytes: how :meth:`store_many` cuts its
            requests (the daemon's ``server.max_batch_items`` and
            ``server.max_body_bytes``; defaults are the daemon's defaults).
        headers: extra headers sent with every request.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        unix_socket: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retry_deadline: float = 30.0,
        on_retry: Optional[Callable[[RetryEvent], None]] = None,
        max_batch_items: int = _core.DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = _core.DEFAULT_MAX_BATCH_BYTES,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._init_protocol(timeout, retry_deadline, on_retry, max_batch_items, max_batch_bytes)
        self.endpoint = resolve(base_url, unix_socket)
        transport = (
            httpx.HTTPTransport(uds=self.endpoint.unix_socket)
            if self.endpoint.unix_socket
            else None
        )
        # trust_env=False: the daemon is local; a proxy from the environment
        # must not carry its traffic.
        self._http = httpx.Client(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=_headers(token, headers),
            timeout=timeout,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"Client({self.endpoint.describe()!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    response = self._http.request(step.method, step.path, **_request_kwargs(step))
                except httpx.TransportError as e:
                    raise _transport_error(self.endpoint, step, e) from e
                step = op.send(response)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            op.close()

    def store(
        self,
        conversation: ConversationLike,
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> Ack:
        """Stores one conversation (``POST /v1/conversations``) and returns its
        id and the level reached. ``wait="stored"`` returns once PostgreSQL
        committed it; ``wait_timeout`` (seconds) bounds that wait (then
        :class:`WaitTimeoutError` with the ``id``)."""
        return self._run(self._op_store(conversation, wait, wait_timeout))

    def store_many(
        self,
        conversations: Iterable[ConversationLike],
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> BatchResult:
        """Stores many conversations through the batch endpoint (NDJSON), cut
        into requests within ``max_batch_items``/``max_batch_bytes``. Items
        refused because the queue is full are resent after ``Retry-After``
        until ``retry_deadline``. Returns one :class:`ItemResult` per item, in
        input order; an invalid item is a ``rejected`` result with its error,
        not an exception."""
        return self._run(self._op_store_many(conversations, wait, wait_timeout))

    def append(
        self,
        conversation_id: str,
        messages: Iterable[MessageLike],
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> Ack:
        """Adds messages at the end of a conversation, in acknowledgement
        order; a message whose ``message_id`` it already holds is skipped.
        :class:`NotFoundError` if the id was never accepted."""
        return self._run(self._op_append(conversation_id, messages, wait, wait_timeout))

    def get(self, conversation_id: str) -> StoredConversation:
        """The conversation by your id (or its row UUID): stored, with its
        chunks, or ``status == "queued"`` while not yet stored.
        :class:`NotFoundError` if unknown."""
        return self._run(self._op_get(conversation_id))

    def search(
        self,
        query: str,
        *,
        k: Optional[int] = None,
        mode: Optional[str] = None,
        filter: Optional[Mapping[str, Any]] = None,
        ef_search: Optional[int] = None,
        exact: Optional[bool] = None,
    ) -> SearchResults:
        """The ``k`` nearest conversations (server default 10), each with its
        best chunk. ``filter``: ``user_id``, ``channel``, ``since``,
        ``until`` (datetimes or RFC 3339), ``metadata`` (containment).
        ``mode`` is sent as the server's ``mode`` field only when given
        (``semantic``, ``lexical``, ``hybrid``, on a daemon that has search
        modes)."""
        return self._run(self._op_search(query, k, mode, filter, ef_search, exact))

    def delete(self, conversation_id: str) -> Deleted:
        """Deletes a conversation, its chunks and its queued changes, once
        committed. :class:`NotFoundError` if unknown."""
        return self._run(self._op_delete(conversation_id))

    def erase_user(self, user_id: str) -> Erased:
        """Erases everything of a user, stored, queued or journaled, and
        keeps it from coming back. Safe to repeat."""
        return self._run(self._op_erase_user(user_id))

    def stats(self) -> Dict[str, Any]:
        """``GET /v1/stats``: queue, rates, latencies, cache, backends."""
        return self._run(self._op_stats())

    def health(self) -> Health:
        """``GET /readyz``: ready or not, and why (never raises for 503)."""
        return self._run(self._op_health())


class AsyncClient(Protocol):
    """The same methods as :class:`Client`, as coroutines (asyncio or trio);
    use it as an ``async with`` context manager (or await :meth:`aclose`)."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        unix_socket: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retry_deadline: float = 30.0,
        on_retry: Optional[Callable[[RetryEvent], None]] = None,
        max_batch_items: int = _core.DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = _core.DEFAULT_MAX_BATCH_BYTES,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._init_protocol(timeout, retry_deadline, on_retry, max_batch_items, max_batch_bytes)
        self.endpoint = resolve(base_url, unix_socket)
        transport = (
            httpx.AsyncHTTPTransport(uds=self.endpoint.unix_socket)
            if self.endpoint.unix_socket
            else None
        )
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=_headers(token, headers),
            timeout=timeout,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"AsyncClient({self.endpoint.describe()!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    await anyio.sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    response = await self._http.request(
                        step.method, step.path, **_request_kwargs(step)
                    )
                except httpx.TransportError as e:
                    raise _transport_error(self.endpoint, step, e) from e
                step = op.send(response)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            op.close()

    async def store(
        self,
        conversation: ConversationLike,
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> Ack:
        """See :meth:`Client.store`."""
        return await self._run(self._op_store(conversation, wait, wait_timeout))

    async def store_many(
        self,
        conversations: Iterable[ConversationLike],
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> BatchResult:
        """See :meth:`Client.store_many`."""
        return await self._run(self._op_store_many(conversations, wait, wait_timeout))

    async def append(
        self,
        conversation_id: str,
        messages: Iterable[MessageLike],
        *,
        wait: WaitLevel = "queued",
        wait_timeout: Optional[float] = None,
    ) -> Ack:
        """See :meth:`Client.append`."""
        return await self._run(self._op_append(conversation_id, messages, wait, wait_timeout))

    async def get(self, conversation_id: str) -> StoredConversation:
        """See :meth:`Client.get`."""
        return await self._run(self._op_get(conversation_id))

    async def search(
        self,
        query: str,
        *,
        k: Optional[int] = None,
        mode: Optional[str] = None,
        filter: Optional[Mapping[str, Any]] = None,
        ef_search: Optional[int] = None,
        exact: Optional[bool] = None,
    ) -> SearchResults:
        """See :meth:`Client.search`."""
        return await self._run(self._op_search(query, k, mode, filter, ef_search, exact))

    async def delete(self, conversation_id: str) -> Deleted:
        """See :meth:`Client.delete`."""
        return await self._run(self._op_delete(conversation_id))

    async def erase_user(self, user_id: str) -> Erased:
        """See :meth:`Client.erase_user`."""
        return await self._run(self._op_erase_user(user_id))

    async def stats(self) -> Dict[str, Any]:
        """See :meth:`Client.stats`."""
        return await self._run(self._op_stats())

    async def health(self) -> Health:
        """See :meth:`Client.health`."""
        return await self._run(self._op_health())
