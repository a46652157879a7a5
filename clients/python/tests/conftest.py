"""The real daemon for the tests: `convstore serve` as a child process with its
own managed PostgreSQL cluster in a temp directory, the embedding stand-in
(`convstore-standin`) as another, both on 127.0.0.1 / a Unix socket in that
directory, killed at the end. No mocks.

Binaries: `target/debug/convstore` and `target/debug/convstore-standin` of
this checkout (`cargo build -p convstore -p convstore-standin`; scripts/test.sh
runs `cargo test` first, which builds them), or CONVSTORE_BIN /
CONVSTORE_STANDIN_BIN. PostgreSQL: what `scripts/setup.sh` installs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
MODEL = "pytest-embed"
DIMENSIONS = 64
#: The bearer token of the session daemon's HTTP listener (the Unix socket
#: needs none: auth.require_on_unix_socket = false).
TOKEN = "pytest-token-" + uuid.uuid4().hex


def _binary(env: str, name: str) -> Path:
    path = Path(os.environ.get(env) or REPO / "target" / "debug" / name)
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} is missing: build it with `cargo build -p convstore -p convstore-standin` "
            f"(or set {env})",
            pytrace=False,
        )
    return path


_setup_checked: List[bool] = []


def _require_setup() -> None:
    """What the managed cluster needs (scripts/setup.sh --check installs nothing)."""
    if _setup_checked:
        return
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        pytest.fail(f"scripts/setup.sh --check failed:\n{out.stdout}{out.stderr}", pytrace=False)
    _setup_checked.append(True)


class Standin:
    """`convstore-standin` on a free loopback port."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                str(_binary("CONVSTORE_STANDIN_BIN", "convstore-standin")),
                "--listen",
                "127.0.0.1:0",
                "--model",
                MODEL,
                "--dimensions",
                str(DIMENSIONS),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line: List[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self.proc.stdout.readline() if self.proc.stdout else ""),
            daemon=True,
        )
        reader.start()
        reader.join(30)
        if not line or not line[0].startswith("listening on "):
            self.stop()
            pytest.fail(f"the stand-in did not start: {line!r}", pytrace=False)
        self.addr = line[0].split("listening on ", 1)[1].strip()
        self.url = f"http://{self.addr}"

    def set_faults(self, **update: Any) -> None:
        """`POST /_standin/faults` (e.g. latency_per_request_ms=500)."""
        r = httpx.post(f"{self.url}/_standin/faults", json=update, timeout=10, trust_env=False)
        r.raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


class Daemon:
    """`convstore serve` in a private temp directory: state, managed cluster,
    socket and log. Its HTTP listener is bound here, on a free loopback port,
    and passed to it the way systemd passes sockets (LISTEN_FDS), so no other
    process can take the port between choosing and binding it."""

    def __init__(self, standin: Standin, extra_toml: str = "", token: Optional[str] = None) -> None:
        _require_setup()
        self.dir = Path(tempfile.mkdtemp(prefix="convstore-pytest-"))
        # Under root the managed PostgreSQL runs as an unprivileged account,
        # which must traverse this directory.
        self.dir.chmod(0o755)
        self.socket = self.dir / "convstore.sock"
        self.log = self.dir / "daemon.log"
        self.config = self.dir / "convstore.toml"
        self.token = token
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        host, port = listener.getsockname()
        self.http_addr = f"{host}:{port}"
        self.url = f"http://{self.http_addr}"
        auth = ""
        if token is not None:
            auth = f"""
[[auth.tokens]]
name = "pytest"
sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
scopes = ["ingest", "read", "delete"]
"""
        self.config.write_text(
            f"""state_dir = "{self.dir / 'state'}"

[server]
http_addr = "{self.http_addr}"
unix_socket = "{self.socket}"

[database]
managed_shared_buffers = "16MB"
pool_size = 4

[embedding]
model = "{MODEL}"
dimensions = {DIMENSIONS}
retry_initial_ms = 20
retry_max_ms = 500

[[embedding.backends]]
name = "standin"
kind = "ollama"
url = "{standin.url}"
timeout_ms = 10000
{auth}
{extra_toml}
"""
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSTORE_")}
        env["RUST_LOG"] = "info"
        env.pop("LISTEN_FDS", None)
        fd = listener.fileno()
        with open(self.log, "wb") as log:
            # bash (dash takes one-digit descriptors only) moves the listener to
            # descriptor 3 and exports LISTEN_PID as
            # its own pid, which the daemon keeps through exec.
            self.proc = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" serve --config "$1" 3<&{fd} {fd}<&-',
                    str(_binary("CONVSTORE_BIN", "convstore")),
                    str(self.config),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(fd,),
            )
        listener.close()
        self._wait_ready(90)

    def _wait_ready(self, limit: float) -> None:
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                log = self.log_tail()
                self.stop()
                pytest.fail(
                    f"convstore exited during start-up ({self.proc.returncode}); log:\n{log}",
                    pytrace=False,
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > limit:
                log = self.log_tail()
                self.stop()
                pytest.fail(f"convstore not ready after {limit} s; log:\n{log}", pytrace=False)
            time.sleep(0.1)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (the daemon drains, stops its PostgreSQL, exits), SIGKILL
        after 30 s; then removes the directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if os.environ.get("CONVSTORE_KEEP_TEST_DIRS"):
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def http_kwargs(self) -> Dict[str, Any]:
        return {"base_url": self.url, "token": self.token}

    def unix_kwargs(self) -> Dict[str, Any]:
        return {"unix_socket": str(self.socket)}


@pytest.fixture(scope="session")
def standin() -> Iterator[Standin]:
    s = Standin()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def daemon(standin: Standin) -> Iterator[Daemon]:
    """One daemon for the session, with a bearer token on HTTP."""
    d = Daemon(standin, token=TOKEN)
    yield d
    d.stop()


@pytest.fixture(params=["unix", "http"])
def connect(request: pytest.FixtureRequest, daemon: Daemon) -> Dict[str, Any]:
    """Client arguments for the session daemon: over its Unix socket, then
    over HTTP (with the token)."""
    return daemon.unix_kwargs() if request.param == "unix" else daemon.http_kwargs()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def new_id(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
