"""The client's overhead: `Client.store(wait="queued")` against a raw httpx
POST of the same conversation over the same Unix socket, N round trips each.

    python bench/overhead.py                 # starts a daemon + stand-in (as the tests do)
    python bench/overhead.py --socket PATH   # a daemon already running

Both sides send the same conversation (a fresh id each time) and read the
JSON answer: the raw side does `json.dumps`, `httpx.Client.post` and
`response.json()` by hand; the client side is one `store` call (building
the body, the request, the status check and the `Ack`). They alternate in
blocks of 100 after a warm-up, so drift in the daemon (queue, database,
CPU frequency) falls on both alike. Prints a Markdown table of p50/p90/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List

import httpx

import convstore

HERE = Path(__file__).resolve().parent


def conversation(run: str, i: int) -> Dict[str, Any]:
    return {
        "id": f"bench-{run}-{i}",
        "user_id": "bench-user",
        "channel": "bench",
        "messages": [
            {"role": "user", "content": "Book me a flight to Seattle on Friday, economy please."},
            {"role": "assistant", "content": "Done: Friday 9:40, economy, window seat."},
        ],
        "metadata": {"locale": "en-US"},
    }


def percentile(sorted_ns: List[int], p: float) -> float:
    k = min(len(sorted_ns) - 1, max(0, round(p / 100 * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1000.0


def canned(request: httpx.Request) -> httpx.Response:
    """An in-process answer (no daemon, no socket): what is left is the
    client-side cost alone."""
    return httpx.Response(202, json={"id": "bench", "status": "queued"})


def measure(socket_path: str, n: int, block: int, in_process: bool = False) -> Dict[str, List[int]]:
    run = uuid.uuid4().hex[:8]
    transport: httpx.BaseTransport = (
        httpx.MockTransport(canned) if in_process else httpx.HTTPTransport(uds=socket_path)
    )
    raw_http = httpx.Client(base_url="http://convstore", transport=transport, trust_env=False)
    cs = convstore.Client(unix_socket=socket_path)
    if in_process:
        cs._http.close()
        cs._http = httpx.Client(base_url="http://convstore", transport=transport, trust_env=False)
    counter = [0]

    def raw_once() -> None:
        counter[0] += 1
        body = json.dumps(conversation(run, counter[0])).encode()
        r = raw_http.post(
            "/v1/conversations", content=body, headers={"content-type": "application/json"}
        )
        if r.status_code != 202:
            raise RuntimeError(f"raw: {r.status_code} {r.text}")
        r.json()

    def client_once() -> None:
        counter[0] += 1
        cs.store(conversation(run, counter[0]))

    sides: Dict[str, Callable[[], None]] = {"raw httpx": raw_once, "convstore.Client": client_once}
    for fn in sides.values():  # warm-up: connections, caches, the daemon's pools
        for _ in range(200):
            fn()
    times: Dict[str, List[int]] = {name: [] for name in sides}
    done = 0
    while done < n:
        for name, fn in sides.items():
            for _ in range(min(block, n - done)):
                t0 = time.perf_counter_ns()
                fn()
                times[name].append(time.perf_counter_ns() - t0)
        done += min(block, n - done)
    cs.close()
    raw_http.close()
    return times


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, httpx {httpx.__version__}, convstore {convstore.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="a running daemon's Unix socket (default: start one)")
    parser.add_argument("-n", type=int, default=3000, help="round trips per side (default 3000)")
    parser.add_argument("--block", type=int, default=100, help="alternation block (default 100)")
    args = parser.parse_args()
    if args.n < 2000:
        print("note: fewer than 2000 round trips make p99 noisy", file=sys.stderr)

    daemon = standin = None
    socket_path = args.socket
    if socket_path is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import Daemon, Standin  # the tests' harness

        standin = Standin()
        daemon = Daemon(standin)
        socket_path = str(daemon.socket)
        print(f"daemon: {os.environ.get('CONVSTORE_BIN') or 'target/debug/convstore'}", file=sys.stderr)
    try:
        times = measure(socket_path, args.n, args.block)
        local = measure(socket_path, args.n, args.block, in_process=True)
    finally:
        if daemon is not None:
            daemon.stop()
        if standin is not None:
            standin.stop()

    print(f"{args.n} calls each, POST /v1/conversations (wait=queued); machine: {machine()}\n")
    table("round trip to the daemon over its Unix socket", times)
    table("in process (httpx.MockTransport answering 202 at once: the client-side cost alone)", local)
    return 0


def table(title: str, times: Dict[str, List[int]]) -> None:
    print(f"{title}:\n")
    print("| | p50 µs | p90 µs | p99 µs | mean µs |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for name, ns in times.items():
        s = sorted(ns)
        rows[name] = (percentile(s, 50), percentile(s, 90), percentile(s, 99), statistics.fmean(s) / 1000)
        p50, p90, p99, mean = rows[name]
        print(f"| {name} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {mean:.1f} |")
    raw, cli = rows["raw httpx"], rows["convstore.Client"]
    print(
        f"| difference | {cli[0] - raw[0]:+.1f} | {cli[1] - raw[1]:+.1f} | "
        f"{cli[2] - raw[2]:+.1f} | {cli[3] - raw[3]:+.1f} |\n"
    )


if __name__ == "__main__":
    sys.exit(main())
