"""What every venue adapter provides; the connection logic lives once, elsewhere.

An adapter is pure: it builds subscribe frames and turns raw frames into normalised
events. It never touches sockets, Kafka or clocks (``recv_us`` is passed in), so the
same adapter serves live ingestion, tests on fixtures and the simulator's client.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import msgspec

from tasks.core.codec import CodecError
from tasks.core.events import Quote, Trade

if TYPE_CHECKING:  # depth.py imports FeedError from here
    from tasks.venues.depth import BookDelta, BookSnapshot


class FeedError(CodecError):
    """A frame that cannot be parsed or fails validation; ``reason`` goes to the DLQ."""


_TOKEN_PARAM = re.compile(r"(?i)([?&](?:token|api_?key)=)[^&#\s'\"]+")


def redact(text: str, secret: str = "") -> str:
    """``text`` with ``secret`` (as written and percent-encoded) and the value of any
    ``token=``/``apikey=`` URL parameter replaced by ``***``: for anything that may carry a
    connection URL (exception messages, log lines, reports)."""
    if secret:
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, "***")
    return _TOKEN_PARAM.sub(r"\1***", text)


@dataclass(frozen=True, slots=True)
class VenueConfig:
    """Where a venue lives. Pointing ``ws_url``/``rest_url`` at the simulator is the only
    difference between a test run and production."""

    name: str  # e.g. binance, binanceus, coinbase, kraken, deribit
    ws_url: str
    rest_url: str
    max_streams_per_connection: int = 1024
    max_connection_lifetime_s: float = 24 * 3600
    subscribe_rate_per_s: float = 5.0
    # Levels a side of the books Tapeline publishes (channel 'books'); a venue that is
    # subscribed by depth (Kraken) is asked for the smallest it offers that holds them.
    book_depth: int = 10
    # The API token of a venue that needs one (``VenueSpec.credential``), resolved at run
    # time, never written in a file. Left out of repr: a config ends up in log lines,
    # task-run inputs and tracebacks. Redact it (``redact``) wherever text may carry it.
    credential: str = field(default="", repr=False)


class Parsed(msgspec.Struct, gc=False):
    """What one raw frame meant: events (possibly many), or a control frame.

    ``control`` is None for data frames, else a short tag: 'ack', 'heartbeat', 'pong',
    'server_shutdown', 'error' (with ``detail``). ``reply`` is a frame the venue requires
    back on the same connection (e.g. Deribit's answer to a heartbeat ``test_request``,
    without which it closes the socket); the adapter stays pure, ingestion sends it.
    ``sequence`` is the frame's number where the venue numbers every message of a
    connection contiguously (Coinbase's ``sequence_num``): ingestion watches it for
    messages that never arrived. ``books``: the frame's order-book snapshots and deltas
    (channel 'books'), for ``tasks.books`` to verify before anything is published.

    A ``msgspec.Struct`` (one per frame): a fifth of a slotted dataclass's cost to build.
    ``gc=False``: it lives for one frame and holds events, strings and ints, no cycle.
    """

    events: list[Trade | Quote] = msgspec.field(default_factory=list)
    control: str | None = None
    detail: str = ""
    reply: str | None = None
    sequence: int | None = None
    books: list[BookSnapshot | BookDelta] = msgspec.field(default_factory=list)


class Venue(Protocol):
    config: VenueConfig
    channels: tuple[str, ...]  # supported: 'trades', 'quotes', 'books'

    def to_venue_symbol(self, symbol: str) -> str: ...

    def to_canonical(self, venue_symbol: str) -> str: ...

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        """URL of one connection carrying ``symbols`` (one shard)."""
        ...

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """Frames to send after connecting (empty when the URL subscribes)."""
        ...

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        """Raise FeedError (with a reason) for a malformed or invalid frame."""
        ...


class TradeHistory(Protocol):
    """REST trade history by time: what backfill needs of every venue."""

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterable[Trade]: ...


class IdHistory(TradeHistory, Protocol):
    """REST trade history asked for ids, for venues whose trade ids are contiguous per
    symbol: what gap repair needs."""

    def trades_by_id(
        self,
        symbol: str,
        from_id: int,
        to_id: int | None,
        start_us: int | None = None,
        end_us: int | None = None,
    ) -> Iterable[Trade]:
        """Exactly the trades with id in [from_id, to_id] (to the newest when ``to_id`` is
        None), in id order; RestError when history does not hold one of them, never a
        silent hole. ``start_us``/``end_us`` (inclusive; None for ``end_us`` is now) say
        when they happened: a venue whose REST serves trades by time only (Coinbase,
        Kraken) finds them there and needs ``start_us``; one that serves them by id
        (Binance, Deribit) ignores both."""
        ...


@dataclass(frozen=True)
class VenueSpec:
    """Everything the platform knows about one venue, in its registry entry
    (``tasks.venues.REGISTRY``). Ingestion, gap repair, backfill and the simulator ask
    this, never the adapter's class.

    ``rest`` builds the venue's REST history client from a config and an ``Http``;
    ``sequential_ids``: trade ids are contiguous per symbol, so a hole is detected live
    and repaired from ``rest`` (an ``IdHistory``: by id, or by time within the bounds
    gap repair gives) before the next trade is published; ``klines``: the REST client
    serves venue candles (``klines(symbol, interval, start_us, end_us)``);
    ``trade_history``: it serves trades by time (what ``backfill_trades`` needs).
    ``credential``: the name of the API token the venue needs (empty: none), read from
    ``TAPELINE_<NAME>`` or a Prefect Secret block of that name (``blocks.venue_credential``);
    the simulator accepts ``simulator_credential`` instead, so a real token never goes there.
    ``min_stall_timeout_s``: the venue's keep-alive is slower than the default watchdog,
    so a quiet (closed) market is not taken for a dead connection.
    ``book_sync``: how its L2 book is kept exact, the name of a procedure in
    ``tasks.books.sync`` ("binance": REST snapshot plus update ids, its REST client
    serving ``depth(symbol, limit)``; "kraken": checksums; "coinbase": one sequence per
    connection); the last two resync by ``book_resync_frames``. Empty: no books.
    """

    name: str
    config: VenueConfig
    adapter: Callable[[VenueConfig], Venue]
    rest: Callable[[VenueConfig, Any], TradeHistory]
    rest_interval_s: float = 0.0  # default pause between REST requests
    simulator_ws_path: str = ""  # where the local simulator serves this protocol
    sequential_ids: bool = False
    klines: bool = False
    trade_history: bool = True
    credential: str = ""
    simulator_credential: str = ""
    min_stall_timeout_s: float = 0.0
    book_sync: str = ""
