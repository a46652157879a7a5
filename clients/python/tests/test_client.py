"""The blocking client against the real daemon, over the Unix socket and over
HTTP (each test runs on both: the `connect` fixture)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Dict

import pytest
from conftest import Daemon, new_id

import convstore
from convstore import (
    BadRequestError,
    Client,
    Conversation,
    Message,
    NotFoundError,
    TransportError,
    UnauthorizedError,
)


def conversation(cid: str, user: str, text: str) -> Conversation:
    return Conversation(
        id=cid,
        user_id=user,
        channel="pytest",
        messages=[
            Message("user", text, ts=datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)),
            Message("assistant", "Noted: " + text, message_id="m-2"),
        ],
        summary="a test",
        metadata={"suite": "python", "n": 1},
    )


def test_store_stored_then_get(connect: Dict[str, Any]) -> None:
    cid, user = new_id(), new_id("u")
    with Client(**connect) as cs:
        ack = cs.store(conversation(cid, user, "Book me a flight to Seattle"), wait="stored")
        assert ack.id == cid
        assert ack.status == "stored"
        got = cs.get(cid)
    assert got.stored
    assert got.client_id == cid
    assert got.user_id == user and got.channel == "pytest"
    assert got.messages is not None
    assert [(m.role, m.content) for m in got.messages] == [
        ("user", "Book me a flight to Seattle"),
        ("assistant", "Noted: Book me a flight to Seattle"),
    ]
    assert got.messages[1].message_id == "m-2"
    assert got.metadata == {"suite": "python", "n": 1}
    assert got.summary == "a test"
    assert got.versions == 1
    assert got.chunks, "a stored conversation has chunks"
    assert {c.embedding_status for c in got.chunks} == {"embedded"}
    assert {c.model for c in got.chunks} == {"pytest-embed"}


def test_store_dict_without_id_gets_a_uuid(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    with Client(**connect) as cs:
        ack = cs.store(
            {
                "user_id": user,
                "channel": "web",
                "messages": [{"role": "user", "content": "hello from a plain dict"}],
            }
        )
        assert ack.status == "queued"
        assert len(ack.id) == 36 and ack.id.count("-") == 4
        got = cs.get(ack.id)
    # Queued or already stored: either way the same row.
    assert got.status in ("queued", "stored")
    assert got.row_id == ack.id


def test_search_finds_what_was_stored(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    target = new_id()
    with Client(**connect) as cs:
        cs.store(conversation(target, user, "refund for a cancelled order"), wait="stored")
        cs.store(conversation(new_id(), user, "weather in Lisbon tomorrow"), wait="stored")
        results = cs.search("refund cancelled order", k=2, filter={"user_id": user})
    assert len(results) == 2
    assert results[0].id == target
    assert results[0].user_id == user
    assert "refund" in results[0].text
    assert results[0].score > results[1].score
    assert results.model == "pytest-embed"


def test_search_mode_is_passed_through(connect: Dict[str, Any]) -> None:
    """`mode` goes to the server as is: a daemon without search modes
    refuses the unknown field, naming it (this one has none yet)."""
    with Client(**connect) as cs:
        try:
            results = cs.search("anything", k=1, mode="semantic")
        except BadRequestError as e:
            assert e.field == "mode", e
        else:
            assert results.raw.get("mode", "semantic") == "semantic"


def test_append_in_order_and_idempotent(connect: Dict[str, Any]) -> None:
    cid, user = new_id(), new_id("u")
    with Client(**connect) as cs:
        cs.store(conversation(cid, user, "first"), wait="stored")
        ack = cs.append(cid, [Message("user", "second", message_id="m-3")], wait="stored")
        assert (ack.id, ack.status) == (cid, "stored")
        # The same message id again: not added twice.
        cs.append(cid, [{"role": "user", "content": "second", "message_id": "m-3"}], wait="stored")
        cs.append(cid, [{"role": "assistant", "content": "third"}], wait="stored")
        got = cs.get(cid)
        assert got.messages is not None
        assert [m.content for m in got.messages] == ["first", "Noted: first", "second", "third"]
        assert got.versions >= 3
        with pytest.raises(NotFoundError) as missing:
            cs.append(new_id("never"), [{"role": "user", "content": "x"}])
    assert missing.value.status == 404
    assert missing.value.code == "not_found"


def test_delete(connect: Dict[str, Any]) -> None:
    cid, user = new_id(), new_id("u")
    with Client(**connect) as cs:
        cs.store(conversation(cid, user, "to be deleted"), wait="stored")
        deleted = cs.delete(cid)
        assert deleted.id == cid and deleted.deleted
        assert deleted.chunks >= 1
        with pytest.raises(NotFoundError):
            cs.get(cid)
        with pytest.raises(NotFoundError) as again:
            cs.delete(cid)
    assert again.value.code == "not_found"


def test_erase_user(connect: Dict[str, Any]) -> None:
    user, other = new_id("u"), new_id("u")
    ids = [new_id() for _ in range(3)]
    with Client(**connect) as cs:
        for cid in ids:
            cs.store(conversation(cid, user, f"private note {cid}"), wait="stored")
        kept = cs.store(conversation(new_id(), other, "someone else"), wait="stored")
        erased = cs.erase_user(user)
        assert erased.user_id == user and erased.erased
        assert erased.conversations == 3
        assert erased.chunks >= 3
        for cid in ids:
            with pytest.raises(NotFoundError):
                cs.get(cid)
        assert len(cs.search("private note", k=5, filter={"user_id": user})) == 0
        assert cs.get(kept.id).stored
        # Safe to repeat.
        assert cs.erase_user(user).conversations == 0


def test_invalid_field_raises_with_its_name(connect: Dict[str, Any]) -> None:
    with Client(**connect) as cs:
        with pytest.raises(BadRequestError) as empty:
            cs.store(
                {"user_id": "u", "channel": "web", "messages": [{"role": "user", "content": ""}]}
            )
        with pytest.raises(BadRequestError) as missing:
            cs.store({"channel": "web", "messages": [{"role": "user", "content": "hi"}]})
        with pytest.raises(BadRequestError) as k:
            cs.search("flights", k=0)
    assert empty.value.status == 400
    assert empty.value.code == "invalid_field"
    assert empty.value.field == "messages[0].content"
    assert missing.value.field == "user_id"
    assert k.value.field == "k"
    assert "messages[0].content" in str(empty.value)
    assert isinstance(empty.value, convstore.APIError)


def test_store_many_per_item_results_in_chunks(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    items: list[Any] = [conversation(new_id(), user, f"batch item {i}") for i in range(25)]
    items[7] = {"user_id": user, "channel": "web", "messages": [{"role": "bogus", "content": "x"}]}
    with Client(**connect, max_batch_items=10) as cs:
        # A generator: store_many consumes it lazily, chunk by chunk.
        result = cs.store_many((c for c in items), wait="stored")
        assert result.requests == 3
        assert len(result) == 25
        assert [r.index for r in result] == list(range(25))
        assert result.accepted == 24 and result.rejected == 1
        bad = result.results[7]
        assert bad.status == "rejected" and bad.id is None
        assert bad.error is not None and bad.error.field == "messages[0].role"
        assert [r.index for r in result.errors] == [7]
        for i, r in enumerate(result):
            if i != 7:
                assert r.status == "stored"
                assert r.id == items[i].id
        assert cs.get(items[24].id).stored


def test_store_many_splits_on_413(daemon: Daemon) -> None:
    """A client that assumes larger limits than the server's: each 413
    halves the request until it fits (server.max_body_bytes is 1 MiB)."""
    user = new_id("u")
    big = "x " * 100_000  # 200 KB (limits.max_content_bytes is 256 KiB)
    items = [
        {"id": new_id(), "user_id": user, "channel": "web", "transcript": big + str(i)}
        for i in range(6)
    ]
    with Client(**daemon.unix_kwargs(), max_batch_bytes=64 << 20) as cs:
        result = cs.store_many(items)
    assert result.ok, result.errors
    # 1.2 MB refused whole (413), then two halves of 600 KB.
    assert result.requests == 3
    assert [r.id for r in result] == [i["id"] for i in items]


def test_stats_and_health(connect: Dict[str, Any]) -> None:
    with Client(**connect) as cs:
        health = cs.health()
        stats = cs.stats()
    assert health.ready and health.reasons == []
    assert health.detail["database"] == "ok"
    assert "queue" in stats


def test_http_without_token_is_unauthorized(daemon: Daemon) -> None:
    with Client(daemon.url, token="") as cs:
        with pytest.raises(UnauthorizedError) as e:
            cs.get("anything")
    assert e.value.status == 401 and e.value.code == "unauthorized"


def test_nothing_listening_is_a_transport_error(tmp_path: Any) -> None:
    with Client(unix_socket=str(tmp_path / "none.sock")) as cs:
        with pytest.raises(TransportError) as e:
            cs.health()
    assert "none.sock" in str(e.value)


def test_environment_picks_the_endpoint(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVSTORE_URL", raising=False)
    monkeypatch.setenv("CONVSTORE_SOCKET", str(daemon.socket))
    with Client() as cs:
        assert cs.endpoint.unix_socket == str(daemon.socket)
        assert cs.health().ready
    monkeypatch.setenv("CONVSTORE_URL", daemon.url)
    monkeypatch.setenv("CONVSTORE_TOKEN", daemon.token or "")
    with Client() as cs:
        assert cs.endpoint.unix_socket is None and cs.endpoint.base_url == daemon.url
        # The token from CONVSTORE_TOKEN: a read needs it over HTTP.
        with pytest.raises(NotFoundError):
            cs.get(new_id("never"))
