"""LangChain integrations (``pip install 'convstore[langchain]'``).

- :class:`ConvstoreChatMessageHistory`: a ``BaseChatMessageHistory`` whose
  conversation lives in convstore: each ``add_messages`` is one append (the
  first one stores the conversation), ``messages`` reads it back, ``clear``
  deletes it.
- :class:`ConvstoreRetriever`: a ``BaseRetriever`` over ``search``: one
  ``Document`` per conversation found, its best chunk as ``page_content``.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.documents import Document
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.retrievers import BaseRetriever
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "convstore.langchain needs langchain-core: pip install 'convstore[langchain]'"
    ) from e

from ._client import AsyncClient, Client
from .errors import NotFoundError
from .models import Message, SearchHit, StoredConversation, WaitLevel

__all__ = ["ConvstoreChatMessageHistory", "ConvstoreRetriever"]

_ROLES = {"system", "user", "assistant", "tool"}


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts: List[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _role(message: BaseMessage) -> str:
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, ChatMessage) and message.role in _ROLES:
        return message.role
    raise ValueError(
        f"convstore stores system, user, assistant and tool messages; not {type(message).__name__}"
        + (f" with role {message.role!r}" if isinstance(message, ChatMessage) else "")
    )


def to_convstore(message: BaseMessage) -> Optional[Dict[str, Any]]:
    """A LangChain message as a convstore message, or None when it has no
    text (an AI message that only calls tools): convstore stores text.
    ``message.id`` becomes the ``message_id`` (one is made when absent), so
    a resent turn is not added twice."""
    text = _text(message)
    if not text:
        return None
    return {
        "role": _role(message),
        "content": text,
        "message_id": message.id or uuid.uuid4().hex,
    }


def from_convstore(message: Message) -> BaseMessage:
    """A stored convstore message as a LangChain message (``tool`` messages
    come back as ``ChatMessage(role="tool")``: the tool call id is not kept)."""
    mid = message.message_id
    if message.role == "user":
        return HumanMessage(content=message.content, id=mid)
    if message.role == "assistant":
        return AIMessage(content=message.content, id=mid)
    if message.role == "system":
        return SystemMessage(content=message.content, id=mid)
    return ChatMessage(role=message.role, content=message.content, id=mid)


class ConvstoreChatMessageHistory(BaseChatMessageHistory):
    """Chat history stored in convstore under ``conversation_id``.

    Each ``add_messages`` call is one append (``POST
    /v1/conversations/{id}/messages``); the first, when the conversation does
    not exist yet, stores it with ``user_id``, ``channel`` and ``metadata``.
    ``wait`` defaults to ``"stored"`` so that ``messages`` (a ``get``) sees
    every turn added before it; ``"queued"`` acknowledges in microseconds
    but a read right after may not see the last turns yet. Meant for one
    writer per conversation id. ``clear()`` deletes the conversation.

    ``client`` defaults to ``Client()`` (environment, default socket);
    ``async_client``, when given, serves the ``a*`` methods natively.
    """

    def __init__(
        self,
        conversation_id: str,
        *,
        user_id: str,
        channel: str = "langchain",
        client: Optional[Client] = None,
        async_client: Optional[AsyncClient] = None,
        wait: WaitLevel = "stored",
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.user_id = user_id
        self.channel = channel
        self.client = client if client is not None else Client()
        self.async_client = async_client
        self.wait: WaitLevel = wait
        self.metadata = metadata

    def _first_post(self, payload: List[Dict[str, Any]]) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "id": self.conversation_id,
            "user_id": self.user_id,
            "channel": self.channel,
            "messages": payload,
        }
        if self.metadata is not None:
            body["metadata"] = self.metadata
        return body

    @staticmethod
    def _messages_of(conversation: StoredConversation) -> List[BaseMessage]:
        return [from_convstore(m) for m in conversation.messages or []]

    @property
    def messages(self) -> List[BaseMessage]:  # type: ignore[override]
        try:
            conversation = self.client.get(self.conversation_id)
        except NotFoundError:
            return []
        return self._messages_of(conversation)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        payload = [m for m in (to_convstore(x) for x in messages) if m is not None]
        if not payload:
            return
        try:
            self.client.append(self.conversation_id, payload, wait=self.wait)
        except NotFoundError:
            self.client.store(self._first_post(payload), wait=self.wait)

    def clear(self) -> None:
        try:
            self.client.delete(self.conversation_id)
        except NotFoundError:
            pass

    async def aget_messages(self) -> List[BaseMessage]:
        if self.async_client is None:
            return await super().aget_messages()
        try:
            conversation = await self.async_client.get(self.conversation_id)
        except NotFoundError:
            return []
        return self._messages_of(conversation)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        if self.async_client is None:
            await super().aadd_messages(messages)
            return
        payload = [m for m in (to_convstore(x) for x in messages) if m is not None]
        if not payload:
            return
        try:
            await self.async_client.append(self.conversation_id, payload, wait=self.wait)
        except NotFoundError:
            await self.async_client.store(self._first_post(payload), wait=self.wait)

    async def aclear(self) -> None:
        if self.async_client is None:
            await super().aclear()
            return
        try:
            await self.async_client.delete(self.conversation_id)
        except NotFoundError:
            pass


def _document(hit: SearchHit) -> Document:
    return Document(
        page_content=hit.text,
        id=hit.id,
        metadata={
            "id": hit.id,
            "conversation_id": hit.conversation_id,
            "user_id": hit.user_id,
            "channel": hit.channel,
            "score": hit.score,
            "summary": hit.summary,
            "metadata": hit.metadata,
            "created_at": hit.created_at,
            "chunk_seq": hit.chunk_seq,
        },
    )


class ConvstoreRetriever(BaseRetriever):
    """Documents from convstore's search: the ``k`` nearest conversations,
    each as its best-matching chunk (``page_content``) with the conversation's
    id, user, channel, score and metadata in ``metadata``. ``filter`` and
    ``mode`` are passed to :meth:`Client.search` as they are."""

    client: Client
    async_client: Optional[AsyncClient] = None
    k: int = 4
    mode: Optional[str] = None
    filter: Optional[Dict[str, Any]] = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> List[Document]:
        results = self.client.search(query, k=self.k, mode=self.mode, filter=self.filter)
        return [_document(h) for h in results]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> List[Document]:
        if self.async_client is None:
            return await super()._aget_relevant_documents(query, run_manager=run_manager)
        results = await self.async_client.search(
            query, k=self.k, mode=self.mode, filter=self.filter
        )
        return [_document(h) for h in results]
