"""Coinbase Advanced Trade market data WebSocket, at ``/coinbase``.

Subscribe with ``{"type":"subscribe","product_ids":["BTC-USD"],"channel":"market_trades"}``
(also ``ticker``, ``heartbeats``; ``unsubscribe`` likewise; a ``jwt`` is accepted and
ignored). Every message has the envelope ``{"channel","client_id","timestamp",
"sequence_num","events"}`` with ``sequence_num`` counting messages per connection.

- market_trades: a ``snapshot`` event with the last 50 trades (newest first) on
  subscribe, then ``update`` events batching each pacing tick's trades in id order.
  Assumption written down: ``side`` is the MAKER order's side, as in Coinbase's match
  semantics, so a taker buy prints as ``"SELL"``. ``trade_id`` is the decimal id string.
- ticker: a ``snapshot`` on subscribe, then an ``update`` per tick with trades or book
  changes: last price, best bid/ask and session (since start) statistics.
- heartbeats: one per second with ``heartbeat_counter``.
- level2 (messages on channel ``l2_data``): a ``snapshot`` event with the whole book on
  subscribe (again after unsubscribe + subscribe: how a client resyncs), then one
  ``update`` event per tick with ``{"side":"bid"|"offer","event_time","price_level",
  "new_quantity"}`` per touched level (absolute size, "0" deletes); ``event_time`` is the
  book update's, the one ``Simulator.book_at`` answers for.
Product ids are the canonical symbols (BTC-USDT). Coinbase has no shutdown notice; the
shutdown fault just closes the connection (1001) after the grace.
"""

from __future__ import annotations

import json
import time

from simulator.book import BookUpdate, OrderBook, book_of
from simulator.faults import TRADE
from simulator.hub import Client
from simulator.market import Market, QuoteRow, TradeRow
from simulator.venues import Items, VenueBase
from simulator.wire import fmt_units, rfc3339_ms

NAME = "coinbase"
ENVELOPE = '{"channel":"%s","client_id":"","timestamp":"%s","sequence_num":%d,"events":%s}'
TRADE_FMT = '{"trade_id":"%d","product_id":"%s","price":"%s","size":"%s","side":"%s","time":"%s"}'
CHANNELS = {"market_trades": "trade", "ticker": "quote", "level2": "book"}
L2_FMT = '{"side":"%s","event_time":"%s","price_level":"%s","new_quantity":"%s"}'
SNAPSHOT_TRADES = 50
MAX_MALFORMED_TEXTS = 8


def _trade(m: Market, t: TradeRow) -> str:
    maker_side = "BUY" if t.buyer_maker else "SELL"
    return TRADE_FMT % (
        t.id,
        m.symbol,
        fmt_units(t.price, m.price_dp),
        fmt_units(t.qty, m.qty_dp),
        maker_side,
        rfc3339_ms(t.ts_ms),
    )


def _malformed(kind: str, m: Market, t: TradeRow) -> str:
    good = _trade(m, t)
    price = f'"price":"{fmt_units(t.price, m.price_dp)}"'
    if kind == "nan_price":
        return good.replace(price, '"price":"NaN"', 1)
    if kind == "missing_field":
        return good.replace(price + ",", "", 1)
    return good


def _ticker(m: Market, q: QuoteRow) -> str:
    pdp, qdp = m.price_dp, m.qty_dp
    change = (m.last_price - m.open_price) * 100 / m.open_price if m.open_price else 0.0
    return json.dumps(
        {
            "type": "ticker",
            "product_id": m.symbol,
            "price": fmt_units(m.last_price, pdp),
            "volume_24_h": fmt_units(m.volume, qdp),
            "low_24_h": fmt_units(m.low, pdp),
            "high_24_h": fmt_units(m.high, pdp),
            "low_52_w": fmt_units(m.low, pdp),
            "high_52_w": fmt_units(m.high, pdp),
            "price_percent_chg_24_h": f"{change:.8f}",
            "best_bid": fmt_units(q.bid, pdp),
            "best_bid_quantity": fmt_units(q.bid_qty, qdp),
            "best_ask": fmt_units(q.ask, pdp),
            "best_ask_quantity": fmt_units(q.ask_qty, qdp),
        },
        separators=(",", ":"),
    )


