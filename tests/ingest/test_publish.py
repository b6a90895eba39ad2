"""What happens to a message Kafka refuses for good: counted as failed (never as
published), handed back to its shard, and re-fetched from REST history in id order; an
error that leaves the producer unable to deliver anything stops the run with it."""

from __future__ import annotations

import os
import signal
import time
import uuid
from decimal import Decimal

import pytest
from kafka.admin import NewTopic
from prometheus_client import REGISTRY

from simulator.process import SimulatorProcess
from stack.process import read_pid
from tasks.core.events import Trade
from tasks.core.kafka import admin, producer
from tasks.ingest.gaps import GapTracker
from tasks.ingest.live import resend_failed
from tasks.ingest.publish import PRODUCER_TUNING, Publisher, Topics
from tasks.venues import venue_config
from tasks.venues.binance import BinanceRest
from tests.broker import private_broker
from tests.ingest.support import trade_ids

# Its own topics and brokers: scripts/test.sh runs it in the second process.
pytestmark = pytest.mark.beside


def _failures(shard: str) -> float:
    labels = {"venue": "binance", "shard": shard}
    return REGISTRY.get_sample_value("kafka_publish_failure_total", labels) or 0.0


def test_refused_trades_are_counted_returned_and_repaired_in_order(kafka, new_topic):
    refusing = f"test.refusing.{uuid.uuid4().hex[:10]}"
    client = admin(kafka)
    # Every record is larger than this topic accepts: the broker refuses each for good.
    client.create_topics([NewTopic(refusing, 1, 1, topic_configs={"max.message.bytes": "64"})])
    good = new_topic(1)
    with SimulatorProcess("--symbols", "BTC-USDT", "--rate", "200") as sim:
        history = BinanceRest(venue_config("binance", sim.http_url))
        deadline = time.monotonic() + 60
        while len(trades := history.historical_trades("BTC-USDT", None, 30)) < 30:
            assert time.monotonic() < deadline, "waited 60 s for the simulator's first trades"
            time.sleep(0.2)
        bad = Publisher(producer(kafka, **PRODUCER_TUNING), "binance", Topics(refusing), 8)
        lane = bad.lane("refused")
        before = _failures("refused")
        for t in trades[:-1]:  # more than the in-flight bound: failures must free room
            lane.publish(t)
        bad.close(timeout=30)

        assert lane.acked == 0 and lane.failed == len(trades) - 1 and lane.in_flight == 0
        assert type(bad.fatal).__name__ == "MessageSizeTooLargeError"  # not retriable
        assert _failures("refused") - before == len(trades) - 1
        failed = lane.take_failed()
        assert sorted(t.trade_id for t in failed) == [t.trade_id for t in trades[:-1]]
        assert lane.take_failed() == []  # handed back once

        ok = Publisher(producer(kafka, **PRODUCER_TUNING), "binance", Topics(good), 8)
        ok_lane = ok.lane("ok")
        last = trades[-2].trade_id
        tracker = GapTracker("binance", history, ok_lane.publish, {"BTC-USDT": last})
        tracker.rewind(failed)
        assert tracker.last["BTC-USDT"] == trades[0].trade_id - 1
        tracker.on_trade(trades[-1])  # the next live trade finds the hole and repairs it
        assert ok.close(timeout=30) == 0
    client.delete_topics([refusing])
    client.close()

    assert ok_lane.acked == len(trades) and tracker.trades_repaired == len(trades) - 1
    assert trade_ids(kafka, good)["BTC-USDT"] == [t.trade_id for t in trades]


def test_a_fatal_producer_error_stops_the_run(kafka, prefect_server):
    from flows.ingest import ingest

    refusing = f"test.refusing.{uuid.uuid4().hex[:10]}"
    client = admin(kafka)
    client.create_topics([NewTopic(refusing, 1, 1, topic_configs={"max.message.bytes": "64"})])
    try:
        with SimulatorProcess("--symbols", "BTC-USDT", "--rate", "200") as sim:
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="MessageSizeTooLargeError"):
                ingest(
                    symbols=["BTC-USDT"], channels=["trades"], simulator_url=sim.http_url,
                    validate_mode="off", metrics_port=0, trades_topic=refusing, run_seconds=120,
                )  # fmt: skip
            assert time.monotonic() - started < 60  # stopped by the error, not the clock
    finally:
        client.delete_topics([refusing])
        client.close()


