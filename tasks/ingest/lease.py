"""One publisher per symbol: leases in PostgreSQL that exactly one run holds while it publishes.

Why: two ingestion runs publishing one symbol of a feed (a venue into a trades topic) send
each of its trades twice, and their gap trackers disagree. Nothing else stops that: the
deployment trigger reruns a Crashed ingestion; the heartbeat automation marks a run
Crashed when the *Prefect server* stops hearing from it, although the process may still be
alive and publishing; an operator may start a deployment twice. Yet runs of one feed with
disjoint symbol sets (one deployment per symbol set, to ingest on several machines) must
be able to publish side by side.

The lease (table ``ingest_leases``, migration ``0300_ingest_leases.sql``): one row per
symbol of a feed, keyed ``"<venue>:<trades topic>:<symbol>"`` (``lease_key``; the column
is still called ``feed``), so test and side-by-side runs on private topics never meet, and
runs of disjoint symbol sets never touch each other's rows. A run holds the rows of all its
symbols as one lease. A row keyed ``"<venue>:<trades topic>"`` is an earlier version's
lease of the whole feed: while one is live (a run of that version may be publishing every
symbol, say during an upgrade), no run takes any symbol of that feed and the waiting log
names it; released or expired, it is never used again and may be deleted. (The earlier
version does not see per-symbol rows: never start it beside this one.)

- **acquire** takes every row of the run's symbols that is free, released or expired, in
  one transaction, and only if it can take them all: if any row is held by a live other
  holder, the transaction is rolled back and the run holds none of them while it waits
  (so two runs with overlapping sets never each hold part of the other's, and a waiter
  never keeps a free symbol from a third run). The transaction locks the rows it meets,
  the holder's too; an acquirer that freezes or loses the network inside it has it ended
  by the server after ``IDLE_TX_MS``, so it never stalls the holder's renewals. Rows are
  taken in key order, so concurrent acquirers of overlapping sets queue on the first row
  they share instead of deadlocking.
  Each row taken gets its next fencing ``token`` (+1 per acquisition of that row; rows are
  never deleted); the holder keeps each row's token. Otherwise it waits, polling every
  second and logging who holds which of its symbols and until when.
- **renew** extends all the run's rows in one statement, each only while holder id *and*
  token are still this run's. If any row is not, someone else has acquired that symbol:
  ``LeaseLost`` ("fenced: ...", naming the symbols lost), and the run stops publishing
  every symbol at once (it is one unit; its remaining rows are released when it stops).
- **release** (clean shutdown, after the producer has flushed and closed) expires the
  run's rows now, so the next run starts within a poll instead of waiting a TTL.

Two clocks, one authority. Whether a lease has expired is decided only by PostgreSQL's
``now()``: a waiter takes a row only if ``expires_at <= now()`` on the server, so the
hosts' wall clocks never matter. But a holder must also know when to stop while the
database is unreachable, so it keeps its own bound: it reads this host's boot-time clock
(``clock``: CLOCK_BOOTTIME, monotonic, counts suspended time, never stepped by NTP)
*before* sending each acquire or renew. The server stamps ``expires_at = now() + ttl``
after it received the statement (for acquire: the start of its transaction), so ``sent +
ttl`` (``valid_until``) is never later than the real expiry; only a difference in clock
*rate* (parts per million) eats into it.

Self-fencing. The holder publishes only until ``fence_at = valid_until - margin``. The
publisher enforces that per message (``tasks.ingest.publish``: a lane refuses to send past
it), so neither a stuck database call, nor a slow flow loop, nor thread scheduling can
stretch it; the flow then stops the shards, drops what the producer has not yet sent, and
ends the run "fenced: could not renew ...". A waiter can take over only after the
server's expiry, which is at least ``margin`` later.

Timing (``TTL_S``, ``RENEW_EVERY_S``, ``MARGIN_S``, ``RETRY_S``), chosen together:

- renew every 5 s, retry every 1 s after a failure; every attempt is bounded (connect
  5 s, statement 5 s, unacknowledged TCP data 10 s), so a lost network cannot hang it.
- TTL 45 s and margin 10 s: a holder whose last renewal was sent at ``t`` publishes until
  ``t + 35`` without another. Renewals are due every 5 s, so the database may be
  unreachable for up to 35 - 5 - 1 = 29 s (24 s if each attempt hangs the full connect
  timeout) without stopping a healthy ingestion: a 10-20 s PostgreSQL restart costs
  nothing; the holder keeps publishing on its own reckoning and renews the moment the
  server answers (its row, with its token, is still there: nobody could take it).
- A longer outage self-fences the holder at ``t + 35``, 10 s before anyone can take
  over at ``t + 45``. The margin covers the flow noticing (0.2 s), aborting the
  producer's unsent records and in-flight requests (well under a second with a healthy
  broker), clock rate differences, and a small step of the database server's clock.
- A holder that died (SIGKILL, lost machine) is replaced at most 45 s (+1 s poll) after
  its last renewal; the Crashed-run trigger takes ~10 s to start the new run anyway, and
  its gap repair covers the pause.

Failure modes:

- *PostgreSQL restarts for 10-20 s*: renewals fail, are retried every second, succeed
  when it is back; publishing never pauses. Waiters retry the same way.
- *PostgreSQL gone for longer than ~29 s*: the holder stops publishing and its run fails
  "fenced: could not renew ... for N s"; a waiting run (if any) takes over after expiry,
  resuming from what Kafka holds. Without a waiter, start the deployment again.
- *Prefect server unreachable*: the lease does not involve Prefect. The run keeps
  renewing and publishing; if the heartbeat automation marks it Crashed and the trigger
  starts another run, that run waits, logging the live holder, and takes over only when
  the first stops (released: within a second; died: after the TTL).
- *Holder paused longer than the margin* (SIGSTOP, VM freeze, swap storm) and taken over
  meanwhile: when it resumes, its lanes refuse to send (``fence_at`` has passed), and its
  next renewal reports the loss. Kafka itself does not check fencing tokens, so a record
  the broker had already received before the fence may still be appended: that residual
  is what the margin is for.
- *Second start by an operator*, or a deployment whose symbol set overlaps a running
  one's: the second run waits, logging who holds which of its symbols, and takes them all
  when they are all free. Runs whose symbol sets are disjoint publish side by side.

Nothing here imports Prefect; the flow passes its run logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn

from tasks.core.pg import connect

log = logging.getLogger(__name__)

TTL_S = 45.0  # the server expires an unrenewed lease this long after its last renewal
RENEW_EVERY_S = 5.0  # a healthy holder renews this often
MARGIN_S = 10.0  # a holder stops publishing this long before its lease could expire
RETRY_S = 1.0  # after a failed renewal (or while a waiter cannot reach the database)
POLL_S = 1.0  # how often a waiter asks whether the lease is free
STATEMENT_TIMEOUT_MS = 5000
TCP_USER_TIMEOUT_MS = 10_000
IDLE_TX_MS = 2000  # the server ends an acquisition left open longer (a frozen acquirer)
# How a live row of an earlier version's whole-feed lease (key ``feed_key``) is named: a
# run of that version may still be publishing every symbol, so no symbol is taken.
_WHOLE_FEED = "every symbol (an earlier version's lease of the whole feed)"

if hasattr(time, "CLOCK_BOOTTIME"):
    _CLOCK_ID = time.CLOCK_BOOTTIME

    def clock() -> float:
        """Seconds on this host's boot-time clock: monotonic, and counts suspended time."""
        return time.clock_gettime(_CLOCK_ID)

