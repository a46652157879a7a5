"""Where the client connects when it is not told."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

DEFAULT_URL = "http://127.0.0.1:7070"


@dataclass(frozen=True)
class Endpoint:
    """An HTTP base URL, or a Unix socket path (then ``base_url`` is the
    placeholder ``http://convstore``, as HTTP needs a host)."""

    base_url: str
    unix_socket: Optional[str] = None

    def describe(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else self.base_url


def default_socket(env: Mapping[str, str], euid: int) -> Path:
    """The daemon's default ``server.unix_socket``: ``/run/convstore/convstore.sock``
    for root; else ``$XDG_RUNTIME_DIR/convstore/convstore.sock``; else the
    state directory's ``convstore.sock`` (``$XDG_STATE_HOME/convstore`` or
    ``~/.local/state/convstore``)."""
    if euid == 0:
        return Path("/run/convstore/convstore.sock")
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "convstore" / "convstore.sock"
    state = env.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "convstore" / "convstore.sock"
    home = env.get("HOME")
    if home:
        return Path(home) / ".local" / "state" / "convstore" / "convstore.sock"
    return Path("convstore-state") / "convstore.sock"


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def resolve(
    base_url: Optional[str],
    unix_socket: Optional[str],
    env: Optional[Mapping[str, str]] = None,
) -> Endpoint:
    """``base_url`` or ``unix_socket`` when given (not both); else
    ``CONVSTORE_URL``, else ``CONVSTORE_SOCKET``; else the daemon's default
    socket when it exists; else ``http://127.0.0.1:7070``."""
    if base_url and unix_socket:
        raise ValueError("give base_url or unix_socket, not both")
    if base_url:
        return Endpoint(base_url.rstrip("/"))
    if unix_socket:
        return Endpoint("http://convstore", os.fspath(unix_socket))
    env = os.environ if env is None else env
    url = env.get("CONVSTORE_URL")
    if url:
        return Endpoint(url.rstrip("/"))
    sock = env.get("CONVSTORE_SOCKET")
    if sock:
        return Endpoint("http://convstore", sock)
    geteuid = getattr(os, "geteuid", None)
    path = default_socket(env, geteuid() if geteuid is not None else -1)
    if _is_socket(path):
        return Endpoint("http://convstore", str(path))
    return Endpoint(DEFAULT_URL)