def test_a_dead_producer_thread_unblocks_readers_and_is_fatal(kafka, new_topic):
    """kafka-python's network thread gone (it died with its worker's pipes once): a lane
    waiting for room raises instead of waiting for good, and the publisher says why."""
    from tasks.core.events import Trade
    from tasks.ingest.publish import Closed, ProducerDied

    pub = Publisher(producer(kafka, **PRODUCER_TUNING), "binance", Topics(new_topic(1)), 4)
    lane = pub.lane("dead")
    assert pub.check_sender()
    pub.producer._sender.force_close()  # the thread ends, as when it dies
    pub.producer._sender.join(10)
    lane.out = lane.cap  # four records in flight that nothing will ever acknowledge
    trade = Trade("binance", "BTC-USDT", "BTCUSDT", 1, Decimal("1.5"), Decimal("2"), "buy",
                  1_700_000_000_000_000, 1_700_000_000_000_000)  # fmt: skip
    with pytest.raises(Closed):
        lane.publish(trade)  # waits for room: returns only because the thread is gone
    assert isinstance(pub.fatal, ProducerDied) and not pub.check_sender()


def test_a_venue_without_history_sends_its_failed_trades_again(settings, kafka):
    """Coinbase and Kraken serve no trade history to repair from. A trade the broker did
    not acknowledge within the delivery timeout (broker frozen past it: a retriable
    failure) is published again once the broker is back, not dropped. The producer works
    again after such an expiry (kafka-python left it without a producer id for good:
    ``tasks.core.kafka``). The broker may have written the expired batch after all, so a
    trade can be in the topic twice: the sinks keep one row per trade id.

    How many trades expire depends on how linger split them into batches: kafka-python
    expires the batch in flight, then waits for a new producer id before it looks at the
    batches queued behind it, and those go once the broker is back. Either way each of the
    29 is acknowledged in the end, first time or resent."""
    with private_broker(settings, 29392) as (_, s, broker):
        topic = f"test.resend.{uuid.uuid4().hex[:10]}"
        client = admin(s)
        client.create_topics([NewTopic(topic, 1, 1)])
        client.close()
        fast = {**PRODUCER_TUNING, "delivery_timeout_ms": 3000, "request_timeout_ms": 1000}
        publisher = Publisher(producer(s, **fast), "coinbase", Topics(topic), 50)
        lane = publisher.lane("0")
        now = time.time_ns() // 1000
        trades = [
            Trade("coinbase", "BTC-USD", "BTC-USD", i, Decimal("50000.5"), Decimal("0.01"),
                  "buy", now + i, now + i)
            for i in range(1, 31)
        ]  # fmt: skip
        lane.publish(trades[0])  # the topic's metadata is known before the broker freezes
        publisher.flush(timeout=60)
        assert lane.acked == 1, "the private broker did not take a first trade"
        pid = read_pid(broker.pidfile)
        os.killpg(pid, signal.SIGSTOP)
        try:
            for t in trades[1:]:
                lane.publish(t)
                if t.trade_id == 15:
                    time.sleep(0.5)  # two batches; the second waits out the expiry (as in CI)
            deadline = time.monotonic() + 120  # liveness: 3 s delivery timeout, then callbacks
            while lane.failed == 0:
                assert time.monotonic() < deadline, "no trade expired in 120 s"
                time.sleep(0.2)
        finally:
            os.killpg(pid, signal.SIGCONT)
        assert publisher.fatal is None, publisher.fatal  # a timeout is retriable
        publisher.flush(timeout=60)  # the batches queued behind the expired one: sent or failed
        failed = lane.failed
        assert 1 <= failed <= len(trades) - 1
        assert lane.acked + failed == len(trades), f"{failed} expired, {lane.acked} acked"
        assert resend_failed(lane, None) == failed
        assert publisher.close(timeout=60) == 0
        assert lane.acked == len(trades)
        got = trade_ids(s, topic, venue="coinbase")["BTC-USD"]
        assert sorted(set(got)) == [t.trade_id for t in trades]  # every one, at least once
        assert len(got) <= 2 * len(trades) - 1
