"""The one WebSocket connection mechanism every venue shares (websocket-client).

A ``Connection`` keeps one shard (a URL plus subscribe frames from the venue adapter)
connected for as long as it runs, and hands every raw data frame, with the time it was
read, to a callback. It never parses: the adapter does that, in the callback's thread,
so the socket reader blocks whenever the callback blocks (that is how Kafka
backpressure reaches the socket).

What it promises:

- pings are answered (websocket-client replies to each ping inside ``recv``);
- subscribe frames go out no faster than ``VenueConfig.subscribe_rate_per_s``;
- a connection that fails or drops is reconnected with exponential backoff and full
  jitter; the backoff resets once a connection has stayed up ``stable_after_s``;
- no data frame for ``stall_timeout_s`` (a stall: TCP alive, venue silent) reconnects;
- the connection is rotated before ``VenueConfig.max_connection_lifetime_s`` (each
  connection at a jittered moment, so shards do not all rotate at once);
- ``request_reconnect`` (e.g. on a venue's 'server_shutdown' notice) reconnects at once;
- ``send`` lets the frame handler answer the venue on the live socket (an application
  heartbeat such as Deribit's ``test_request``), in the reader thread, so frames never
  interleave with subscribing;
- ``stop`` ends ``run`` within ``poll_s`` from any thread and closes the socket;
- the connection URL may carry a credential (Finnhub's ``?token=``): it is never logged,
  and every error text logged here passes through ``redact`` first.

Trades missed while reconnecting are the gap tracker's business (``tasks.ingest.gaps``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import websocket

from tasks.core.metrics import LAST_MESSAGE, RECONNECTS
from tasks.venues.base import Venue, redact

FrameHandler = Callable[[bytes, int], None]
_DATA = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionPolicy:
    """Timing of one shard's connection; the defaults suit the public venues."""

    stall_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 30.0
    poll_s: float = 1.0  # socket read timeout: how often stop, stall and rotation are checked

    def __post_init__(self) -> None:
        if self.stall_timeout_s <= 0 or self.poll_s <= 0 or self.backoff_s <= 0:
            raise ValueError("stall_timeout_s, poll_s and backoff_s must be > 0")


class BufferedWebSocket(websocket.WebSocket):
    """websocket-client reads each frame with a system call per header field and one for
    the payload (about five per small market-data frame, each releasing and retaking the
    GIL the producer's network thread also needs). This reads the socket in 64 KiB chunks
    and serves frames from memory: same frames, a fraction of the calls."""

    READ_SIZE = 65536

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._at = 0

    def recv_data(self, control_frame: bool = False) -> tuple[int, bytes]:
        """The next data message. A whole, final, unmasked text or binary frame already in
        the chunk (nearly every market-data frame) is cut out of it here, without the
        library's frame-by-frame reads (5 of a frame's 7 us); anything else (control
        frames, fragments, reserved bits, 64-bit lengths, a frame cut by the chunk's end)
        and whatever the library holds half-read go through websocket-client."""
        fb = self.frame_buffer
        idle = fb.header is None and not fb.recv_buffer and not self.cont_frame.recving_frames
        if idle and self._at >= len(self._chunk):  # the read the library would start with
            self._chunk, self._at = super()._recv(self.READ_SIZE), 0
        chunk, at = self._chunk, self._at
        if (
            idle
            and len(chunk) - at >= 4
            and (chunk[at] == 0x81 or chunk[at] == 0x82)  # FIN, no reserved bits, text/binary
            and (b1 := chunk[at + 1]) <= 126  # unmasked (servers never mask), not 64-bit
        ):
            if b1 < 126:
                n, start = b1, at + 2
            else:  # a 16-bit length
                n, start = (chunk[at + 2] << 8) | chunk[at + 3], at + 4
            end = start + n
            if end <= len(chunk):
                self._at = end
                return chunk[at] & 0x0F, chunk[start:end]
        return super().recv_data(control_frame)

    def _recv(self, bufsize: int) -> bytes:
        chunk, at = self._chunk, self._at
        if at >= len(chunk):
            chunk, at = super()._recv(self.READ_SIZE), 0  # raises on timeout and close
            self._chunk = chunk
        piece = chunk[at : at + bufsize]
        self._at = at + len(piece)
        return piece


class _LastFrame:
    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns = 0  # epoch nanoseconds; 0: no frame yet


def rotation_delay(lifetime_s: float) -> float:
    """Seconds after connecting to rotate: a margin (10% of the lifetime, at most 5 min)
    before the venue's limit, minus up to half that margin again as jitter."""
    margin = min(300.0, lifetime_s * 0.1)
    return lifetime_s - margin - random.uniform(0, margin / 2)


class Stopped(Exception):
    """``stop`` arrived while subscribe frames were still being paced out."""