class Coinbase(VenueBase):
    name = NAME

    def accepts(self, path: str) -> bool:
        return path == "/coinbase"

    def open(self, c: Client, path: str, query: dict[str, str]) -> None:
        c.state["channels"] = {"market_trades": [], "ticker": [], "level2": []}
        c.state["heartbeats"] = False
        c.state["beats"] = 0

    def _frame(self, c: Client, channel: str, ts_ms: int, events: str) -> str:
        return ENVELOPE % (channel, rfc3339_ms(ts_ms), c.next_seq(), events)

    def _send(self, c: Client, channel: str, ts_ms: int, events: str) -> None:
        self.push(c, self._frame(c, channel, ts_ms, events))

    def receive(self, c: Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.push(c, _error("Failed to parse message", "malformed JSON"))
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            self.push(c, _error("Failed to subscribe", f"unknown message type {kind!r}"))
            return
        channel = msg.get("channel")
        products = msg.get("product_ids") or []
        now = time.time_ns() // 1_000_000
        if channel == "heartbeats":
            c.state["heartbeats"] = kind == "subscribe"
            self._send_subscriptions(c, now)
            return
        if channel not in CHANNELS:
            self.push(c, _error("Failed to subscribe", f"unsupported channel {channel!r}"))
            return
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            self.push(c, _error("Failed to subscribe", "product_ids must be a list of strings"))
            return
        unknown = [p for p in products if p not in self.markets]
        if unknown:
            self.push(c, _error("Failed to subscribe", f"{unknown[0]} is not a valid product"))
            return
        current: list[str] = c.state["channels"][channel]
        key_channel = CHANNELS[channel]
        if kind == "unsubscribe":
            for p in products:
                if p in current:
                    current.remove(p)
                self.hub.unsubscribe(c, (key_channel, p))
            self._send_subscriptions(c, now)
            return
        fresh = [p for p in products if p not in current]
        current.extend(fresh)
        self._send_subscriptions(c, now)
        for p in fresh:
            m = self.markets[p]
            if channel == "market_trades":
                rows = m.recent(SNAPSHOT_TRADES)[::-1]
                body = ",".join(_trade(m, t) for t in rows)
                self._send(c, channel, now, '[{"type":"snapshot","trades":[%s]}]' % body)
                self.faults.ledger(p).snapshot_trades += len(rows)
            elif channel == "level2":
                book = book_of(m)
                bids, asks = book.top(len(book.bids.prices) + len(book.asks.prices))
                when = rfc3339_ms(book.event_ms)
                body = _l2(m, when, bids, asks)
                events = '[{"type":"snapshot","product_id":"%s","updates":[%s]}]' % (p, body)
                self._send(c, "l2_data", now, events)
                self.faults.ledger(p).book_snapshots += 1
            else:
                ticker = _ticker(m, m.quote(now))
                self._send(c, channel, now, '[{"type":"snapshot","tickers":[%s]}]' % ticker)
            self.hub.subscribe(c, (key_channel, p))

    def _send_subscriptions(self, c: Client, now_ms: int) -> None:
        subs = {ch: list(ps) for ch, ps in c.state["channels"].items() if ps}
        if c.state["heartbeats"]:
            subs["heartbeats"] = []
        events = json.dumps([{"subscriptions": subs}], separators=(",", ":"))
        self._send(c, "subscriptions", now_ms, events)

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        m = self.markets[symbol]
        led = self.faults.ledger(symbol)
        if items:
            group = tuple(self.hub.subscribers(self.name, ("trade", symbol)))
            trades = [t for kind, t in items if kind is TRADE]
            for kind, t in items:
                if kind is TRADE:
                    continue
                events = '[{"type":"update","trades":[%s]}]' % _malformed(kind, m, t)
                texts: list[str] = []
                for c in group:
                    frame = self._frame(c, "market_trades", now_ms, events)
                    if kind == "invalid_json":
                        frame = frame[: len(frame) // 2]
                    self.push(c, frame)
                    if len(texts) < MAX_MALFORMED_TEXTS:
                        texts.append(frame)
                led.note_malformed(kind, t.id, texts, len(group))
            if trades:
                events = '[{"type":"update","trades":[%s]}]' % ",".join(
                    _trade(m, t) for t in trades
                )
                for c in group:
                    self._send(c, "market_trades", now_ms, events)
        if items or quotes:
            group = tuple(self.hub.subscribers(self.name, ("quote", symbol)))
            if group:
                events = '[{"type":"update","tickers":[%s]}]' % _ticker(m, m.quote(now_ms))
                for c in group:
                    self._send(c, "ticker", now_ms, events)
                led.quotes_sent += 1

    def publish_book(
        self, symbol: str, book: OrderBook, updates: list[BookUpdate], now_ms: int
    ) -> None:
        """One ``l2_data`` update per tick: every level the tick's book updates touched,
        with its quantity now (0 deletes), stamped with the last update's event time.
        The book_gap fault skips it and still uses up each recipient's sequence_num."""
        if not updates:
            return
        group = tuple(self.hub.subscribers(self.name, ("book", symbol)))
        if not group:
            return
        if self.faults.take(symbol, "book_gap"):
            for c in group:
                c.next_seq()
            return
        m = self.markets[symbol]
        touched_b: set[int] = set()
        touched_a: set[int] = set()
        for up in updates:
            touched_b.update(p for p, _ in up.bids)
            touched_a.update(p for p, _ in up.asks)
        bq, aq = book.bids.qty, book.asks.qty
        body = _l2(
            m,
            rfc3339_ms(book.event_ms),
            [(p, bq.get(p, 0)) for p in sorted(touched_b, reverse=True)],
            [(p, aq.get(p, 0)) for p in sorted(touched_a)],
        )
        events = '[{"type":"update","product_id":"%s","updates":[%s]}]' % (symbol, body)
        for c in group:
            self._send(c, "l2_data", now_ms, events)
        self.faults.ledger(symbol).book_frames += 1

    def heartbeat(self, now_ms: int) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now_ms // 1000))
        for c in tuple(self.hub.clients[self.name]):
            if not c.state.get("heartbeats"):
                continue
            c.state["beats"] += 1
            events = '[{"current_time":"%s.%03d000000 +0000 UTC","heartbeat_counter":%d}]' % (
                stamp,
                now_ms % 1000,
                c.state["beats"],
            )
            self._send(c, "heartbeats", now_ms, events)


def _l2(m: Market, when: str, bids, asks) -> str:
    """``level2`` levels: absolute quantities, "0" for a level gone."""
    pdp, qdp = m.price_dp, m.qty_dp
    return ",".join(
        L2_FMT % (side, when, fmt_units(p, pdp), fmt_units(q, qdp) if q else "0")
        for side, levels in (("bid", bids), ("offer", asks))
        for p, q in levels
    )


def _error(message: str, reason: str) -> str:
    return json.dumps(
        {"type": "error", "message": message, "reason": reason}, separators=(",", ":")
    )


# ---- REST ---------------------------------------------------------------------------------

REST_PREFIX = "/api/v3/brokerage/market/products/"


class CoinbaseRest:
    """``GET /api/v3/brokerage/market/products/{product}/ticker?limit=&start=&end=``: the
    newest ``limit`` (max 1000) trades with start <= time < end (UNIX seconds), newest
    first, plus the current best bid/ask. Same trade ids and maker sides as the stream."""

    def __init__(self, markets: dict[str, Market]):
        self.markets = markets
        self.requests = 0

    def handles(self, path: str) -> bool:
        return path.startswith(REST_PREFIX) and path.endswith("/ticker")

    def handle(self, path: str, params: dict[str, str], now_ms: int) -> tuple[int, dict]:
        self.requests += 1
        product = path[len(REST_PREFIX) : -len("/ticker")]
        m = self.markets.get(product)
        if m is None:
            return 404, {"error": "NOT_FOUND", "message": f"product {product} not found"}
        try:
            limit = int(params["limit"])
            start = int(params.get("start") or 0) * 1000
            end = int(params["end"]) * 1000 if params.get("end") else now_ms + 1
        except (KeyError, ValueError):
            return 400, {"error": "INVALID_ARGUMENT", "message": "limit, start, end: integers"}
        if not 0 < limit <= 1000:
            return 400, {"error": "INVALID_ARGUMENT", "message": "limit must be 1..1000"}
        hi = m.index_at(end)
        lo = max(m.index_at(start), hi - limit)
        rows = m.rows(lo, hi)[::-1]
        q = m.quote(now_ms)
        return 200, {
            "trades": [json.loads(_trade(m, t)) for t in rows],
            "best_bid": fmt_units(q.bid, m.price_dp),
            "best_ask": fmt_units(q.ask, m.price_dp),
        }
