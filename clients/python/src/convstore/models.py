"""Typed models: what you send (:class:`Conversation`, :class:`Message`) and
what the daemon answers. Plain dataclasses, no validation library: the daemon
validates, and its 400 names the field at fault.

Anywhere a conversation or a message is taken, a plain ``dict`` in the
daemon's JSON shape works too. Timestamps may be ``datetime`` objects (sent
as RFC 3339) or strings; answers keep the daemon's RFC 3339 strings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Union

__all__ = [
    "WaitLevel",
    "Message",
    "Conversation",
    "ConversationLike",
    "MessageLike",
    "Ack",
    "ErrorInfo",
    "ItemResult",
    "BatchResult",
    "Chunk",
    "StoredConversation",
    "SearchHit",
    "SearchResults",
    "Deleted",
    "Erased",
    "Health",
    "RetryEvent",
]

#: ``?wait=``: ``queued`` (default, in memory or journal), ``durable``
#: (journal fsynced), ``stored`` (committed in PostgreSQL).
WaitLevel = Literal["queued", "durable", "stored"]


def _timestamp(value: Union[str, datetime]) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    return value


@dataclass
class Message:
    """One turn: ``role`` is ``system``, ``user``, ``assistant`` or ``tool``.
    ``message_id`` (yours) makes an append idempotent: a message whose id the
    conversation already holds is not added again."""

    role: str
    content: str
    ts: Union[str, datetime, None] = None
    message_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"role": self.role, "content": self.content}
        if self.ts is not None:
            out["ts"] = _timestamp(self.ts)
        if self.message_id is not None:
            out["message_id"] = self.message_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Message":
        return cls(
            role=str(data.get("role", "")),
            content=str(data.get("content", "")),
            ts=data.get("ts"),
            message_id=data.get("message_id"),
        )


MessageLike = Union[Message, Mapping[str, Any]]


@dataclass
class Conversation:
    """A conversation to store: ``user_id``, ``channel`` and either
    ``messages`` or a free-form ``transcript``. ``id`` is your key
    (idempotency: the same id and content is stored once; different content
    is a new version); without one the daemon assigns a UUIDv7."""

    user_id: str
    channel: str
    messages: List[MessageLike] = field(default_factory=list)
    transcript: Optional[str] = None
    id: Optional[str] = None
    summary: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    created_at: Union[str, datetime, None] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        out["user_id"] = self.user_id
        out["channel"] = self.channel
        if self.messages or self.transcript is None:
            out["messages"] = [message_dict(m) for m in self.messages]
        if self.transcript is not None:
            out["transcript"] = self.transcript
        if self.summary is not None:
            out["summary"] = self.summary
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.created_at is not None:
            out["created_at"] = _timestamp(self.created_at)
        return out


ConversationLike = Union[Conversation, Mapping[str, Any]]


def message_dict(message: MessageLike) -> Dict[str, Any]:
    """The JSON object of a message given as a :class:`Message` or a mapping."""
    if isinstance(message, Message):
        return message.to_dict()
    out = dict(message)
    ts = out.get("ts")
    if isinstance(ts, datetime):
        out["ts"] = _timestamp(ts)
    return out


def conversation_dict(conversation: ConversationLike) -> Dict[str, Any]:
    """The JSON object of a conversation given as a :class:`Conversation` or
    a mapping (datetimes become RFC 3339 strings)."""
    if isinstance(conversation, Conversation):
        return conversation.to_dict()
    if not isinstance(conversation, Mapping):
        raise TypeError(
            f"a conversation is a convstore.Conversation or a mapping, not {type(conversation).__name__}"
        )
    out = dict(conversation)
    created = out.get("created_at")
    if isinstance(created, datetime):
        out["created_at"] = _timestamp(created)
    messages = out.get("messages")
    if isinstance(messages, list) and any(
        isinstance(m, Message) or (isinstance(m, Mapping) and isinstance(m.get("ts"), datetime))
        for m in messages
    ):
        out["messages"] = [message_dict(m) for m in messages]
    return out


@dataclass(frozen=True)
class Ack:
    """The answer to a store or an append: the conversation's ``id`` (yours,
    or the UUID assigned) and the level reached (``queued``, ``durable``,
    ``stored``)."""

    id: str
    status: str


@dataclass(frozen=True)
class ErrorInfo:
    """The server's error object, per batch item."""

    code: str
    message: str
    field: Optional[str] = None
    id: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ErrorInfo":
        return cls(
            code=str(data.get("code", "unknown")),
            message=str(data.get("message", "")),
            field=data.get("field"),
            id=data.get("id"),
        )


@dataclass(frozen=True)
class ItemResult:
    """One item of :meth:`Client.store_many`: ``index`` in what you passed,
    ``id`` when accepted, ``status`` (``queued``, ``durable``, ``stored``;
    ``rejected`` with ``error``; ``unfinished``: accepted, the wait ended
    first, poll by ``id``)."""

    index: int
    status: str
    id: Optional[str] = None
    error: Optional[ErrorInfo] = None

    @property
    def ok(self) -> bool:
        return self.status in ("queued", "durable", "stored")