class Connection:
    """Keep one shard connected and feed its frames to ``on_frame(raw, recv_us)``.

    ``on_connect`` runs in the reader thread after subscribing and before the first
    frame is read, on every (re)connect; an exception there or in ``on_frame`` ends the
    connection and counts as a reconnect (reason 'handler_error').
    """

    def __init__(
        self,
        venue: Venue,
        symbols: list[str],
        channels: list[str],
        on_frame: FrameHandler,
        *,
        shard: str = "0",
        policy: ConnectionPolicy | None = None,
        on_connect: Callable[[], None] | None = None,
    ):
        self.venue = venue
        self.symbols = list(symbols)
        self.channels = list(channels)
        self.on_frame = on_frame
        self.on_connect = on_connect
        self.shard = shard
        self.policy = policy or ConnectionPolicy()
        self.name = venue.config.name
        self.connects = 0
        self.reconnects: Counter[str] = Counter()
        self.frames = 0
        self._stop = threading.Event()
        self._reconnect_reason: str | None = None
        self._ws: websocket.WebSocket | None = None
        # When the last data frame arrived, read at scrape time: a gauge set per frame
        # would take its lock on every frame. (A holder, not self: the gauge outlives us.)
        self._last = last = _LastFrame()
        LAST_MESSAGE.labels(venue=self.name, shard=shard).set_function(lambda: last.ns / 1e9)

    # ---- control (any thread) -----------------------------------------------------------

    def stop(self) -> None:
        """End ``run``: the reader notices within ``poll_s`` (or as soon as a blocked
        handler returns) and closes the socket with a close frame."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def request_reconnect(self, reason: str) -> None:
        """Close the current connection after the frame being handled and connect again
        without backoff (a planned reconnect, e.g. the venue's 'server_shutdown')."""
        self._reconnect_reason = reason

    def send(self, frame: str) -> None:
        """Send ``frame`` on the current connection. Call it only from ``on_frame`` (the
        reader thread); a lost socket raises there and reconnects like any read error."""
        if self._ws is None:
            raise RuntimeError(f"{self.name} shard {self.shard}: no live connection to send on")
        self._ws.send(frame)

    # ---- the reader thread ----------------------------------------------------------------

    def run(self) -> None:
        """Connect, read and reconnect until ``stop``."""
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            reason, planned = self._session()
            if self._stop.is_set():
                break
            self.reconnects[reason] += 1
            RECONNECTS.labels(venue=self.name, shard=self.shard, reason=reason).inc()
            if planned or time.monotonic() - started >= self.policy.stable_after_s:
                attempt = 0
            delay = 0.0
            if not planned:
                cap = min(self.policy.max_backoff_s, self.policy.backoff_s * 2**attempt)
                delay = random.uniform(0, cap)
                attempt += 1
            log.info(
                "%s shard %s: reconnecting in %.2f s (%s)", self.name, self.shard, delay, reason
            )
            self._stop.wait(delay)

    def _session(self) -> tuple[str, bool]:
        """One connection from connect to close; returns (why it ended, was it planned)."""
        url = self.venue.connection_url(self.symbols, self.channels)
        frames = self.venue.subscribe_frames(self.symbols, self.channels)
        try:
            ws = websocket.create_connection(
                url,
                timeout=self.policy.connect_timeout_s,
                skip_utf8_validation=True,  # the adapter decodes; bad UTF-8 goes to the DLQ
                class_=BufferedWebSocket,
            )
        except Exception as e:  # any failure to connect is retried with backoff
            log.warning("%s shard %s: connect failed: %s", self.name, self.shard, self._safe(e))
            return "connect_failed", False
        self.connects += 1
        self._ws = ws
        try:
            if self._stop.is_set():
                return "stopped", True
            rotate_at = time.monotonic() + rotation_delay(
                self.venue.config.max_connection_lifetime_s
            )
            self._subscribe(ws, frames)
            if self.on_connect is not None:
                self.on_connect()
            return self._read(ws, rotate_at)
        except Stopped:
            return "stopped", True
        except websocket.WebSocketException as e:
            if self._stop.is_set():
                return "stopped", True
            log.warning("%s shard %s: connection lost: %s", self.name, self.shard, self._safe(e))
            return "connection_lost", False
        except OSError as e:
            if self._stop.is_set():
                return "stopped", True
            log.warning("%s shard %s: socket error: %s", self.name, self.shard, self._safe(e))
            return "connection_lost", False
        except Exception as e:
            if self._stop.is_set():
                return "stopped", True
            trace = redact("".join(traceback.format_exception(e)), self.venue.config.credential)
            log.error("%s shard %s: frame handler failed\n%s", self.name, self.shard, trace)
            return "handler_error", False
        finally:
            self._reconnect_reason = None
            self._ws = None
            _close(ws)

    def _safe(self, e: BaseException) -> str:
        """An exception's text without the venue's credential (a refused handshake or a
        redirect may quote the URL that carries it)."""
        return redact(f"{type(e).__name__}: {e}", self.venue.config.credential)

    def _subscribe(self, ws: websocket.WebSocket, frames: list[str]) -> None:
        gap = 1.0 / self.venue.config.subscribe_rate_per_s
        for i, frame in enumerate(frames):
            if i and self._stop.wait(gap):
                raise Stopped
            ws.send(frame)

    def _read(self, ws: websocket.WebSocket, rotate_at: float) -> tuple[str, bool]:
        policy = self.policy
        ws.settimeout(min(policy.poll_s, policy.stall_timeout_s))
        on_frame, stop, last = self.on_frame, self._stop, self._last
        last_data = time.monotonic()
        while True:
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                opcode, data = None, b""
            now = time.monotonic()
            if opcode in _DATA:
                self.frames += 1
                last.ns = recv_ns = time.time_ns()
                on_frame(data, recv_ns // 1000)
                last_data = time.monotonic()  # a blocked handler is not a stalled venue
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "closed_by_venue", False
            if stop.is_set():
                return "stopped", True
            if self._reconnect_reason is not None:
                return self._reconnect_reason, True
            if now - last_data > policy.stall_timeout_s:
                log.warning(
                    "%s shard %s: no data for %.1f s", self.name, self.shard, now - last_data
                )
                return "stall", False
            if now >= rotate_at:
                return "rotation", True


def _close(ws: websocket.WebSocket) -> None:
    try:
        ws.close(timeout=1)
    except Exception:  # closing a broken socket may fail in many ways; it is closed anyway
        ws.shutdown()
