"""Loopback ports for tests: one the OS just handed out and nothing listens on."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on now: for a server a test starts on it, or for a
    client that must find it closed (something else may take it meanwhile, rarely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