else:  # pragma: no cover - not Linux
    clock = time.monotonic


def feed_key(venue: str, trades_topic: str) -> str:
    """A feed's name: the venue config name and the topic its trades go to."""
    return f"{venue}:{trades_topic}"


def lease_key(feed: str, symbol: str) -> str:
    """The key of one symbol's lease row (defined here only): runs of disjoint symbol sets
    of one feed never share a row, runs of one symbol always do."""
    return f"{feed}:{symbol}"


def _listed(items: Iterable[str], most: int = 8) -> str:
    """``items`` comma separated, the first ``most`` only (a run may have 1000 symbols)."""
    items = list(items)
    more = f", ... ({len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _tokens(tokens: Iterable[int]) -> str:
    """Tokens for a log line: "token 7", or "tokens 3-9" when the rows' tokens differ."""
    tokens = list(tokens)
    if not tokens:
        return "no token"
    low, high = min(tokens), max(tokens)
    return f"token {low}" if low == high else f"tokens {low}-{high}"


class LeaseLost(RuntimeError):
    """Some symbol's lease is no longer this holder's (taken, or not renewed in time): stop
    publishing."""


class LeaseBusy(TimeoutError):
    """Other live holders kept some of the symbols for as long as the caller was willing to
    wait."""

    def __init__(self, message: str, holders: list[Holder]):
        super().__init__(message)
        self.holders = holders


