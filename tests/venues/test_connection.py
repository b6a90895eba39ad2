"""The shared WebSocket connection against a real local WebSocket server (and the
simulator): paced subscribes, pings answered, stall watchdog, rotation, backoff, stop."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from tasks import venues
from tasks.venues import venue_config
from tasks.venues.connection import Connection, ConnectionPolicy, rotation_delay

HEARTBEAT = '{"channel":"heartbeats","timestamp":"2024-01-02T03:04:05.678Z","events":[]}'


class Server:
    """A real WebSocket server in a thread; ``behave(ws, received)`` per connection."""

    def __init__(self, behave: Callable[[ServerConnection, list], None], **kw):
        self.received: list[tuple[float, str]] = []
        self.connections = 0

        def handler(ws: ServerConnection) -> None:
            self.connections += 1
            behave(ws, self.received)

        self._server = serve(handler, "127.0.0.1", 0, compression=None, **kw)
        self.url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


def _coinbase(url: str, **config):
    cfg = replace(venues.default_config("coinbase"), ws_url=url, **config)
    return venues.venue("coinbase", cfg)


def _run(conn: Connection, seconds: float) -> None:
    t = threading.Thread(target=conn.run, daemon=True)
    t.start()
    time.sleep(seconds)
    conn.stop()
    t.join(60)
    assert not t.is_alive(), "stop() did not end run() within 60 s"


def _chatty(ws: ServerConnection, received: list) -> None:
    """Record what the client sends; send a heartbeat frame every 50 ms."""

    def read() -> None:
        try:
            for msg in ws:
                received.append((time.monotonic(), msg))
        except ConnectionClosed:
            return

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            ws.send(HEARTBEAT)
            time.sleep(0.05)
    except ConnectionClosed:
        return


def test_subscribes_are_paced_and_server_pings_answered():
    # The server pings every 0.2 s and drops a client that does not pong within 0.5 s.
    server = Server(_chatty, ping_interval=0.2, ping_timeout=0.5)
    frames: list[bytes] = []
    try:
        venue = _coinbase(server.url, subscribe_rate_per_s=5.0)
        conn = Connection(
            venue, ["BTC-USD"], ["trades", "quotes"], lambda raw, us: frames.append(raw)
        )
        _run(conn, 2.5)
    finally:
        server.close()
    sent = [msg for _, msg in server.received]
    assert sent == venue.subscribe_frames(["BTC-USD"], ["trades", "quotes"])
    times = [t for t, _ in server.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 2 and min(gaps) >= 0.19, gaps  # 5 per second at most
    assert conn.connects == 1 and not conn.reconnects, conn.reconnects
    assert len(frames) > 20 and frames[0] == HEARTBEAT.encode()


def test_stall_watchdog_reconnects_with_backoff():
    def silent(ws: ServerConnection, received: list) -> None:
        for _ in ws:  # keep the connection open, send nothing
            pass

    server = Server(silent)
    try:
        policy = ConnectionPolicy(stall_timeout_s=0.3, backoff_s=0.05, max_backoff_s=0.2)
        conn = Connection(
            _coinbase(server.url), ["BTC-USD"], ["trades"], lambda r, u: None, policy=policy
        )
        _run(conn, 2.5)
    finally:
        server.close()
    assert conn.reconnects["stall"] >= 3, conn.reconnects
    assert server.connections == conn.connects >= 4


def test_venue_closing_at_once_backs_off_exponentially():
    server = Server(lambda ws, received: ws.close())
    try:
        policy = ConnectionPolicy(backoff_s=0.1, max_backoff_s=10.0)
        conn = Connection(
            _coinbase(server.url), ["BTC-USD"], ["trades"], lambda r, u: None, policy=policy
        )
        _run(conn, 3.0)
    finally:
        server.close()
    # full jitter: attempt k waits U(0, 0.1 * 2**k); without backoff this would be hundreds
    assert 3 <= conn.reconnects["closed_by_venue"] <= 12, conn.reconnects


def test_rotation_before_the_lifetime_limit_against_the_simulator():
    from simulator.process import SimulatorProcess

    with SimulatorProcess("--symbols", "BTC-USDT", "--rate", "200") as sim:
        cfg = replace(venue_config("binance", sim.http_url), max_connection_lifetime_s=1.0)
        frames: list[int] = []
        conn = Connection(
            venues.venue("binance", cfg), ["BTC-USDT"], ["trades"], lambda r, us: frames.append(us)
        )
        _run(conn, 3.2)
    assert conn.reconnects["rotation"] >= 2 and set(conn.reconnects) == {"rotation"}
    assert len(frames) > 300
    assert all(b >= a for a, b in itertools.pairwise(frames))


@pytest.mark.parametrize("lifetime", [86_400.0, 10.0])
def test_rotation_delay_stays_inside_the_lifetime(lifetime):
    delays = [rotation_delay(lifetime) for _ in range(200)]
    margin = min(300.0, lifetime * 0.1)
    assert all(lifetime - 1.5 * margin <= d <= lifetime - margin for d in delays)
    assert max(delays) - min(delays) > margin / 10  # jittered, so shards spread out
