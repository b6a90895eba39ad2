"""Gap repair for venues whose trade ids are sequential per symbol (``VenueSpec.sequential_ids``).

Per symbol the tracker holds the last trade id handed to Kafka and that trade's event
time. A live trade is then exactly one of:

- ``id <= last``: already published (a venue duplicate, or history fetched after a
  reconnect that the stream now repeats): dropped and counted;
- ``id == last + 1``: published;
- ``id > last + 1``: a gap. The missing ids are fetched from REST history and published
  first, then this trade.

REST history is asked for ids (``IdHistory.trades_by_id``) together with when they
happened: not before the last published trade's time, not after the time of the trade
that revealed the gap (or now, after a connect), both inclusive. Binance and Deribit
page by id and ignore the times; Coinbase and Kraken serve trades by time only and find
the ids in that window (``tasks.venues.http.contiguous_by_time``). Either way the
repaired trades are exactly the missing ids in id order, or RestError: never a hole.

Ordering: the repair runs in the shard's reader thread, inside the frame handler, so no
later live trade of any symbol on that shard is read (let alone published) until the
repair has finished; the venue keeps the frames meanwhile. That makes "every id once, in
id order within the symbol's partition" hold without a second buffer.

After each (re)connect, symbols with a known last id are topped up from REST to the
newest trade before the first frame is read, so a gap is closed even when the symbol
then goes quiet (and on restart, the downtime is covered). A repair that fails (REST
down, history trimmed) raises, which reconnects the shard with backoff and tries again;
after ``max_attempts`` failures in a row for one symbol the gap is given up, logged as an
error with its id range (the backfill flow can fill it) and left in the metrics as
found but not repaired, so one broken symbol cannot stop the others for good.

A venue that also numbers the messages of a connection (Coinbase's ``sequence_num``) has
its holes counted by ``SequenceWatch``: its trades are covered by the id check above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from tasks.core.events import Trade
from tasks.core.metrics import DUPLICATES_DROPPED, GAPS_FOUND, GAPS_REPAIRED, TRADES_REPAIRED
from tasks.venues.base import FeedError, IdHistory
from tasks.venues.http import RestError

log = logging.getLogger(__name__)


class RepairFailed(Exception):
    """A gap could not be filled this time; the shard reconnects and tries again."""


Publish = Callable[[Trade, bool], None]  # (trade, live)
Filler = Callable[[str, int, "int | None", "int | None"], int]  # (symbol, first, last, end_us)


class GapTracker:
    """Last published trade id (and its event time) per symbol of one shard, and the
    repairs that keep it contiguous. Live-path repairs call ``fill_gap`` (``fill`` unless
    the flow wraps it as a Prefect task). ``last_us`` is needed where REST history is by
    time (Coinbase, Kraken): a symbol with a last id but no time cannot be repaired there."""

    def __init__(
        self,
        venue: str,
        history: IdHistory,
        publish: Publish,
        last_ids: dict[str, int] | None = None,
        last_us: dict[str, int] | None = None,
        max_attempts: int = 5,
    ):
        self.venue = venue
        self.history = history
        self.publish = publish
        self.last: dict[str, int] = dict(last_ids or {})
        self.last_us: dict[str, int] = dict(last_us or {})
        self.max_attempts = max_attempts
        self.fill_gap: Filler = self.fill
        self.duplicates = 0
        self.gaps_found = 0
        self.gaps_repaired = 0
        self.trades_repaired = 0
        self.gaps_given_up = 0
        self._attempts: dict[str, int] = {}
        self._metric_children: dict[str, tuple] = {}

    # ---- the live path --------------------------------------------------------------------

    def on_trade(self, trade: Trade) -> None:
        """Publish a live trade in id order, repairing a gap before it first."""
        symbol, tid = trade.symbol, trade.trade_id
        last = self.last.get(symbol)
        if last is not None and tid != last + 1:
            if tid <= last:
                self.duplicates += 1
                self._metrics(symbol)[0].inc()
                return
            self._repair(symbol, last + 1, tid - 1, trade.event_us)
        self.publish(trade, True)
        self.last[symbol] = tid
        self.last_us[symbol] = trade.event_us

    def _repair(self, symbol: str, first: int, last: int, end_us: int) -> None:
        attempt = self._attempts.get(symbol, 0) + 1
        if attempt == 1:
            self.gaps_found += 1
            self._metrics(symbol)[1].inc()
            log.warning("%s %s: gap, ids %d..%d missing", self.venue, symbol, first, last)
        try:
            self.fill_gap(symbol, first, last, end_us)
        except (RestError, FeedError) as e:
            if attempt < self.max_attempts:
                self._attempts[symbol] = attempt
                raise RepairFailed(
                    f"{self.venue} {symbol}: repair of ids {first}..{last} failed "
                    f"(attempt {attempt}/{self.max_attempts}): {e}"
                ) from e
            self._attempts.pop(symbol, None)
            self.gaps_given_up += 1
            done = self.last.get(symbol, first - 1)
            log.error(
                "%s %s: gave up repairing ids %d..%d after %d attempts (%s); "
                "run a backfill for them",
                self.venue, symbol, done + 1, last, attempt, e,
            )  # fmt: skip
            self.last[symbol] = last
            return
        self._attempts.pop(symbol, None)
        self.gaps_repaired += 1
        self._metrics(symbol)[2].inc()
        log.info("%s %s: repaired ids %d..%d from REST", self.venue, symbol, first, last)

    # ---- after a (re)connect --------------------------------------------------------------

    def after_connect(self, symbols: Iterable[str]) -> None:
        """Top up every symbol with a known last id to the newest REST trade. A failure
        is logged, not raised: the live path repairs at the symbol's next trade."""
        for symbol in symbols:
            start = self.last.get(symbol)
            if start is None:
                continue
            try:
                n = self.fill(symbol, start + 1, None)
            except (RestError, FeedError) as e:
                log.warning("%s %s: catch-up after connect failed: %s", self.venue, symbol, e)
                continue
            self._attempts.pop(symbol, None)
            if n:
                self.gaps_found += 1
                self.gaps_repaired += 1
                _, found, repaired = self._metrics(symbol)[:3]
                found.inc()
                repaired.inc()
                log.info(
                    "%s %s: caught up %d trades after connect (ids %d..%d)",
                    self.venue, symbol, n, start + 1, self.last[symbol],
                )  # fmt: skip

    # ---- REST -----------------------------------------------------------------------------

    def fill(self, symbol: str, first: int, last: int | None, end_us: int | None = None) -> int:
        """Publish trades ``first..last`` (to the newest when ``last`` is None) from REST
        history, in id order; returns how many. They happened between the last published
        trade's time and ``end_us`` (the time of the trade after ``last``; None: now).
        Raises RestError on a hole in history."""
        trades = self.history.trades_by_id(
            symbol, first, last, start_us=self.last_us.get(symbol), end_us=end_us
        )
        n = 0
        repaired = self._metrics(symbol)[3]
        for t in trades:
            self.publish(t, False)
            self.last[symbol] = t.trade_id
            self.last_us[symbol] = t.event_us
            n += 1
            repaired.inc()
        self.trades_repaired += n
        return n

    # ---- after a failed delivery ----------------------------------------------------------

    def rewind(self, failed: Iterable[Trade]) -> None:
        """Trades Kafka did not take: move each symbol's last id back before the first
        failed one, so the next trade of that symbol repairs them from REST, in order.
        Its time becomes the first failed trade's: none of the trades to repair is older."""
        lowest: dict[str, Trade] = {}
        for t in failed:
            low = lowest.get(t.symbol)
            if low is None or t.trade_id < low.trade_id:
                lowest[t.symbol] = t
        for symbol, t in lowest.items():
            tid = t.trade_id
            if symbol in self.last and tid <= self.last[symbol]:
                log.warning("%s %s: delivery of id %d failed; rewinding", self.venue, symbol, tid)
                self.last[symbol] = tid - 1
                self.last_us[symbol] = t.event_us

    def _metrics(self, symbol: str) -> tuple:
        m = self._metric_children.get(symbol)
        if m is None:
            labels = {"venue": self.venue, "symbol": symbol}
            m = self._metric_children[symbol] = (
                DUPLICATES_DROPPED.labels(**labels),
                GAPS_FOUND.labels(**labels),
                GAPS_REPAIRED.labels(**labels),
                TRADES_REPAIRED.labels(**labels),
            )
        return m


class SequenceWatch:
    """A venue's per-connection message number (Coinbase's ``sequence_num``), which counts
    every message of a connection from its first, so a jump means messages the venue
    sent never arrived. Trades among them are the ``GapTracker``'s business (by trade id);
    quotes are not repaired (the next one supersedes them): the hole is only counted.

    ``reset`` at each (re)connect, and after a frame that could not be parsed (its number
    may not be readable: the count restarts at the next good frame rather than report
    the DLQ'd frame as lost). A lower number than expected (Coinbase: out of order) is
    ignored."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.holes = 0
        self.missed = 0

    def reset(self) -> None:
        self.expected = None

    def see(self, number: int) -> int:
        """How many messages are missing just before ``number`` (0 when none)."""
        expected = self.expected
        if expected is not None and number < expected:
            return 0
        self.expected = number + 1
        if expected is None or number == expected:
            return 0
        self.holes += 1
        self.missed += number - expected
        return number - expected