class Unreachable(RuntimeError):
    """The database did not answer (down, restarting, network): try again shortly."""


@dataclass(frozen=True)
class Holder:
    """One acquisition's rows among some symbols' leases, as the database sees them now."""

    symbols: tuple[str, ...]
    tokens: tuple[int, ...]  # each symbol's row's token
    holder: str
    owner: str
    expires_in_s: float  # by the database's clock, the earliest of the rows; <= 0: expired
    renewed_ago_s: float
    released: bool

    @property
    def live(self) -> bool:
        """Neither released nor expired: nobody else may take these rows."""
        return not self.released and self.expires_in_s > 0

    def describe(self) -> str:
        held = f"{_listed(self.symbols)} held by {self.owner} ({_tokens(self.tokens)})"
        if self.released:
            return f"{held}, released"
        return (
            f"{held}, renewed {self.renewed_ago_s:.0f} s ago, expires in "
            f"{self.expires_in_s:.0f} s by the database's clock unless renewed"
        )


def _described(holders: list[Holder]) -> str:
    """Who holds which symbols, one acquisition after another."""
    return "; ".join(h.describe() for h in holders)


# Run in a transaction that is committed only if every key was taken (``Lease._take``).
# Rows are taken in key order, so acquirers of overlapping sets queue on their first
# shared row instead of deadlocking.
_ACQUIRE = """
INSERT INTO ingest_leases AS l
    (feed, token, holder, owner, acquired_at, renewed_at, expires_at)
SELECT key, 1, %(holder)s, %(owner)s, now(), now(), now() + %(ttl)s * interval '1 second'
  FROM unnest(%(keys)s::text[]) AS key
 WHERE NOT EXISTS (  -- an earlier version's lease of the whole feed, still live
       SELECT 1 FROM ingest_leases AS old
        WHERE old.feed = %(feed)s AND old.released_at IS NULL AND old.expires_at > now())
 ORDER BY key
ON CONFLICT (feed) DO UPDATE
   SET token = l.token + 1, holder = excluded.holder, owner = excluded.owner,
       acquired_at = now(), renewed_at = now(), expires_at = excluded.expires_at,
       released_at = NULL
 WHERE l.expires_at <= now() OR l.released_at IS NOT NULL
RETURNING feed, token
"""
# This holder's rows that are still its own (holder id and token), locked in key order
# like _ACQUIRE's, so a renewal and an acquisition never deadlock.
_MINE = """
WITH mine AS (
    SELECT l.feed FROM ingest_leases AS l
      JOIN unnest(%(keys)s::text[], %(tokens)s::bigint[]) AS m (feed, token)
        ON l.feed = m.feed AND l.token = m.token
     WHERE l.holder = %(holder)s AND l.released_at IS NULL
     ORDER BY l.feed
       FOR UPDATE OF l
)
"""
_RENEW = (
    _MINE
    + """
UPDATE ingest_leases AS l SET renewed_at = now(), expires_at = now() + %(ttl)s * interval '1 second'
  FROM mine WHERE l.feed = mine.feed
RETURNING l.feed
"""
)
_RELEASE = (
    _MINE
    + """
UPDATE ingest_leases AS l SET expires_at = now(), released_at = now()
  FROM mine WHERE l.feed = mine.feed
RETURNING l.feed
"""
)
_CURRENT = """
SELECT array_agg(feed ORDER BY feed), array_agg(token ORDER BY feed), holder, owner,
       min(extract(epoch FROM expires_at - now()))::float8,
       max(extract(epoch FROM now() - renewed_at))::float8, released_at IS NOT NULL
  FROM ingest_leases WHERE feed = ANY(%(keys)s)
 GROUP BY holder, owner, released_at IS NOT NULL
 ORDER BY 1
"""


