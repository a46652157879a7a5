"""The protocol, written once for both clients.

Each operation is a generator that yields what it needs done (send a
:class:`Request`, or :class:`Sleep`) and receives the response; the sync and
async clients only drive these generators with their own I/O and sleep. So
retries, batching and error mapping behave the same in both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from .errors import APIError, from_error_object
from .models import (
    Ack,
    BatchResult,
    ConversationLike,
    Deleted,
    ErrorInfo,
    Erased,
    Health,
    ItemResult,
    MessageLike,
    RetryEvent,
    SearchHit,
    SearchResults,
    StoredConversation,
    WaitLevel,
    conversation_dict,
    message_dict,
)

T = TypeVar("T")

#: The daemon's defaults for ``server.max_batch_items`` and
#: ``server.max_body_bytes``: a batch is cut to fit both. A 413 (a server
#: with smaller limits) halves the chunk and sends both halves.
DEFAULT_MAX_BATCH_ITEMS = 1000
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024

#: Per-item codes of a batch that mean "not accepted now, send again later".
RETRYABLE_ITEM_CODES = frozenset(
    {"queue_full", "journal_full", "rate_limited", "journal_unwritable", "bodies_full"}
)

_WAITS = ("queued", "durable", "stored")
JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: Optional[Dict[str, str]] = None
    content: Optional[bytes] = None
    content_type: Optional[str] = None
    #: Overrides the client's timeout (a long ``?wait=``).
    timeout: Optional[float] = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Union[Request, Sleep]
Op = Generator[Step, Optional[httpx.Response], T]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def retry_after(response: httpx.Response) -> Optional[float]:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _json_body(response: httpx.Response) -> Dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def error_for(response: httpx.Response) -> APIError:
    """The typed exception for an error answer."""
    body = _json_body(response)
    error = body.get("error")
    if isinstance(error, Mapping):
        return from_error_object(
            response.status_code, error, retry_after=retry_after(response), body=body
        )
    text = response.text.strip()[:200] or response.reason_phrase
    return from_error_object(
        response.status_code,
        {"code": f"http_{response.status_code}", "message": text},
        retry_after=retry_after(response),
        body=body,
    )


def _wait_params(wait: str, wait_timeout: Optional[float]) -> Optional[Dict[str, str]]:
    if wait not in _WAITS:
        raise ValueError(f"wait must be one of {', '.join(_WAITS)}, not {wait!r}")
    params: Dict[str, str] = {}
    if wait != "queued":
        params["wait"] = wait
    if wait_timeout is not None:
        if wait_timeout <= 0:
            raise ValueError("wait_timeout must be positive")
        params["timeout_ms"] = str(max(1, int(wait_timeout * 1000)))
    return params or None


class Protocol:
    """Settings and operations shared by :class:`Client` and :class:`AsyncClient`."""

    timeout: float
    retry_deadline: float
    on_retry: Optional[Callable[[RetryEvent], None]]
    max_batch_items: int
    max_batch_bytes: int
    #: Resends after a 429 (or a 503 with ``Retry-After``) since the client
    #: was made: a batch's refused tail counts once per resend.
    retries: int

    def _init_protocol(
        self,
        timeout: float,
        retry_deadline: float,
        on_retry: Optional[Callable[[RetryEvent], None]],
        max_batch_items: int,
        max_batch_bytes: int,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retry_deadline < 0:
            raise ValueError("retry_deadline must be >= 0 (0: no retries)")
        if max_batch_items < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_items and max_batch_bytes must be positive")
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.on_retry = on_retry
        self.max_batch_items = max_batch_items
        self.max_batch_bytes = max_batch_bytes
        self.retries = 0

    # -- building blocks -------------------------------------------------

    def _request_timeout(self, wait: str, wait_timeout: Optional[float]) -> Optional[float]:
        """A request that waits for ``durable``/``stored`` may be answered as
        late as the server's wait (``ack.timeout_ms``, 30 s by default, or
        ``wait_timeout``): give it that and a margin."""
        if wait == "queued":
            return None
        waited = wait_timeout if wait_timeout is not None else 30.0
        return max(self.timeout, waited + 5.0)

    def _retry_delay(self, response: httpx.Response, deadline: float) -> Optional[float]:
        """How long to wait before resending a refused request, or None when
        it is not retryable or the deadline has passed."""
        status = response.status_code
        after = retry_after(response)
        if not (status == 429 or (status == 503 and after is not None)):
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        return min(after if after is not None else 1.0, remaining)

    def _note_retry(self, event: RetryEvent) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(event)

    def _call(self, request: Request) -> Op[httpx.Response]:
        """Sends ``request``; a 429 (or 503 with ``Retry-After``) is resent
        after ``Retry-After`` until ``retry_deadline`` has passed."""
        deadline = time.monotonic() + self.retry_deadline
        attempt = 0
        while True:
            response = yield request
            assert response is not None
            delay = self._retry_delay(response, deadline)
            if delay is None:
                return response
            attempt += 1
            self._note_retry(
                RetryEvent(
                    request.method,
                    request.path,
                    response.status_code,
                    _code_of(response),
                    delay,
                    attempt,
                )
            )
            yield Sleep(delay)

    def _expect(self, request: Request, ok: Sequence[int] = (200,)) -> Op[Dict[str, Any]]:
        response = yield from self._call(request)
        if response.status_code not in ok:
            raise error_for(response)
        return _json_body(response)

    # -- operations ------------------------------------------------------

    def _op_store(
        self, conversation: ConversationLike, wait: WaitLevel, wait_timeout: Optional[float]
    ) -> Op[Ack]:
        body = yield from self._expect(
            Request(
                "POST",
                "/v1/conversations",
                _wait_params(wait, wait_timeout),
                dumps(conversation_dict(conversation)),
                JSON,
                self._request_timeout(wait, wait_timeout),
            ),
            (201, 202),
        )
        return Ack(str(body["id"]), str(body["status"]))

    def _op_append(
        self,
        conversation_id: str,
        messages: Iterable[MessageLike],
        wait: WaitLevel,
        wait_timeout: Optional[float],
    ) -> Op[Ack]:
        payload = {"messages": [message_dict(m) for m in messages]}
        body = yield from self._expect(
            Request(
                "POST",
                f"/v1/conversations/{_segment(conversation_id)}/messages",
                _wait_params(wait, wait_timeout),
                dumps(payload),
                JSON,
                self._request_timeout(wait, wait_timeout),
            ),
            (201, 202),
        )
        return Ack(str(body["id"]), str(body["status"]))

    def _op_get(self, conversation_id: str) -> Op[StoredConversation]:
        body = yield from self._expect(
            Request("GET", f"/v1/conversations/{_segment(conversation_id)}")
        )
        return StoredConversation.from_dict(body, conversation_id)

    def _op_search(
        self,
        query: str,
        k: Optional[int],
        mode: Optional[str],
        filter: Optional[Mapping[str, Any]],
        ef_search: Optional[int],
        exact: Optional[bool],
    ) -> Op[SearchResults]:
        payload: Dict[str, Any] = {"query": query}
        if k is not None:
            payload["k"] = k
        # Sent only when given: the server's `mode` field.
        if mode is not None:
            payload["mode"] = mode
        if filter is not None:
            payload["filter"] = _filter_dict(filter)
        if ef_search is not None:
            payload["ef_search"] = ef_search
        if exact is not None:
            payload["exact"] = exact
        body = yield from self._expect(Request("POST", "/v1/search", None, dumps(payload), JSON))
        return SearchResults(
            hits=[SearchHit.from_dict(h) for h in body.get("results", [])],
            model=body.get("model"),
            k=body.get("k"),
            raw=body,
        )

    def _op_delete(self, conversation_id: str) -> Op[Deleted]:
        body = yield from self._expect(
            Request("DELETE", f"/v1/conversations/{_segment(conversation_id)}")
        )
        return Deleted(
            id=str(body.get("id", conversation_id)),
            deleted=bool(body.get("deleted", False)),
            chunks=int(body.get("chunks", 0)),
            queued_changes=int(body.get("queued_changes", 0)),
        )

    def _op_erase_user(self, user_id: str) -> Op[Erased]:
        body = yield from self._expect(Request("DELETE", f"/v1/users/{_segment(user_id)}"))
        return Erased(
            user_id=str(body.get("user_id", user_id)),
            erased=bool(body.get("erased", False)),
            conversations=int(body.get("conversations", 0)),
            chunks=int(body.get("chunks", 0)),
            cache_entries=int(body.get("cache_entries", 0)),
            queued_changes=int(body.get("queued_changes", 0)),
        )

    def _op_stats(self) -> Op[Dict[str, Any]]:
        return (yield from self._expect(Request("GET", "/v1/stats")))

    def _op_health(self) -> Op[Health]:
        # Not through _call: a 503 here is the answer, not a refusal.
        response = yield Request("GET", "/readyz")
        assert response is not None
        if response.status_code not in (200, 503):
            raise error_for(response)
        body = _json_body(response)
        reasons = body.get("reasons") or []
        return Health(
            ready=response.status_code == 200,
            reasons=[str(r) for r in reasons],
            detail=body,
        )

    def _op_store_many(
        self,
        conversations: Iterable[ConversationLike],
        wait: WaitLevel,
        wait_timeout: Optional[float],
    ) -> Op[BatchResult]:
        params = _wait_params(wait, wait_timeout)
        timeout = self._request_timeout(wait, wait_timeout)
        results: List[ItemResult] = []
        counter = [0]
        chunk: List[Tuple[int, bytes]] = []
        size = 0
        for index, conversation in enumerate(conversations):
            line = dumps(conversation_dict(conversation))
            if chunk and (
                len(chunk) >= self.max_batch_items or size + len(line) + 1 > self.max_batch_bytes
            ):
                yield from self._send_chunk(chunk, params, timeout, results, counter)
                chunk, size = [], 0
            chunk.append((index, line))
            size += len(line) + 1
        if chunk:
            yield from self._send_chunk(chunk, params, timeout, results, counter)
        results.sort(key=lambda r: r.index)
        return BatchResult(results, requests=counter[0])

    def _send_chunk(
        self,
        chunk: List[Tuple[int, bytes]],
        params: Optional[Dict[str, str]],
        timeout: Optional[float],
        results: List[ItemResult],
        counter: List[int],
    ) -> Op[None]:
        """Sends one batch request; resends the tail the server refused for a
        full queue after ``Retry-After``, until ``retry_deadline``; splits on
        413 (a server with smaller limits than assumed)."""
        deadline = time.monotonic() + self.retry_deadline
        pending = chunk
        attempt = 0
        while pending:
            request = Request(
                "POST",
                "/v1/conversations/batch",
                params,
                b"\n".join(line for _, line in pending) + b"\n",
                NDJSON,
                timeout,
            )
            counter[0] += 1
            response = yield request
            assert response is not None
            status = response.status_code
            if status == 413:
                if len(pending) > 1:
                    half = len(pending) // 2
                    yield from self._send_chunk(pending[:half], params, timeout, results, counter)
                    yield from self._send_chunk(pending[half:], params, timeout, results, counter)
                    return
                err = error_for(response)
                results.append(
                    ItemResult(pending[0][0], "rejected", None, ErrorInfo(err.code, err.message))
                )
                return
            body = _json_body(response)
            items = body.get("results")
            if not isinstance(items, list):
                # A whole-request refusal: 503 with Retry-After (bodies_full)
                # is resent, anything else (401, 415, shutting down) raised.
                delay = self._retry_delay(response, deadline)
                if delay is None:
                    raise error_for(response)
                attempt += 1
                self._note_retry(
                    RetryEvent(
                        "POST",
                        request.path,
                        status,
                        _code_of(response),
                        delay,
                        attempt,
                        len(pending),
                    )
                )
                yield Sleep(delay)
                continue
            again: List[Tuple[int, bytes]] = []
            refused: List[ItemResult] = []
            for item in items:
                position = int(item["index"])
                global_index = pending[position][0]
                error = item.get("error")
                info = ErrorInfo.from_dict(error) if isinstance(error, Mapping) else None
                result = ItemResult(global_index, str(item["status"]), item.get("id"), info)
                if result.status == "rejected" and info is not None and info.code in RETRYABLE_ITEM_CODES:
                    again.append(pending[position])
                    refused.append(result)
                else:
                    results.append(result)
            if not again:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                results.extend(refused)
                return
            delay = min(retry_after(response) or 1.0, remaining)
            attempt += 1
            first = refused[0].error
            self._note_retry(
                RetryEvent(
                    "POST",
                    request.path,
                    status,
                    first.code if first is not None else None,
                    delay,
                    attempt,
                    len(again),
                )
            )
            yield Sleep(delay)
            pending = again


def _code_of(response: httpx.Response) -> Optional[str]:
    error = _json_body(response).get("error")
    if isinstance(error, Mapping):
        code = error.get("code")
        return code if isinstance(code, str) else None
    return None


def _segment(value: str) -> str:
    """One path segment: every character but unreserved ones escaped."""
    if not isinstance(value, str) or value == "":
        raise ValueError(f"an id must be a non-empty string, not {value!r}")
    return quote(value, safe="")


def _filter_dict(filter: Mapping[str, Any]) -> Dict[str, Any]:
    from datetime import datetime

    from .models import _timestamp

    out = dict(filter)
    for key in ("since", "until"):
        value = out.get(key)
        if isinstance(value, datetime):
            out[key] = _timestamp(value)
    return out
