"""The MongoDB sink of ``drain_transactions``: user transactions and wallet balances.

No multi-document transactions here (FerretDB has none), so every effect is made
idempotent on its own and the steps are ordered so that a crash between any two of them
is repaired by simply replaying the batch:
1. ``transactions``: insert with ``_id`` = tx id; an existing id is a duplicate. Each
   document records the Kafka (topic, partition, offset) it was first stored from, and
   only that occurrence may move a balance, so a re-published transaction never counts
   twice while a replay of the first one still can.
2. ``wallets`` (one document per user and asset): a batch's effects are folded per
   wallet in Python with exact Decimals, skipping effects at or below the offset the
   wallet already applied for that partition, and written with a compare-and-set on the
   wallet's version, so two writers of one wallet never interleave (a lost race is
   re-read and re-folded).
3. ``kafka_offsets``: the batch's next offsets, only ever moved forwards.
Amounts are decimal strings (FerretDB 1.x drops the connection on Decimal128).

Marks and sources name a *stream*: the topic, or ``topic#N`` after the N-th reset of a
recreated topic (``claim_log``), so offsets of a new log never meet the marks of the old
one, while documents written before streams existed (plain topic) stay valid.

A transaction whose effect cannot be applied exactly (a balance beyond the exact
context) is refused as data: its stored document is removed again and ``Rejected``
names it, so the loop dead-letters it and writes the rest of the batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pymongo
from pymongo import ASCENDING, DESCENDING, InsertOne, UpdateOne
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError

from tasks.core.codec import CodecError, decode
from tasks.core.events import UserTransaction
from tasks.core.wallets import EXACT, effects, wallet_id
from tasks.drain.contract import Rejected, Written, crash_point

log = _log = logging.getLogger(__name__)

# FerretDB 1.24 (SQLite) holds a pooled connection per matched document until the whole
# update command ends and deadlocks at ~100; small commands keep it far from that.
_OPS_PER_COMMAND = 16
_DUPLICATE_KEY = 11000
Key = tuple[str, int]


class TxBatch:
    """Decoded transactions of one batch with where each came from."""

    def __init__(self) -> None:
        # (tx, its effects, topic, partition, offset), and the Kafka record of each
        self.items: list[tuple[UserTransaction, list[tuple[str, Decimal]], str, int, int]] = []
        self.records: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, topic: str, partition: int, records: Iterable[Any]) -> list[tuple[Any, str]]:
        rejects = []
        for rec in records:
            try:
                tx = decode(rec.value)
                if type(tx) is not UserTransaction:
                    raise CodecError(f"unexpected event type {type(tx).__name__} for wallets")
                self.items.append((tx, effects(tx), topic, partition, rec.offset))
                self.records.append(rec)
            except CodecError as e:
                rejects.append((rec, e.reason))
        return rejects

    def drop(self, records: list[Any]) -> None:
        gone = {id(r) for r in records}
        kept = [(i, r) for i, r in zip(self.items, self.records, strict=True) if id(r) not in gone]
        self.items = [i for i, _ in kept]
        self.records = [r for _, r in kept]


def tx_document(tx: UserTransaction, topic: str, partition: int, offset: int) -> dict:
    return {
        "_id": tx.tx_id,
        "user_id": tx.user_id,
        "symbol": tx.symbol,
        "side": tx.side,
        "qty": str(tx.qty),
        "price": str(tx.price),
        "fee": str(tx.fee),
        "status": tx.status,
        "event_us": tx.event_us,
        "src": {"topic": topic, "partition": partition, "offset": offset},
    }


class MongoSink:
    """Writes TxBatches into ``transactions``, ``wallets`` and ``kafka_offsets``."""

    name = "mongo"

    def __init__(self, url: str, database: str, *, retry_seconds: float = 60.0):
        self.url, self.database, self.retry_seconds = url, database, retry_seconds
        self._client: Any = None
        self._streams: dict[str, str] = {}  # topic -> stream name in marks and sources

    @property
    def db(self):
        if self._client is None:
            self._client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=5000)
            db = self._client[self.database]
            db.transactions.create_index([("user_id", ASCENDING), ("event_us", DESCENDING)])
            db.wallets.create_index([("user_id", ASCENDING)])
        return self._client[self.database]

    def open_batch(self) -> TxBatch:
        return TxBatch()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def stored_offsets(self, consumer: str, topics: Iterable[str]) -> dict[Key, int]:
        wanted = set(topics)
        docs = self._retrying(lambda: list(self.db.kafka_offsets.find({"consumer": consumer})))
        return {(d["topic"], d["partition"]): d["next"] for d in docs if d["topic"] in wanted}

    def claim_log(self, consumer: str, topic: str, log: str, *, reset: bool = False) -> str | None:
        def claim() -> str | None:
            key = f"{consumer}|{topic}"
            doc = self.db.kafka_logs.find_one({"_id": key}) or {}
            before, epoch = doc.get("log_id"), doc.get("epoch", 0)
            if before is not None and before != log:
                if not reset:
                    return before
                epoch += 1  # a new stream: marks of the old log cannot match its offsets
                self.db.kafka_offsets.delete_many({"consumer": consumer, "topic": topic})
                log_line = "%s %s: offsets forgotten, now log %s (was %s), stream %s#%d"
                _log.warning(log_line, consumer, topic, log, before, topic, epoch)
            try:
                self.db.kafka_logs.update_one(
                    {"_id": key}, {"$set": {"log_id": log, "epoch": epoch}}, upsert=True
                )
            except DuplicateKeyError:  # two first claims raced; the other one's stands
                return claim()
            self._streams[topic] = topic if epoch == 0 else f"{topic}#{epoch}"
            return before

        return self._retrying(claim)

    def write(
        self, consumer: str, batch: TxBatch, offsets: dict[Key, tuple[int | None, int]]
    ) -> Written:
        """Apply ``batch`` once; replaying it after a crash at any point is harmless."""
        return self._retrying(lambda: self._write_once(consumer, batch, offsets))

    def _write_once(self, consumer: str, batch: TxBatch, offsets) -> Written:
        out = Written()
        streams = self._streams
        items = [(tx, e, streams.get(t, t), p, o) for tx, e, t, p, o in batch.items]
        canonical = self._store_transactions(items, out)
        crash_point("mongo_after_transactions")
        try:
            out.rows["wallets"] = self._apply_wallets(canonical)
        except _Unrepresentable as e:
            self._refuse(batch, items, e.sources)
        crash_point("mongo_after_wallets")
        for (topic, partition), (_, nxt) in offsets.items():
            self.db.kafka_offsets.update_one(
                {"_id": f"{consumer}|{topic}|{partition}"},
                {
                    "$max": {"next": nxt},
                    "$set": {"consumer": consumer, "topic": topic, "partition": partition},
                },
                upsert=True,
            )
        return out

    def _refuse(self, batch: TxBatch, items: list, sources: set[tuple[str, int, int]]) -> None:
        """Remove the stored documents of transactions whose effects cannot be applied
        (only where this occurrence owns them) and raise ``Rejected`` naming them."""
        refused = [(item, rec) for item, rec in zip(items, batch.records, strict=True)
                   if item[2:] in sources]  # fmt: skip
        for (tx, _, stream, partition, offset), _ in refused:
            src = {"topic": stream, "partition": partition, "offset": offset}
            self.db.transactions.delete_one({"_id": tx.tx_id, "src": src})
        reason = "mongo refused the transaction: a balance it moves cannot stay exact"
        raise Rejected([(rec, reason) for _, rec in refused])

    def _store_transactions(self, items: list, out: Written) -> list:
        """Insert new transactions; returns the items whose effects this batch owns."""
        first: dict[str, tuple] = {}
        for item in items:
            first.setdefault(item[0].tx_id, item)  # a repeat inside the batch is a duplicate
        docs = [tx_document(tx, t, p, o) for tx, _, t, p, o in first.values()]
        duplicate_ids: list[str] = []
        if docs:
            try:
                self.db.transactions.insert_many(docs, ordered=False)
            except BulkWriteError as e:
                errors = e.details["writeErrors"]
                if any(err["code"] != _DUPLICATE_KEY for err in errors):
                    raise
                duplicate_ids = [docs[err["index"]]["_id"] for err in errors]
        out.rows["transactions"] = len(docs) - len(duplicate_ids)
        out.duplicates["transactions"] = len(items) - out.rows["transactions"]
        owner = {}  # tx id -> (topic, partition, offset) of the occurrence that counts
        if duplicate_ids:
            found = self.db.transactions.find({"_id": {"$in": duplicate_ids}}, {"src": 1})
            owner = {
                d["_id"]: (d["src"]["topic"], d["src"]["partition"], d["src"]["offset"])
                for d in found
            }
        return [
            item
            for tx_id, item in first.items()
            if owner.get(tx_id, item[2:]) == item[2:] and item[1]
        ]

    def _apply_wallets(self, items: list) -> int:
        """Fold effects per wallet and write each with a version compare-and-set."""
        pending: dict[str, list[tuple[str, int, int, Decimal]]] = defaultdict(list)
        users: dict[str, tuple[str, str]] = {}
        for tx, deltas, topic, partition, offset in items:
            for asset, delta in deltas:
                wid = wallet_id(tx.user_id, asset)
                pending[wid].append((topic, partition, offset, delta))
                users[wid] = (tx.user_id, asset)
        changed = 0
        for attempt in range(1, 51):
            if not pending:
                return changed
            current = {d["_id"]: d for d in self.db.wallets.find({"_id": {"$in": list(pending)}})}
            ops, ids, refused = [], [], set()
            for wid, effs in pending.items():
                try:
                    op = _wallet_op(wid, users[wid], current.get(wid), effs)
                except _Unrepresentable as e:
                    refused |= e.sources
                    continue
                if op is not None:
                    ops.append(op)
                    ids.append(wid)
            if refused:  # before any wallet is written, so a rewrite without them is whole
                raise _Unrepresentable(refused)
            retry: dict[str, list] = {}
            for i in range(0, len(ops), _OPS_PER_COMMAND):
                chunk, chunk_ids = ops[i : i + _OPS_PER_COMMAND], ids[i : i + _OPS_PER_COMMAND]
                done = _bulk(self.db.wallets, chunk)
                changed += done
                if done < len(chunk):  # lost a race: re-read and re-fold these wallets
                    retry.update({wid: pending[wid] for wid in chunk_ids})
            pending = retry
            if pending:
                time.sleep(random.uniform(0, 0.01 * attempt))
        raise RuntimeError(f"wallet updates kept conflicting: {sorted(pending)[:5]}")

    def _retrying(self, work):
        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return work()
            except ConnectionFailure as e:
                delay = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("mongo sink retry %d in %.2fs: %s", attempt, delay, e)
                self.close()
                time.sleep(delay)


class _Unrepresentable(ArithmeticError):
    """Effects that cannot be applied exactly; ``sources``: (stream, partition, offset)."""

    def __init__(self, sources: set[tuple[str, int, int]]):
        super().__init__(f"{len(sources)} effect(s) cannot be applied exactly")
        self.sources = sources


def _wallet_op(wid: str, owner: tuple[str, str], doc: dict | None, effs: list):
    """The compare-and-set write for one wallet, or None when nothing is left to apply.
    Raises ``_Unrepresentable`` naming the effects that would make the balance inexact."""
    applied = {(a["topic"], a["partition"]): a["offset"] for a in (doc or {}).get("applied", [])}
    balance = Decimal(doc["balance"]) if doc else Decimal(0)
    todo = False
    bad = set()
    for topic, partition, offset, delta in sorted(effs, key=lambda e: e[2]):
        if offset > applied.get((topic, partition), -1):
            try:
                balance = EXACT.add(balance, delta)
            except ArithmeticError:
                bad.add((topic, partition, offset))
                continue
            todo = True
    if bad:
        raise _Unrepresentable(bad)
    if not todo:
        return None
    for topic, partition, offset, _ in effs:
        applied[(topic, partition)] = max(offset, applied.get((topic, partition), -1))
    state = {
        "balance": format(balance, "f"),
        "applied": [{"topic": t, "partition": p, "offset": o} for (t, p), o in applied.items()],
        "updated_us": time.time_ns() // 1000,
    }
    if doc is None:
        return InsertOne({"_id": wid, "user_id": owner[0], "asset": owner[1], "v": 1, **state})
    return UpdateOne({"_id": wid, "v": doc["v"]}, {"$set": {**state, "v": doc["v"] + 1}})


def _bulk(collection, ops: list) -> int:
    """Run ops; returns how many took effect (a duplicate insert or stale version: not)."""
    try:
        res = collection.bulk_write(ops, ordered=False)
        return res.inserted_count + res.modified_count
    except BulkWriteError as e:
        if any(err["code"] != _DUPLICATE_KEY for err in e.details["writeErrors"]):
            raise
        return e.details["nInserted"] + e.details["nModified"]
