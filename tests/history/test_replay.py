"""replay_topic against real Kafka, PostgreSQL and Prefect: lost trades come back from
the topic exactly, from the requested time on, without doubling anything."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D

from flows import backfill as flows
from tasks.core import codec
from tasks.core.events import Trade
from tasks.core.kafka import producer
from tasks.core.pg import table_checksum

S = 1_000_000

replay_topic = flows.replay_topic.with_options(retries=0)  # fail fast in tests


def publish(settings, topic: str, trades: list[Trade]) -> None:
    p = producer(settings)
    try:
        futures = [p.send(topic, key=t.key.encode(), value=codec.encode(t)) for t in trades]
        p.flush(timeout=30)
        for f in futures:
            f.get(timeout=0)
    finally:
        p.close(timeout=10)


def trade(symbol: str, i: int, t0: int) -> Trade:
    event = t0 + i * S
    side = "buy" if i % 2 else "sell"
    price, qty = D(f"100.{i:03d}"), D("0.0001") * (i + 1)
    return Trade(
        "binance", symbol, symbol.replace("-", ""), i, price, qty, side, event, event + 500
    )


def stored_ids(conn, symbols: list[str]) -> list[tuple[str, int]]:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, trade_id FROM trades WHERE symbol = ANY(%s) ORDER BY 1, 2",
            (symbols,),
        )
        return cur.fetchall()


def test_replay_restores_lost_trades(kafka, prefect_server, new_topic, conn, schema):
    topic = new_topic(3)
    symbols = [f"R{uuid.uuid4().hex[:5].upper()}-USDT" for _ in range(2)]
    t0 = (time.time_ns() // 1000 // 3_600_000_000 - 2) * 3_600_000_000
    trades = [trade(sym, i, t0) for sym in symbols for i in range(150)]
    first, later = trades[:100] + trades[150:250], trades[100:150] + trades[250:]
    publish(kafka, topic, first)
    time.sleep(0.5)
    mid = datetime.now(UTC)
    time.sleep(0.5)
    publish(kafka, topic, later)
    everything = sorted((t.symbol, t.trade_id) for t in trades)

    start = datetime.fromtimestamp(0, UTC)
    result = replay_topic(topic, start, schema=schema)
    assert (result["to_replay"], result["records"], result["stopped"]) == (300, 300, "caught up")
    assert result["rows"] == {"trades": 300}
    assert stored_ids(conn, symbols) == everything
    whole = table_checksum(conn, "trades", "venue, symbol, trade_id")
    with conn, conn.cursor() as cur:  # the replayed trades marked their candle windows
        cur.execute(
            "SELECT count(DISTINCT minute_us) FROM candle_dirty WHERE symbol = %s", (symbols[0],)
        )
        assert cur.fetchone()[0] == 3  # 150 s of trades from a whole hour: 3 minutes

    # the same replay again continues where it stopped: nothing left to do
    assert replay_topic(topic, start, schema=schema)["records"] == 0

    with conn, conn.cursor() as cur:  # lose a third of the table
        cur.execute("DELETE FROM trades WHERE symbol = ANY(%s) AND trade_id %% 3 = 0", (symbols,))
    again = replay_topic(topic, start, restart=True, schema=schema)
    assert again["records"] == 300
    assert (again["rows"], again["duplicates"]) == ({"trades": 100}, {"trades": 200})
    assert table_checksum(conn, "trades", "venue, symbol, trade_id") == whole

    # from a later time: only what Kafka stamped since
    partial = replay_topic(topic, mid, schema=schema)
    assert (partial["to_replay"], partial["records"]) == (100, 100)
    assert partial["duplicates"] == {"trades": 100}
