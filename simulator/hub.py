"""Connections, subscriptions and fan-out: the part every venue shares.

Each connection gets a bounded frame queue and one writer task. The pacing loop only
appends to queues (never waits on a socket), so one slow reader cannot hold up the
others; a reader whose queue reaches the bound is closed, as a real venue drops a slow
consumer, instead of letting memory grow. Connection faults (drop, serverShutdown,
stall) are applied here, counted by frames written to the connection.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import Protocol

from simulator.faults import FaultSettings

Key = tuple[str, str]  # (channel, canonical symbol): 'trade', 'quote', a book channel


@dataclass(slots=True)
class VenueCounters:
    connections: int = 0
    open: int = 0
    frames: int = 0
    disconnects: int = 0  # connections aborted by the drop fault
    slow_drops: int = 0  # connections closed because their queue hit the bound
    shutdowns: int = 0  # serverShutdown notices sent (one per connection)
    stalls: int = 0


class Client:
    """One WebSocket connection, whatever the venue."""

    __slots__ = (
        "closing",
        "combined",
        "frames",
        "id",
        "keys",
        "opened_ms",
        "queue",
        "seq",
        "stall_until",
        "state",
        "venue",
        "wake",
        "writer",
        "ws",
    )

    def __init__(self, cid: int, venue: str, ws: ServerConnection | None):
        self.id = cid
        self.venue = venue
        self.ws = ws
        self.queue: deque[str] = deque()
        self.wake = asyncio.Event()
        self.keys: set[Key] = set()
        self.frames = 0
        self.combined = True  # Binance: combined envelope (/stream) or raw payload (/ws)
        self.seq = 0  # Coinbase sequence_num
        self.state: dict[str, Any] = {}  # venue-specific extras (e.g. Coinbase channels)
        self.stall_until = 0.0
        self.closing = False
        self.writer: asyncio.Task | None = None

    def next_seq(self) -> int:
        n = self.seq
        self.seq += 1
        return n


class Hub:
    def __init__(self, venues: list[str], settings: dict[str, FaultSettings], max_queue: int):
        self.max_queue = max_queue
        self.settings = settings
        self.subs: dict[str, dict[Key, set[Client]]] = {v: {} for v in venues}
        self.clients: dict[str, set[Client]] = {v: set() for v in venues}
        self.counters: dict[str, VenueCounters] = {v: VenueCounters() for v in venues}
        self.shutdown_grace_s = 1.0
        self.shutdown_frame: dict[str, Callable[[Client], str | None]] = {}
        self._ids = itertools.count(1)
        self._closing: set[asyncio.Task] = set()  # close handshakes under way (kept alive)

    # ---- membership ---------------------------------------------------------------------

    def attach(self, venue: str, ws: ServerConnection | None) -> Client:
        c = Client(next(self._ids), venue, ws)
        self.clients[venue].add(c)
        cnt = self.counters[venue]
        cnt.connections += 1
        cnt.open += 1
        if ws is not None:
            c.writer = asyncio.get_running_loop().create_task(self._write(c))
        return c

    def detach(self, c: Client) -> None:
        if c in self.clients[c.venue]:
            self.clients[c.venue].discard(c)
            self.counters[c.venue].open -= 1
        for key in list(c.keys):
            self.unsubscribe(c, key)
        c.closing = True
        c.queue.clear()
        if c.writer is not None and c.writer is not asyncio.current_task():
            c.writer.cancel()

    def subscribe(self, c: Client, key: Key) -> None:
        c.keys.add(key)
        self.subs[c.venue].setdefault(key, set()).add(c)

    def unsubscribe(self, c: Client, key: Key) -> None:
        c.keys.discard(key)
        group = self.subs[c.venue].get(key)
        if group is not None:
            group.discard(c)
            if not group:
                del self.subs[c.venue][key]

    def subscribers(self, venue: str, key: Key) -> set[Client]:
        return self.subs[venue].get(key) or _EMPTY

    # ---- sending ------------------------------------------------------------------------

    def push(self, c: Client, frame: str) -> bool:
        """Queue a frame; a client already ``max_queue`` frames behind is dropped instead."""
        if c.closing:
            return False
        q = c.queue
        if len(q) >= self.max_queue:
            self.counters[c.venue].slow_drops += 1
            self.close(c, 1008, "slow consumer: send queue full")
            return False
        q.append(frame)
        if len(q) == 1:
            c.wake.set()
        return True

    def fan_out(self, venue: str, key: Key, frame: str) -> int:
        group = self.subs[venue].get(key)
        if not group:
            return 0
        for c in tuple(group):
            self.push(c, frame)
        return len(group)

    def close(self, c: Client, code: int, reason: str) -> None:
        """Close politely (close frame) after whatever is already queued is dropped."""
        ws = c.ws
        self.detach(c)
        if ws is not None:
            task = asyncio.get_running_loop().create_task(ws.close(code, reason))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def abort(self, c: Client) -> None:
        """Cut the TCP connection without a close frame (a network drop)."""
        self.counters[c.venue].disconnects += 1
        ws = c.ws
        self.detach(c)
        if ws is not None:
            ws.transport.abort()

    def drop_all(self, venue: str) -> int:
        victims = list(self.clients[venue])
        for c in victims:
            self.abort(c)
        return len(victims)

    def stall_all(self, venue: str, seconds: float) -> int:
        until = asyncio.get_running_loop().time() + seconds
        for c in self.clients[venue]:
            c.stall_until = until
            self.counters[venue].stalls += 1
        return len(self.clients[venue])

    def shutdown(self, c: Client) -> None:
        """Send the venue's shutdown notice (if it has one), then close after the grace."""
        self.counters[c.venue].shutdowns += 1
        make = self.shutdown_frame.get(c.venue)
        frame = make(c) if make else None
        if frame is not None:
            c.queue.appendleft(frame)  # notices jump the queue, as the venue's control plane
            c.wake.set()
        loop = asyncio.get_running_loop()
        loop.call_later(self.shutdown_grace_s, self._close_if_open, c)

    def shutdown_all(self, venue: str) -> int:
        victims = list(self.clients[venue])
        for c in victims:
            self.shutdown(c)
        return len(victims)

    def _close_if_open(self, c: Client) -> None:
        if not c.closing:
            self.close(c, 1001, "server shutdown")

    async def _write(self, c: Client) -> None:
        ws = c.ws
        assert ws is not None
        q = c.queue
        loop = asyncio.get_running_loop()
        counters = self.counters[c.venue]
        faults = self.settings[c.venue]
        try:
            while not c.closing:
                if not q:
                    c.wake.clear()
                    await c.wake.wait()
                    continue
                if c.stall_until:
                    wait = c.stall_until - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    c.stall_until = 0.0
                    continue
                # stop each batch exactly at the next connection-fault boundary
                n = min(len(q), BATCH, _room(c.frames, faults))
                await _send(ws, [q.popleft() for _ in range(n)])
                c.frames += n
                counters.frames += n
                sent = c.frames
                if faults.drop_every and sent % faults.drop_every == 0:
                    self.abort(c)
                    return
                if faults.shutdown_every and sent % faults.shutdown_every == 0:
                    self.shutdown(c)
                if faults.stall_every and sent % faults.stall_every == 0:
                    counters.stalls += 1
                    c.stall_until = loop.time() + faults.stall_s
        except ConnectionClosed:
            pass


