"""convstore: a Python client for the convstore daemon.

>>> from convstore import Client
>>> with Client() as cs:  # CONVSTORE_URL / CONVSTORE_SOCKET, the default socket, or :7070
...     ack = cs.store({"user_id": "u-1", "channel": "web",
...                     "messages": [{"role": "user", "content": "hello"}]}, wait="stored")
...     hits = cs.search("hello", k=3)
"""

from ._client import AsyncClient, Client
from ._endpoint import DEFAULT_URL
from .errors import (
    APIError,
    BadRequestError,
    ConflictError,
    ConvstoreError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    TooManyRequestsError,
    TransportError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
    WaitTimeoutError,
)
from .models import (
    Ack,
    BatchResult,
    Chunk,
    Conversation,
    ConversationLike,
    Deleted,
    Erased,
    ErrorInfo,
    Health,
    ItemResult,
    Message,
    MessageLike,
    RetryEvent,
    SearchHit,
    SearchResults,
    StoredConversation,
    WaitLevel,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "DEFAULT_URL",
    "Conversation",
    "ConversationLike",
    "Message",
    "MessageLike",
    "WaitLevel",
    "Ack",
    "BatchResult",
    "ItemResult",
    "ErrorInfo",
    "StoredConversation",
    "Chunk",
    "SearchResults",
    "SearchHit",
    "Deleted",
    "Erased",
    "Health",
    "RetryEvent",
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