@dataclass(frozen=True)
class BatchResult:
    """Per-item results of :meth:`Client.store_many`, in input order."""

    results: List[ItemResult]
    #: Requests sent (chunks, and their retries).
    requests: int = 0

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.results if r.status != "rejected")

    @property
    def rejected(self) -> int:
        return sum(1 for r in self.results if r.status == "rejected")

    @property
    def ok(self) -> bool:
        """Every item reached the level asked for."""
        return all(r.ok for r in self.results)

    @property
    def errors(self) -> List[ItemResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ids(self) -> List[Optional[str]]:
        return [r.id for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[ItemResult]:
        return iter(self.results)


@dataclass(frozen=True)
class Chunk:
    """A stored chunk (without its vector)."""

    seq: int
    content: str
    model: str
    embedding_status: str
    error: Optional[str] = None
    embedded_at: Optional[str] = None


@dataclass(frozen=True)
class StoredConversation:
    """``GET /v1/conversations/{id}``. While accepted and not yet stored,
    ``status`` is ``queued`` and only ``row_id`` is known; once stored,
    ``status`` is ``stored`` with the row. ``raw`` is the daemon's JSON."""

    status: str
    row_id: str
    client_id: Optional[str]
    user_id: Optional[str] = None
    channel: Optional[str] = None
    messages: Optional[List[Message]] = None
    transcript: Optional[str] = None
    summary: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    created_at: Optional[str] = None
    received_at: Optional[str] = None
    stored_at: Optional[str] = None
    updated_at: Optional[str] = None
    versions: int = 0
    embedding_status: Optional[str] = None
    changes_in_flight: bool = False
    chunks: List[Chunk] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def stored(self) -> bool:
        return self.status == "stored"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], asked: str) -> "StoredConversation":
        if data.get("status") != "stored":
            return cls(
                status=str(data.get("status", "queued")),
                row_id=str(data.get("row_id", "")),
                client_id=None if data.get("id") == data.get("row_id") else asked,
                raw=data,
            )
        messages = data.get("messages")
        chunk_fields = {f.name for f in dataclasses.fields(Chunk)}
        return cls(
            status="stored",
            row_id=str(data["id"]),
            client_id=data.get("client_id"),
            user_id=data.get("user_id"),
            channel=data.get("channel"),
            messages=None if messages is None else [Message.from_dict(m) for m in messages],
            transcript=data.get("transcript"),
            summary=data.get("summary"),
            metadata=data.get("metadata") or {},
            created_at=data.get("created_at"),
            received_at=data.get("received_at"),
            stored_at=data.get("stored_at"),
            updated_at=data.get("updated_at"),
            versions=int(data.get("versions", 0)),
            embedding_status=data.get("embedding_status"),
            changes_in_flight=bool(data.get("changes_in_flight", False)),
            chunks=[
                Chunk(**{k: v for k, v in c.items() if k in chunk_fields})
                for c in data.get("chunks", [])
            ],
            raw=data,
        )


@dataclass(frozen=True)
class SearchHit:
    """One conversation found, with its best-matching chunk. ``id`` is your
    id when you gave one, else the row id (what :meth:`Client.get` takes)."""

    id: str
    conversation_id: str
    user_id: str
    channel: str
    score: float
    distance: Optional[float]
    text: str
    chunk_seq: Optional[int] = None
    client_id: Optional[str] = None
    summary: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    created_at: Optional[str] = None
    received_at: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SearchHit":
        chunk = data.get("chunk") or {}
        distance = data.get("distance")
        return cls(
            id=str(data["id"]),
            conversation_id=str(data.get("conversation_id", data["id"])),
            user_id=str(data.get("user_id", "")),
            channel=str(data.get("channel", "")),
            score=float(data.get("score", 0.0)),
            distance=None if distance is None else float(distance),
            text=str(chunk.get("content", "")),
            chunk_seq=chunk.get("seq"),
            client_id=data.get("client_id"),
            summary=data.get("summary"),
            metadata=data.get("metadata") or {},
            created_at=data.get("created_at"),
            received_at=data.get("received_at"),
            raw=data,
        )


@dataclass(frozen=True)
class SearchResults:
    """The answer to a search: ``hits``, nearest first; ``raw`` has the rest
    (``search`` plan, ``timings_ms``…)."""

    hits: List[SearchHit]
    model: Optional[str] = None
    k: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[SearchHit]:
        return iter(self.hits)

    def __getitem__(self, index: int) -> SearchHit:
        return self.hits[index]

    @property
    def ids(self) -> List[str]:
        return [h.id for h in self.hits]


@dataclass(frozen=True)
class Deleted:
    """``DELETE /v1/conversations/{id}``: committed, with what went."""

    id: str
    deleted: bool
    chunks: int = 0
    queued_changes: int = 0


@dataclass(frozen=True)
class Erased:
    """``DELETE /v1/users/{user_id}``: committed, with counts."""

    user_id: str
    erased: bool
    conversations: int = 0
    chunks: int = 0
    cache_entries: int = 0
    queued_changes: int = 0


@dataclass(frozen=True)
class Health:
    """``/readyz``: ``ready``, and the ``reasons`` when not; ``detail`` is the
    daemon's JSON (queue depth, database, backends…)."""

    ready: bool
    reasons: List[str]
    detail: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before the client waits and resends a refused
    request (429, or 503 with ``Retry-After``)."""

    method: str
    path: str
    status: int
    code: Optional[str]
    #: How long the client waits before resending, in seconds.
    delay: float
    #: 1 for the first retry of this call.
    attempt: int
    #: Items resent (a batch's refused tail); 1 for a single request.
    items: int = 1