class Lease:
    """The lease of one run's symbols of a feed (a row each, taken, renewed and released
    together), as one would-be holder sees it (one acquisition at a time).

    ``tokens`` maps each symbol whose row this holder still has to that row's fencing token
    (empty when not held); ``valid_until``/``fence_at`` are on ``clock``. Thread-safe:
    statements are serialised on one connection, which is reopened after any connection
    error.
    """

    def __init__(
        self,
        dsn: str,
        feed: str,
        symbols: Iterable[str],
        owner: str,
        *,
        schema: str = "public",
        ttl_s: float = TTL_S,
        renew_every_s: float = RENEW_EVERY_S,
        margin_s: float = MARGIN_S,
    ):
        if not (renew_every_s > 0 and margin_s >= 0 and renew_every_s + margin_s < ttl_s):
            raise ValueError(
                f"lease timing: need 0 < renew_every_s ({renew_every_s}) and "
                f"renew_every_s + margin_s ({margin_s}) < ttl_s ({ttl_s})"
            )
        self.symbols = tuple(sorted(set(symbols)))
        if not self.symbols:
            raise ValueError(f"lease {feed}: no symbols")
        self.dsn = dsn
        self.schema = schema
        self.feed = feed
        self.name = f"{feed} [{_listed(self.symbols)}]"  # for logs
        self._symbol_of = {lease_key(feed, s): s for s in self.symbols}
        self.owner = owner
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.margin_s = margin_s
        self.holder = ""
        self.tokens: dict[str, int] = {}
        self.valid_until = -math.inf  # the server's expiry is no earlier than this
        self.lost: str | None = None  # why the last acquisition ended, if it was not released
        self._conn: Any = None
        self._lock = threading.Lock()

    # ---- what the holder may do ---------------------------------------------------------

    @property
    def fence_at(self) -> float:
        """Until when (``clock``) the holder may publish: ``margin_s`` before expiry."""
        return self.valid_until - self.margin_s

    @property
    def held(self) -> bool:
        """Held, and not past ``fence_at`` by this host's own reckoning."""
        return bool(self.tokens) and clock() < self.fence_at

    def remaining(self) -> float:
        """Seconds left to publish without another renewal (negative once past)."""
        return self.fence_at - clock()

    # ---- statements -------------------------------------------------------------------

    def _call(self, work: Callable[[Any], list[tuple]]) -> list[tuple]:
        """``work(cursor)`` on the connection (opened on demand); any database error drops
        the connection (the server rolls back an open transaction) and is ``Unreachable``."""
        with self._lock:
            try:
                if self._conn is None:
                    dsn = make_dsn(self.dsn, tcp_user_timeout=TCP_USER_TIMEOUT_MS)
                    conn = connect(dsn, self.schema)
                    conn.autocommit = True  # now() is each statement's own start time
                    with conn.cursor() as cur:
                        cur.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
                        # An acquisition is a transaction that locks rows, possibly the
                        # holder's: if this process freezes or loses the network inside
                        # it, the server ends it so that the holder's renewals go on.
                        cur.execute(f"SET idle_in_transaction_session_timeout = {IDLE_TX_MS}")
                    self._conn = conn
                with self._conn.cursor() as cur:
                    return work(cur)
            except psycopg2.Error as e:  # lost, refused, read-only after a failover, ...
                self._drop()
                raise Unreachable(" ".join(str(e).split()) or type(e).__name__) from e

    def _execute(self, sql: str, **params: Any) -> list[tuple]:
        def run(cur: Any) -> list[tuple]:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

        return self._call(run)

    def _take(self, holder: str) -> dict[str, int]:
        """Every symbol's row with its new token, or none: ``_ACQUIRE`` in a transaction
        that is rolled back unless it took them all (all-or-nothing)."""
        keys = list(self._symbol_of)

        def run(cur: Any) -> list[tuple]:
            cur.execute("BEGIN")
            params = {
                "keys": keys, "feed": self.feed, "holder": holder, "owner": self.owner,
                "ttl": self.ttl_s,
            }  # fmt: skip
            cur.execute(_ACQUIRE, params)
            rows = cur.fetchall()
            cur.execute("COMMIT" if len(rows) == len(keys) else "ROLLBACK")
            return rows

        rows = self._call(run)
        if len(rows) < len(keys):
            return {}
        return {self._symbol_of[k]: t for k, t in sorted(rows)}

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection (the lease itself is kept, released or left to expire)."""
        with self._lock:
            self._drop()

    def current(self, symbols: Iterable[str] | None = None) -> list[Holder]:
        """Who holds (or last held) the rows of ``symbols`` (default: all of this lease's),
        one entry per acquisition; symbols nobody ever took are left out."""
        keys = [lease_key(self.feed, s) for s in (self.symbols if symbols is None else symbols)]
        return [
            Holder(tuple(self._symbol_of.get(k, _WHOLE_FEED) for k in held), tuple(tokens), *rest)
            for held, tokens, *rest in self._execute(_CURRENT, keys=[*keys, self.feed])
        ]

    def try_acquire(self) -> list[Holder] | None:
        """One attempt: take every symbol's row if none is held by a live other holder
        (then None, and ``tokens`` is set), else take none and return who holds which.
        Raises ``Unreachable``."""
        for _ in range(3):  # freed between the two statements: try again at once
            holder = uuid.uuid4().hex
            sent = clock()
            taken = self._take(holder)
            if taken:
                self.holder, self.tokens, self.lost = holder, taken, None
                self.valid_until = sent + self.ttl_s
                return None
            holders = self.current()
            if any(h.live for h in holders):
                return [h for h in holders if h.live]
        return holders  # freed and taken again each time: who had them last

    def acquire(
        self,
        *,
        timeout_s: float | None = None,
        poll_s: float = POLL_S,
        logger: Any = None,
        log_every_s: float = 60.0,
    ) -> dict[str, int]:
        """Take every symbol's row, waiting while another live holder has any of them (and
        holding none meanwhile); returns each symbol's token.

        Logs who holds which symbols when waiting starts, when the holders change and
        every ``log_every_s``; a database that does not answer is retried the same way.
        ``timeout_s`` None waits for as long as it takes; else ``LeaseBusy``.
        """
        logger = logger or log
        deadline = None if timeout_s is None else clock() + timeout_s
        seen: tuple | None = None
        next_log = -math.inf
        waited_from = clock()
        while True:
            try:
                holders = self.try_acquire()
            except Unreachable as e:
                holders, who = [], "? (PostgreSQL does not answer)"
                if clock() >= next_log or seen != ("unreachable",):
                    logger.warning(
                        "lease %s: PostgreSQL does not answer (%s); retrying every %.0f s",
                        self.name, e, poll_s,
                    )  # fmt: skip
                    seen, next_log = ("unreachable",), clock() + log_every_s
            else:
                if holders is None:
                    waited = clock() - waited_from
                    logger.info(
                        "lease %s acquired: %s%s; publishing only while it is renewed"
                        " (every %.0f s, expires %.0f s after the last renewal)",
                        self.name, _tokens(self.tokens.values()),
                        f" after waiting {waited:.0f} s" if seen is not None else "",
                        self.renew_every_s, self.ttl_s,
                    )  # fmt: skip
                    return dict(self.tokens)
                who = _described(holders) or "? (freed and taken again meanwhile)"
                key = tuple((h.holder, h.tokens) for h in holders)
                if key != seen or clock() >= next_log:
                    logger.warning("waiting for lease %s: %s", self.name, who)
                    seen, next_log = key, clock() + log_every_s
            if deadline is not None and clock() >= deadline:
                raise LeaseBusy(f"lease {self.name} is busy: {who}", holders)
            pause = poll_s if deadline is None else min(poll_s, max(0.0, deadline - clock()))
            time.sleep(pause)

    def _mine(self) -> dict[str, Any]:
        """The parameters by which ``_MINE`` finds this holder's rows (one read of
        ``tokens``: ``release`` may replace it meanwhile)."""
        tokens = self.tokens
        keys = [lease_key(self.feed, s) for s in tokens]
        return {"keys": keys, "tokens": list(tokens.values()), "holder": self.holder}

    def renew(self) -> float:
        """Extend every row of the lease by ``ttl_s``; returns the new ``fence_at``.

        ``LeaseLost`` ("fenced: ...") when any is no longer this holder's; ``Unreachable``
        when the database does not answer (the lease then holds until ``fence_at``)."""
        if self.lost is not None or not self.tokens:
            raise LeaseLost(f"fenced: lease {self.name} is not held ({self.lost or 'released'})")
        sent = clock()
        renewed = {k for (k,) in self._execute(_RENEW, **self._mine(), ttl=self.ttl_s)}
        if len(renewed) == len(self.tokens):
            self.valid_until = max(self.valid_until, sent + self.ttl_s)
            return self.fence_at
        raise self._lose(renewed)

    def _lose(self, kept: set[str]) -> LeaseLost:
        """Some rows were taken: the whole lease is lost (the run stops every symbol), the
        rows still ours are kept for ``release``, and the others' new holders are named."""
        lost = {s: t for s, t in self.tokens.items() if lease_key(self.feed, s) not in kept}
        try:
            who = _described(self.current(lost)) or "nobody (their rows were deleted)"
        except Unreachable:
            who = "? (PostgreSQL stopped answering)"
        self.lost = (
            f"fenced: lease {self.name}: {_listed(lost)} ({_tokens(lost.values())}) was taken;"
            f" now {who}"
        )
        self.tokens = {s: t for s, t in self.tokens.items() if s not in lost}
        self.valid_until = -math.inf
        return LeaseLost(self.lost)

    def release(self) -> bool:
        """Give up every row still ours now (after the last record was delivered); False if
        none was or the database did not answer (they then expire by themselves)."""
        if not self.tokens:
            return False
        mine = self._mine()
        self.tokens, self.valid_until = {}, -math.inf
        try:
            return bool(self._execute(_RELEASE, **mine))
        except Unreachable as e:
            log.warning("lease %s: release failed (%s); it expires by itself", self.name, e)
            return False


