"""The LangChain extra against the real daemon."""

from __future__ import annotations

from typing import Any, Dict

import pytest
from conftest import Daemon, new_id

pytest.importorskip("langchain_core", reason="the langchain extra is not installed")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402

from convstore import AsyncClient, Client  # noqa: E402
from convstore.langchain import ConvstoreChatMessageHistory, ConvstoreRetriever  # noqa: E402


def test_history_appends_per_turn_and_reads_back(connect: Dict[str, Any]) -> None:
    cid, user = new_id("chat"), new_id("u")
    with Client(**connect) as cs:
        history = ConvstoreChatMessageHistory(cid, user_id=user, client=cs)
        assert history.messages == []
        history.add_messages([SystemMessage("You book trips."), HumanMessage("A flight to Oslo")])
        history.add_ai_message("Which day?")
        history.add_user_message("Friday")
        # An AI turn with no text (tool calls only) is not stored.
        history.add_messages([AIMessage(content="")])
        got = cs.get(cid)
        assert got.user_id == user and got.channel == "langchain"
        # The first add stored it, each later one was one append.
        assert got.versions == 3

        # Another history object on the same id (a new process) sees it all.
        again = ConvstoreChatMessageHistory(cid, user_id=user, client=cs)
        msgs = again.messages
        assert [type(m).__name__ for m in msgs] == [
            "SystemMessage",
            "HumanMessage",
            "AIMessage",
            "HumanMessage",
        ]
        assert [m.content for m in msgs] == ["You book trips.", "A flight to Oslo", "Which day?", "Friday"]
        # Re-sending a turn with its id does not add it twice.
        again.add_messages([msgs[-1]])
        assert len(history.messages) == 4

        history.clear()
        assert history.messages == []
        # A conversation started again after clear() is kept.
        history.add_user_message("new start")
        assert [m.content for m in history.messages] == ["new start"]
        history.clear()


@pytest.mark.anyio
async def test_history_async(daemon: Daemon) -> None:
    cid, user = new_id("chat"), new_id("u")
    with Client(**daemon.unix_kwargs()) as cs:
        async with AsyncClient(**daemon.unix_kwargs()) as acs:
            history = ConvstoreChatMessageHistory(cid, user_id=user, client=cs, async_client=acs)
            await history.aadd_messages([HumanMessage("hello async")])
            await history.aadd_messages([AIMessage("hi")])
            assert [m.content for m in await history.aget_messages()] == ["hello async", "hi"]
            await history.aclear()
            assert await history.aget_messages() == []


def test_retriever_over_search(connect: Dict[str, Any]) -> None:
    user = new_id("u")
    target = new_id()
    with Client(**connect) as cs:
        cs.store(
            {
                "id": target,
                "user_id": user,
                "channel": "support",
                "messages": [{"role": "user", "content": "my parcel to Berlin is late"}],
                "metadata": {"ticket": 42},
            },
            wait="stored",
        )
        cs.store(
            {
                "id": new_id(),
                "user_id": user,
                "channel": "support",
                "messages": [{"role": "user", "content": "change my password please"}],
            },
            wait="stored",
        )
        retriever = ConvstoreRetriever(client=cs, k=2, filter={"user_id": user})
        docs = retriever.invoke("parcel Berlin late")
    assert len(docs) == 2
    assert docs[0].metadata["id"] == target
    assert docs[0].metadata["user_id"] == user
    assert docs[0].metadata["metadata"] == {"ticket": 42}
    assert "parcel" in docs[0].page_content
    assert docs[0].metadata["score"] > docs[1].metadata["score"]


@pytest.mark.anyio
async def test_retriever_async(daemon: Daemon) -> None:
    user = new_id("u")
    target = new_id()
    with Client(**daemon.unix_kwargs()) as cs:
        cs.store(
            {
                "id": target,
                "user_id": user,
                "channel": "web",
                "messages": [{"role": "user", "content": "vegetarian recipes for dinner"}],
            },
            wait="stored",
        )
        async with AsyncClient(**daemon.unix_kwargs()) as acs:
            retriever = ConvstoreRetriever(
                client=cs, async_client=acs, k=1, filter={"user_id": user}
            )
            docs = await retriever.ainvoke("vegetarian dinner")
    assert [d.metadata["id"] for d in docs] == [target]
