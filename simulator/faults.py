"""Fault injection and the ledger that makes every injected fault checkable.

Faults are per venue. Stream faults (gap, duplicate, malformed) act on each symbol's
trade sequence before fan-out, so every connection of that venue sees the same thing;
connection faults (drop, serverShutdown, stall) act on each connection by the number of
frames written to it. Each fault has a standing "every N" setting (start-up flag or
``/_sim/faults``) and a one-shot form (``/_sim/inject/<action>``). Book faults
(``BOOK_FAULTS``) are one-shot only: the venue asks ``take`` before each book frame.

The ledger records, per venue and symbol, exactly which ids went out (as contiguous
runs), which were skipped or repeated, and the text of every malformed frame, so a test
can prove the pipeline lost and duplicated nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from simulator.market import TradeRow

TRADE = "trade"
# One-shot book faults and the venues whose protocol can show each (see ``inject``).
BOOK_FAULTS: dict[str, tuple[str, ...]] = {
    "book_gap": ("binance", "coinbase", "kraken"),  # one book frame never sent
    "book_checksum": ("kraken",),  # one update carries a wrong checksum
    "stale_snapshot": ("binance",),  # the next REST depth reply is a few seconds old
}
MALFORMED_KINDS = ("invalid_json", "nan_price", "missing_field")
# Lists in the ledger stop growing here (counts stay exact) so a long run with a standing
# fault cannot exhaust memory; ``truncated`` says when that happened.
LEDGER_CAP = 100_000


@dataclass(slots=True)
class FaultSettings:
    """Standing faults of one venue; 0 switches a fault off."""

    drop_every: int = 0  # abort each connection after every N frames written to it
    gap_every: int = 0  # per symbol, skip (generate, keep in REST, do not send) every N-th trade
    gap_size: int = 1  # ids skipped per gap
    dup_every: int = 0  # per symbol, send every N-th trade twice
    malformed_every: int = 0  # per symbol, a malformed frame before every N-th trade
    shutdown_every: int = 0  # serverShutdown after every N frames per connection, then close
    stall_every: int = 0  # per connection, stop writing for stall_s after every N frames
    stall_s: float = 2.0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def update(self, values: dict[str, str | int | float]) -> None:
        """Set fields from text or numbers; raises ValueError naming a bad key or value."""
        types = {f.name: f.type for f in fields(self)}
        for key, raw in values.items():
            if key not in types:
                raise ValueError(f"unknown fault setting {key!r}; known: {', '.join(types)}")
            value = float(raw) if types[key] == "float" else int(raw)
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {raw!r}")
            if key == "gap_size" and value < 1:
                raise ValueError("gap_size must be >= 1")
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SymbolLedger:
    """What one venue's stream did with one symbol's trades."""

    sent: int = 0  # trade frames sent (duplicates included)
    runs: list[list[int]] = field(default_factory=list)  # [first, last] id runs, send order
    skipped: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    skipped_count: int = 0
    duplicated_count: int = 0
    malformed_count: int = 0
    quotes_sent: int = 0
    snapshot_trades: int = 0  # history replayed in subscribe snapshots (Coinbase, Kraken)
    book_frames: int = 0  # book updates sent (one per fan-out, whatever the recipients)
    book_snapshots: int = 0  # book snapshots sent (subscribe, resubscribe, REST depth)
    book_gap: int = 0  # book faults carried out, by name (see BOOK_FAULTS)
    book_checksum: int = 0
    stale_snapshot: int = 0
    truncated: bool = False

    def note_sent(self, first: int, last: int) -> None:
        runs = self.runs
        if runs and runs[-1][1] == first - 1:
            runs[-1][1] = last
        elif len(runs) < LEDGER_CAP:
            runs.append([first, last])
        else:
            self.truncated = True
        self.sent += last - first + 1

    def note_skipped(self, trade_id: int) -> None:
        self.skipped_count += 1
        self._keep(self.skipped, trade_id)

    def note_duplicated(self, trade_id: int) -> None:
        self.duplicated_count += 1
        self._keep(self.duplicated, trade_id)

    def note_malformed(self, kind: str, before_id: int, texts: list[str], recipients: int) -> None:
        self.malformed_count += 1
        entry = {"kind": kind, "before_id": before_id, "texts": texts, "recipients": recipients}
        self._keep(self.malformed, entry)

    def _keep(self, items: list, item: Any) -> None:
        if len(items) < LEDGER_CAP:
            items.append(item)
        else:
            self.truncated = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "sent_runs": self.runs,
            "skipped_ids": self.skipped,
            "skipped_count": self.skipped_count,
            "duplicated_ids": self.duplicated,
            "duplicated_count": self.duplicated_count,
            "malformed": self.malformed,
            "malformed_count": self.malformed_count,
            "quotes_sent": self.quotes_sent,
            "snapshot_trades": self.snapshot_trades,
            "book_frames": self.book_frames,
            "book_snapshots": self.book_snapshots,
            "book_gap": self.book_gap,
            "book_checksum": self.book_checksum,
            "stale_snapshot": self.stale_snapshot,
            "truncated": self.truncated,
        }


@dataclass(slots=True)
class _Pending:
    """One-shot stream faults waiting for the next trades of a symbol."""

    gap: int = 0
    dup: int = 0
    malformed: deque[str] = field(default_factory=deque)
    book: dict[str, int] = field(default_factory=dict)  # book fault -> times still to do


class StreamFaults:
    """Turns one venue's generated trades into what its stream sends, and records it."""

    def __init__(self, venue: str, settings: FaultSettings | None = None):
        self.venue = venue
        self.settings = settings or FaultSettings()
        self.ledgers: dict[str, SymbolLedger] = {}
        self._pending: dict[str, _Pending] = {}
        self._seen: dict[str, int] = {}  # trades offered per symbol (drives "every N")
        self._skip_left: dict[str, int] = {}
        self._kind_turn: dict[str, int] = {}  # per symbol, so each symbol sees every kind

    def ledger(self, symbol: str) -> SymbolLedger:
        led = self.ledgers.get(symbol)
        if led is None:
            led = self.ledgers[symbol] = SymbolLedger()
        return led

    def inject(self, symbol: str, action: str, n: int, kind: str | None) -> None:
        pend = self._pending.setdefault(symbol, _Pending())
        if action == "gap":
            pend.gap += n
        elif action == "dup":
            pend.dup += n
        elif action in BOOK_FAULTS:
            pend.book[action] = pend.book.get(action, 0) + n
        elif action == "malformed":
            if kind is not None and kind not in MALFORMED_KINDS:
                raise ValueError(f"unknown malformed kind {kind!r}; known: {MALFORMED_KINDS}")
            for _ in range(n):
                pend.malformed.append(kind or self._next_kind(symbol))
        else:
            raise ValueError(f"not a stream fault: {action!r}")

    def take(self, symbol: str, action: str) -> bool:
        """Whether a one-shot book fault ``action`` is due for ``symbol``'s next book
        frame; if so it is consumed and counted in the ledger."""
        pend = self._pending.get(symbol)
        if pend is None or not pend.book.get(action):
            return False
        pend.book[action] -= 1
        led = self.ledger(symbol)
        setattr(led, action, getattr(led, action) + 1)
        return True

    def _next_kind(self, symbol: str) -> str:
        turn = self._kind_turn.get(symbol, 0)
        self._kind_turn[symbol] = turn + 1
        return MALFORMED_KINDS[turn % len(MALFORMED_KINDS)]

    def apply(self, symbol: str, trades: list[TradeRow]) -> list[tuple[str, TradeRow]]:
        """The stream items for ``trades``: (TRADE, row) to send, or (kind, row) for a
        malformed frame of that kind placed before ``row``. Skipped rows are left out."""
        s = self.settings
        led = self.ledger(symbol)
        pend = self._pending.get(symbol)
        standing = s.gap_every or s.dup_every or s.malformed_every
        if (
            not standing
            and not self._skip_left.get(symbol)
            and not (pend and (pend.gap or pend.dup or pend.malformed))
        ):
            self._seen[symbol] = self._seen.get(symbol, 0) + len(trades)
            led.note_sent(trades[0].id, trades[-1].id)
            return [(TRADE, t) for t in trades]
        items: list[tuple[str, TradeRow]] = []
        seen = self._seen.get(symbol, 0)
        skip = self._skip_left.get(symbol, 0)
        for t in trades:
            seen += 1
            if pend and pend.gap:
                skip += pend.gap
                pend.gap = 0
            if s.gap_every and seen % s.gap_every == 0:
                skip += s.gap_size
            if skip:
                skip -= 1
                led.note_skipped(t.id)
                continue
            if pend and pend.malformed:
                items.append((pend.malformed.popleft(), t))
            if s.malformed_every and seen % s.malformed_every == 0:
                items.append((self._next_kind(symbol), t))
            items.append((TRADE, t))
            led.note_sent(t.id, t.id)
            if (pend and pend.dup) or (s.dup_every and seen % s.dup_every == 0):
                if pend and pend.dup:
                    pend.dup -= 1
                items.append((TRADE, t))
                led.note_sent(t.id, t.id)
                led.note_duplicated(t.id)
        self._seen[symbol] = seen
        self._skip_left[symbol] = skip
        return items
