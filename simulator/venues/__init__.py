"""One small module per venue: its paths, subscribe frames and wire format over the shared
market. The hub does the fan-out, the faults module decides what each trade becomes;
a venue only speaks its protocol.
"""

from __future__ import annotations

from simulator.book import BookUpdate, OrderBook
from simulator.faults import StreamFaults
from simulator.hub import Client, Hub
from simulator.market import Market, QuoteRow, TradeRow

Items = list[tuple[str, TradeRow]]


class VenueBase:
    """What the server calls on every venue."""

    name = ""

    def __init__(self, hub: Hub, markets: dict[str, Market], faults: StreamFaults):
        self.hub = hub
        self.markets = markets
        self.faults = faults

    def accepts(self, path: str) -> bool:
        raise NotImplementedError

    def refuse(self, path: str, query: dict[str, str]) -> tuple[int, dict] | None:
        """(HTTP status, JSON body) to refuse a WebSocket handshake with (e.g. a missing
        API token), or None to accept it."""
        return None

    def open(self, c: Client, path: str, query: dict[str, str]) -> None:
        """A connection was accepted on ``path``: subscribe from the URL, greet."""

    def receive(self, c: Client, text: str) -> None:
        """A text frame from the client (subscribe, unsubscribe, ping...)."""

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        """Send one tick's stream items (after faults) and book updates of ``symbol``."""
        raise NotImplementedError

    def publish_book(
        self, symbol: str, book: OrderBook, updates: list[BookUpdate], now_ms: int
    ) -> None:
        """Every pacing tick of a symbol whose book exists: the updates it made (maybe
        none); ``book`` already stands after them. Venues without a book channel ignore it."""

    def heartbeat(self, now_ms: int) -> None:
        """Called about once a second."""

    def shutdown_frame(self, c: Client) -> str | None:
        """The venue's 'reconnect now' notice, if it has one."""
        return None

    def has_trade_subscribers(self, symbol: str) -> bool:
        return bool(self.hub.subs[self.name].get(("trade", symbol)))

    def has_quote_subscribers(self, symbol: str) -> bool:
        return bool(self.hub.subs[self.name].get(("quote", symbol)))

    def push(self, c: Client, frame: str) -> None:
        self.hub.push(c, frame)
