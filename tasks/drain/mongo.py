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
   wallet already applied for that partition. The new state (version v+1) is claimed by
   inserting ``wallet_versions`` document ``<wallet>#<v+1>``: FerretDB matches an update's
   filter and writes by ``_id`` in two steps, so an update-based compare-and-set lets two
   writers both win, but a unique ``_id`` insert has exactly one winner, on FerretDB and
   MongoDB alike. The loser re-reads the newest version and re-folds (its effects are
   then mostly below the winner's marks). Every batch then brings ``wallets``, the
   collection readers query, up to the newest version of each wallet it touched (also
   one that a crashed run claimed but did not copy), only forwards.
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
from pymongo import ASCENDING, DESCENDING, DeleteOne, InsertOne, UpdateOne
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
# Wallet versions are kept this long (and each wallet's newest for ever): a writer folds
# onto a version it read at most half this long ago, so the _id it claims was never freed.
_VERSIONS_KEPT_S = 3600.0
_VERSION_ONLY = frozenset({"_id", "wid", "superseded"})  # fields not copied into wallets
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
        self._pruned_at = 0.0

    @property
    def db(self):
        if self._client is None:
            self._client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=5000)
            db = self._client[self.database]
            db.transactions.create_index([("user_id", ASCENDING), ("event_us", DESCENDING)])
            db.wallets.create_index([("user_id", ASCENDING)])
            db.wallet_versions.create_index([("wid", ASCENDING)])
            db.wallet_versions.create_index([("superseded", ASCENDING), ("updated_us", ASCENDING)])
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

    def take_over(self, consumer: str) -> int:
        doc = self._retrying(
            lambda: self.db.drain_followers.find_one_and_update(
                {"_id": consumer},
                {"$inc": {"generation": 1}},
                upsert=True,
                return_document=pymongo.ReturnDocument.AFTER,
            )
        )
        return int(doc["generation"])

    def generation(self, consumer: str) -> int:
        doc = self.db.drain_followers.find_one({"_id": consumer})
        return int(doc["generation"]) if doc else 0

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
        """Fold effects per wallet; claim each new state by inserting its version; bring
        ``wallets`` up to the newest versions (also those a crashed run claimed)."""
        pending: dict[str, list[tuple[str, int, int, Decimal]]] = defaultdict(list)
        users: dict[str, tuple[str, str]] = {}
        for tx, deltas, topic, partition, offset in items:
            for asset, delta in deltas:
                wid = wallet_id(tx.user_id, asset)
                pending[wid].append((topic, partition, offset, delta))
                users[wid] = (tx.user_id, asset)
        touched = list(pending)
        changed = 0
        base, read_at = self._base(touched), time.monotonic()
        for attempt in range(1, 52):  # 50 claims; the 51st round only sees the last one won
            if not pending:
                self._show(touched)
                self._prune()
                return changed
            if attempt == 51:
                break
            if time.monotonic() - read_at > _VERSIONS_KEPT_S / 2:  # paused: its base may be gone
                base, read_at = self._base(list(pending)), time.monotonic()
            states, refused = {}, set()
            for wid, effs in pending.items():
                try:
                    state = _fold(wid, users[wid], base.get(wid), effs)
                except _Unrepresentable as e:
                    refused |= e.sources
                    continue
                if state is not None:
                    states[wid] = state
            if refused and attempt == 1:  # nothing of this batch claimed: reject them whole
                raise _Unrepresentable(refused)
            if refused:  # another writer moved a wallet between our folds: rare, and loud
                raise RuntimeError(
                    f"effects at {sorted(refused)[:3]} became inexact after part of their batch"
                    " was applied by a concurrent writer; dead-letter them by hand"
                )
            won, lost = self._claim_versions(states)
            changed += len(won)
            pending = {wid: pending[wid] for wid in lost}
            if pending:  # another writer got there first: fold onto its state (at least
                # the version this one tried to claim, which exists now)
                floor = {wid: states[wid]["v"] for wid in lost}
                base, read_at = self._base(list(pending), floor), time.monotonic()
                time.sleep(random.uniform(0, 0.01 * attempt))
        raise RuntimeError(f"wallet updates kept conflicting: {sorted(pending)[:5]}")

    def _claim_versions(self, states: dict[str, dict]) -> tuple[list[str], list[str]]:
        """Insert ``<wallet>#<v>`` for each new state: a unique ``_id`` is the one write
        FerretDB checks atomically, so of two writers folding onto one version exactly one
        wins. The version each winner folded onto is then marked superseded (what pruning
        and ``_base`` go by). Returns the wallets that won and those that lost."""
        won: list[str] = []
        lost: list[str] = []
        items = list(states.items())
        for i in range(0, len(items), _OPS_PER_COMMAND):
            chunk = items[i : i + _OPS_PER_COMMAND]
            ops = [InsertOne({**st, "_id": f"{wid}#{st['v']}", "wid": wid}) for wid, st in chunk]
            failed: set[int] = set()
            try:
                self.db.wallet_versions.bulk_write(ops, ordered=False)
            except BulkWriteError as e:
                errors = e.details["writeErrors"]
                if any(err["code"] != _DUPLICATE_KEY for err in errors):
                    raise
                failed = {err["index"] for err in errors}
            older = []
            for n, (wid, st) in enumerate(chunk):
                if n in failed:
                    lost.append(wid)
                    continue
                won.append(wid)
                if st["v"] > 1:
                    superseded = {"$set": {"superseded": True}}
                    older.append(UpdateOne({"_id": f"{wid}#{st['v'] - 1}"}, superseded))
            if older:
                self.db.wallet_versions.bulk_write(older, ordered=False)
        return won, lost

    def _show(self, wids: list[str]) -> None:
        """Bring ``wallets`` (what readers query) up to each wallet's newest version, never
        backwards. FerretDB's two-step update can let a racing copy of an older version
        land after a newer one, so the copies are read back, against the newest versions
        read again, until ``wallets`` holds them."""
        for _ in range(10):
            newest = self._newest(wids)
            shown = {d["_id"]: d["v"] for d in self.db.wallets.find({"_id": {"$in": wids}})}
            todo = [d for wid, d in newest.items() if shown.get(wid, 0) < d["v"]]
            if not todo:
                return
            views = [
                UpdateOne(
                    {"_id": d["wid"], "v": {"$lt": d["v"]}},
                    {"$set": {k: v for k, v in d.items() if k not in _VERSION_ONLY}},
                    upsert=True,
                )
                for d in todo
            ]
            for i in range(0, len(views), _OPS_PER_COMMAND):
                _write_views(self.db.wallets, views[i : i + _OPS_PER_COMMAND])
        log.warning("wallets behind their newest versions: %s", [d["wid"] for d in todo][:5])

    def _newest(self, wids: list[str], floor: dict[str, int] | None = None) -> dict[str, dict]:
        """Each wallet's newest ``wallet_versions`` document, found by exact ``_id``.

        Versions are ``<wallet>#1, #2, ...`` with no holes above the one ``wallets``
        shows (only superseded versions are pruned, and ``wallets`` is brought up to the
        newest after every batch), so the newest is found by climbing ids from the shown
        version until one is missing: usually two lookups. FerretDB (the local stack)
        answers only a plain ``{_id: <string>}`` filter from its primary key (the stack
        builds it patched so that it does: ``stack/services.py``); any other filter,
        ``$in`` on ``_id`` included, reads every document, and a scan of the versions
        kept for an hour, twice a batch, made it the soak's busiest process. A wallet
        the climb cannot place (no version at the start: new, or pruned past; or a top
        that is superseded) falls back to that scan. ``floor``: a version known to
        exist (a claim just lost to it)."""
        shown = {
            d["_id"]: int(d.get("v", 0))
            for d in self.db.wallets.find({"_id": {"$in": wids}}, {"v": 1})  # a few hundred
        }
        floor = floor or {}
        versions = self.db.wallet_versions
        newest: dict[str, dict] = {}
        lost: list[str] = []
        for wid in wids:
            v = max(shown.get(wid, 0), floor.get(wid, 0), 1)
            doc = versions.find_one({"_id": f"{wid}#{v}"})
            while doc is not None:
                above = versions.find_one({"_id": f"{wid}#{v + 1}"})
                if above is None:
                    break
                doc, v = above, v + 1
            if doc is None or doc.get("superseded"):
                lost.append(wid)
            else:
                newest[wid] = doc
        if lost:
            scan = {"wid": {"$in": lost}, "superseded": {"$ne": True}}
            for d in versions.find(scan):
                if d["v"] > newest.get(d["wid"], {}).get("v", -1):
                    newest[d["wid"]] = d
        return newest

    def _base(self, wids: list[str], floor: dict[str, int] | None = None) -> dict[str, dict]:
        """The newest claimed state of each wallet, what the next version folds onto: its
        newest ``wallet_versions`` document, else its ``wallets`` document (a wallet written
        before versions existed), else none."""
        base = {d["_id"]: d for d in self.db.wallets.find({"_id": {"$in": wids}})}
        for wid, d in self._newest(wids, floor).items():
            if d["v"] >= base.get(wid, {}).get("v", -1):
                base[wid] = {k: v for k, v in d.items() if k not in _VERSION_ONLY} | {"_id": wid}
        return base

    def _prune(self) -> None:
        """Drop superseded versions older than ``_VERSIONS_KEPT_S``, at most once a minute.
        A claim stays unique while every version a writer may fold onto exists: writers
        re-read a base older than half that time before claiming."""
        now = time.monotonic()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        cutoff = time.time_ns() // 1000 - int(_VERSIONS_KEPT_S * 1_000_000)
        old = {"superseded": True, "updated_us": {"$lt": cutoff}}
        for _ in range(64):  # a bounded amount of work per run
            ids = [d["_id"] for d in self.db.wallet_versions.find(old, {"_id": 1}).limit(256)]
            if not ids:
                return
            for i in range(0, len(ids), _OPS_PER_COMMAND):
                gone = [DeleteOne({"_id": x}) for x in ids[i : i + _OPS_PER_COMMAND]]
                self.db.wallet_versions.bulk_write(gone, ordered=False)

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


def _fold(wid: str, owner: tuple[str, str], doc: dict | None, effs: list) -> dict | None:
    """The wallet's next state (version ``v + 1``), or None when nothing is left to apply.
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
    return {
        "user_id": owner[0],
        "asset": owner[1],
        "v": (doc["v"] + 1) if doc else 1,
        "balance": format(balance, "f"),
        "applied": [{"topic": t, "partition": p, "offset": o} for (t, p), o in applied.items()],
        "updated_us": time.time_ns() // 1000,
    }


def _write_views(collection, ops: list) -> None:
    """Run view copies; whether each took effect is read back by the caller. A copy whose
    wallet already shows a newer version fails its upsert with a duplicate key (fine), and
    FerretDB may then answer without ``nModified``, which pymongo's bulk result reading
    raises as KeyError after the server has done the writes."""
    try:
        collection.bulk_write(ops, ordered=False)
    except BulkWriteError as e:
        if any(err["code"] != _DUPLICATE_KEY for err in e.details["writeErrors"]):
            raise
    except KeyError as e:
        if e.args != ("nModified",):
            raise
