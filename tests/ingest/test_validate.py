"""The start-up check that a shard delivers a first message says, when it fails, what the
connection did meanwhile (tasks/ingest/validate.py)."""

from __future__ import annotations

from tasks.ingest.live import plan
from tasks.ingest.validate import first_message
from tests.ports import free_port


def test_a_first_message_failure_says_what_the_connection_did() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = plan("binance", ["BTC-USDT"], ["trades"], simulator_url=url)
    result = first_message(p, 0, timeout_s=3)
    assert not result["ok"]
    assert "nothing parsed from ['BTC-USDT'] within 3 s" in result["detail"]
    assert "0 connects, 0 frames read" in result["detail"], result["detail"]
    assert "connect_failed" in result["detail"], result["detail"]
