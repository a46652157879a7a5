"""Where a client connects when it is not told (no daemon needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from convstore import DEFAULT_URL
from convstore._endpoint import default_socket, resolve


def test_default_socket_follows_the_daemon() -> None:
    assert default_socket({}, 0) == Path("/run/convstore/convstore.sock")
    assert default_socket({"XDG_RUNTIME_DIR": "/r"}, 1000) == Path("/r/convstore/convstore.sock")
    assert default_socket({"XDG_STATE_HOME": "/s"}, 1000) == Path("/s/convstore/convstore.sock")
    assert default_socket({"HOME": "/h"}, 1000) == Path("/h/.local/state/convstore/convstore.sock")


def test_explicit_then_environment() -> None:
    env = {"CONVSTORE_URL": "http://10.0.0.1:7070/", "CONVSTORE_SOCKET": "/tmp/s.sock"}
    assert resolve("http://h:1", None, env).base_url == "http://h:1"
    assert resolve(None, "/x.sock", env).unix_socket == "/x.sock"
    assert resolve(None, None, env).base_url == "http://10.0.0.1:7070"
    assert resolve(None, None, {"CONVSTORE_SOCKET": "/tmp/s.sock"}).unix_socket == "/tmp/s.sock"
    with pytest.raises(ValueError):
        resolve("http://h:1", "/x.sock", env)


def test_default_socket_only_when_it_is_a_socket(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        if Path("/run/convstore/convstore.sock").exists():
            pytest.skip("a convstore daemon's socket exists on this machine")
        # Nothing at the default socket: HTTP on the default port.
        assert resolve(None, None, {}).base_url == DEFAULT_URL
        return
    sock = tmp_path / "convstore" / "convstore.sock"
    sock.parent.mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert resolve(None, None, env).base_url == DEFAULT_URL
    sock.write_text("not a socket")
    assert resolve(None, None, env).base_url == DEFAULT_URL
    sock.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    try:
        assert resolve(None, None, env).unix_socket == str(sock)
    finally:
        listener.close()
