"""AsyncClient against the real daemon, over the Unix socket and HTTP."""

from __future__ import annotations

from typing import Any, Dict

import anyio
import pytest
from conftest import new_id

from convstore import AsyncClient, BadRequestError, Message, NotFoundError

pytestmark = pytest.mark.anyio


def convo(cid: str, user: str, text: str) -> Dict[str, Any]:
    return {
        "id": cid,
        "user_id": user,
        "channel": "pytest-async",
        "messages": [{"role": "user", "content": text}],
    }


async def test_async_store_get_search_append(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    cid = new_id()
    async with AsyncClient(**connect) as cs:
        ack = await cs.store(convo(cid, user, "train tickets to Porto"), wait="stored")
        assert (ack.id, ack.status) == (cid, "stored")
        got = await cs.get(cid)
        assert got.stored and got.user_id == user
        await cs.append(cid, [Message("assistant", "Which day?")], wait="stored")
        got = await cs.get(cid)
        assert got.messages is not None
        assert [m.content for m in got.messages] == ["train tickets to Porto", "Which day?"]
        results = await cs.search("train tickets Porto", k=1, filter={"user_id": user})
        assert results.ids == [cid]


async def test_async_concurrent_stores(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    ids = [new_id() for _ in range(20)]
    async with AsyncClient(**connect) as cs:
        async with anyio.create_task_group() as tg:
            for i, cid in enumerate(ids):
                tg.start_soon(cs.store, convo(cid, user, f"concurrent {i}"))
        result = await cs.store_many(
            [convo(new_id(), user, f"many {i}") for i in range(5)], wait="stored"
        )
        assert result.ok and result.accepted == 5
        # Every one of the 20 is there, queued or stored.
        for cid in ids:
            assert (await cs.get(cid)).status in ("queued", "stored")


async def test_async_delete_and_erase(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    a, b = new_id(), new_id()
    async with AsyncClient(**connect) as cs:
        await cs.store(convo(a, user, "one"), wait="stored")
        await cs.store(convo(b, user, "two"), wait="stored")
        deleted = await cs.delete(a)
        assert deleted.deleted and deleted.id == a
        with pytest.raises(NotFoundError):
            await cs.get(a)
        erased = await cs.erase_user(user)
        assert erased.conversations == 1
        with pytest.raises(NotFoundError):
            await cs.get(b)


async def test_async_invalid_field(connect: Dict[str, Any]) -> None:
    async with AsyncClient(**connect) as cs:
        with pytest.raises(BadRequestError) as e:
            await cs.store({"user_id": "u", "channel": 7, "messages": []})
        health = await cs.health()
        stats = await cs.stats()
    assert e.value.code == "invalid_field" and e.value.field == "channel"
    assert health.ready and "queue" in stats