class Keeper:
    """Renews a held ``Lease`` in its own thread until stopped, lost or past ``fence_at``.

    ``on_renewed(fence_at)`` after each renewal; ``on_fenced(reason)`` once, when the lease
    was taken or could not be renewed before ``fence_at`` (``reason`` starts "fenced: ").
    A renewal blocked on the network delays nothing but itself: the publisher enforces
    ``fence_at`` on its own.
    """

    def __init__(
        self,
        lease: Lease,
        on_fenced: Callable[[str], None],
        on_renewed: Callable[[float], None] | None = None,
        *,
        logger: Any = None,
        retry_s: float = RETRY_S,
        warn_every_s: float = 5.0,
    ):
        self.lease = lease
        self.on_fenced = on_fenced
        self.on_renewed = on_renewed
        self.logger = logger or log
        self.retry_s = retry_s
        self.warn_every_s = warn_every_s
        self.verdict: str | None = None
        self.renewals = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ctx = contextvars.copy_context()  # the caller's logging context (a flow run's)
        self._thread = threading.Thread(
            target=ctx.run, args=(self._run,), name=f"lease-{self.lease.feed}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop renewing; True once the thread has ended (False: a call still hangs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _fence(self, reason: str) -> None:
        if self.verdict is None:
            self.verdict = reason
            self.logger.error("%s", reason)
            self.on_fenced(reason)

    def _run(self) -> None:
        lease = self.lease
        next_at = clock() + lease.renew_every_s
        last_ok = lease.valid_until - lease.ttl_s  # when the last good statement was sent
        failing_since, next_warn = None, -math.inf
        last_error = ""
        while not self._stop.is_set():
            if clock() >= lease.fence_at:
                tokens = _tokens(lease.tokens.values())
                self._fence(
                    f"fenced: could not renew lease {lease.name} ({tokens}) for "
                    f"{clock() - last_ok:.0f} s (last error: {last_error or 'none'}); stopped "
                    f"publishing {lease.margin_s:.0f} s before it could expire"
                )
                return
            wait = min(next_at, lease.fence_at) - clock()
            if wait > 0:
                self._stop.wait(wait)
                continue
            try:
                fence_at = lease.renew()
            except LeaseLost as e:
                if not self._stop.is_set():  # released by a clean shutdown meanwhile: no verdict
                    self._fence(str(e))
                return
            except Unreachable as e:
                self.failures += 1
                last_error = str(e)
                failing_since = failing_since or clock()
                if clock() >= next_warn:
                    self.logger.warning(
                        "lease %s: renewal failed (%s); still ours for %.0f s by this host's"
                        " clock, publishing stops then unless PostgreSQL answers",
                        lease.name, e, lease.remaining(),
                    )  # fmt: skip
                    next_warn = clock() + self.warn_every_s
                next_at = clock() + self.retry_s
                continue
            self.renewals += 1
            if failing_since is not None:
                self.logger.info(
                    "lease %s renewed again after %.0f s of failed renewals",
                    lease.name, clock() - failing_since,
                )  # fmt: skip
                failing_since, next_warn = None, -math.inf
            last_ok = clock()
            if self.on_renewed is not None and not self._stop.is_set():
                self.on_renewed(fence_at)
            next_at = clock() + lease.renew_every_s