BATCH = 512  # frames per socket write


def _room(sent: int, f: FaultSettings) -> int:
    """Frames that can be written before the next drop/shutdown/stall boundary."""
    room = BATCH
    for every in (f.drop_every, f.shutdown_every, f.stall_every):
        if every:
            room = min(room, every - sent % every)
    return room


async def _send(ws: ServerConnection, frames: list[str]) -> None:
    """Send each frame as its own text message, with one socket write for the batch.

    websockets' ``send()`` does, per message, ``send_context`` around
    ``protocol.send_text`` and then one ``transport.write`` per frame. Doing the same for
    a batch and joining the frames into one write saves a coroutine round trip and a
    syscall per message, most of the cost at tens of thousands of messages a second.
    The bytes are what websockets would have written, in the same order. Falls back to
    ``send()`` per message if websockets changes those internals.
    """
    if not _BATCHED:
        for frame in frames:
            await ws.send(frame)
        return
    async with ws.send_context():
        protocol = ws.protocol
        for frame in frames:
            protocol.send_text(frame.encode())
        chunks = protocol.data_to_send()  # leaves nothing for send_context to write
        data = b"".join(chunks)
        if data:
            ws.transport.write(data)
        if not all(chunks):  # an empty chunk asks for EOF, as websockets' send_data does
            if ws.transport.can_write_eof():
                ws.transport.write_eof()
            else:
                ws.transport.close()


_BATCHED = all(
    (
        hasattr(ServerConnection, "send_context"),
        hasattr(Protocol, "send_text"),
        hasattr(Protocol, "data_to_send"),
    )
)


_EMPTY: set[Client] = set()
