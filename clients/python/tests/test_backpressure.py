"""A full queue: a daemon with room for two conversations, one worker taking
one at a time and a stand-in taking 300 ms per embedding, so concurrent
stores really get 429 `queue_full` (Retry-After: 1). The client waits and
resends; everything ends up stored."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List

import pytest
from conftest import Daemon, Standin, new_id

from convstore import AsyncClient, Client, RetryEvent, TooManyRequestsError

TINY_QUEUE = """
[queue]
capacity = 2
retry_after_secs = 1

[batch]
max_size = 1
max_wait_ms = 1

[pipeline]
workers = 1
"""


@pytest.fixture(scope="module")
def slow_daemon() -> Iterator[Daemon]:
    standin = Standin("--latency-ms", "300")
    try:
        d = Daemon(standin, TINY_QUEUE)
        yield d
        d.stop()
    finally:
        standin.stop()


def convo(user: str, i: int) -> Dict[str, Any]:
    return {
        "id": new_id(),
        "user_id": user,
        "channel": "pytest-429",
        # Distinct texts: no embedding cache hit shortens the work.
        "messages": [{"role": "user", "content": f"conversation {i} of {user}"}],
    }


def wait_all_stored(cs: Client, ids: List[str], limit: float = 90.0) -> None:
    started = time.monotonic()
    left = list(ids)
    while left:
        left = [cid for cid in left if not cs.get(cid).stored]
        if left and time.monotonic() - started > limit:
            pytest.fail(f"{len(left)} of {len(ids)} not stored after {limit} s")
        if left:
            time.sleep(0.2)


def test_full_queue_is_retried_and_succeeds(slow_daemon: Daemon) -> None:
    events: List[RetryEvent] = []
    lock = threading.Lock()

    def seen(event: RetryEvent) -> None:
        with lock:
            events.append(event)

    user = new_id("u")
    items = [convo(user, i) for i in range(10)]
    with Client(**slow_daemon.unix_kwargs(), retry_deadline=60, on_retry=seen) as cs:
        with ThreadPoolExecutor(len(items)) as pool:
            acks = list(pool.map(cs.store, items))
        assert [a.id for a in acks] == [c["id"] for c in items]
        assert all(a.status == "queued" for a in acks)
        assert events, "no 429 seen: the queue was never full, the test proves nothing"
        assert cs.retries == len(events)
        assert {e.status for e in events} == {429}
        assert {e.code for e in events} == {"queue_full"}
        assert all(e.delay == pytest.approx(1.0, abs=0.01) for e in events)
        wait_all_stored(cs, [c["id"] for c in items])


@pytest.mark.anyio
async def test_store_many_resends_the_refused_tail(slow_daemon: Daemon) -> None:
    user = new_id("u")
    items = [convo(user, i) for i in range(12)]
    async with AsyncClient(**slow_daemon.unix_kwargs(), retry_deadline=60) as cs:
        result = await cs.store_many(items)
        assert result.ok, result.errors
        assert result.ids == [c["id"] for c in items]
        # The queue holds two: the rest was refused and sent again.
        assert cs.retries >= 1
        assert result.requests == 1 + cs.retries
    with Client(**slow_daemon.unix_kwargs()) as sync:
        wait_all_stored(sync, [c["id"] for c in items])


def test_retries_stop_at_the_deadline(slow_daemon: Daemon) -> None:
    user = new_id("u")
    items = [convo(user, i) for i in range(8)]
    refused: List[TooManyRequestsError] = []
    accepted: List[str] = []
    lock = threading.Lock()

    def store(cs: Client, item: Dict[str, Any]) -> None:
        try:
            ack = cs.store(item)
        except TooManyRequestsError as e:
            with lock:
                refused.append(e)
        else:
            with lock:
                accepted.append(ack.id)

    with Client(**slow_daemon.unix_kwargs(), retry_deadline=0) as cs:
        started = time.monotonic()
        with ThreadPoolExecutor(len(items)) as pool:
            list(pool.map(lambda item: store(cs, item), items))
        took = time.monotonic() - started
        assert refused, "eight at once into a queue of two: some must be refused"
        assert cs.retries == 0
        # No retry: refused at once, not after Retry-After.
        assert took < 1.0
        e = refused[0]
        assert (e.status, e.code, e.retry_after) == (429, "queue_full", 1.0)
        assert len(accepted) + len(refused) == len(items)
        wait_all_stored(cs, accepted)
