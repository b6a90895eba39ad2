"""The venue registry: the one place that says which venues exist and what each can do.

A venue is one module here (its WebSocket adapter, its REST history client and its
``VenueSpec``) plus its entry in ``REGISTRY``. Ingestion, gap repair and backfill ask
the registry (``spec``, ``venue``, ``rest_client``, ``gap_history``), never a class.
Binance US is the Binance adapter with its own endpoints; pointing any venue at the
local simulator is only a different ``VenueConfig`` (``venue_config``).
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

from tasks.venues import binance, coinbase, deribit, finnhub, kraken
from tasks.venues.base import IdHistory, TradeHistory, Venue, VenueConfig, VenueSpec
from tasks.venues.http import Http

REGISTRY: dict[str, VenueSpec] = {
    s.name: s for s in (*binance.SPECS, coinbase.SPEC, kraken.SPEC, deribit.SPEC, finnhub.SPEC)
}
VENUES: tuple[str, ...] = tuple(REGISTRY)


def spec(name: str) -> VenueSpec:
    """The registry entry of ``name``; ValueError naming the known venues otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown venue {name!r}; known: {', '.join(VENUES)}") from None


def default_config(name: str) -> VenueConfig:
    """The venue's public endpoints and limits."""
    return spec(name).config


def venue(name: str, config: VenueConfig | None = None) -> Venue:
    """The adapter speaking ``name``'s protocol; ``config`` (e.g. the simulator's URLs)
    replaces the defaults. Events carry ``config.name`` as their venue."""
    s = spec(name)
    return s.adapter(config or s.config)


SIMULATED_SUFFIX = "-sim"


def simulated(name: str) -> str:
    """The venue name that simulated data of ``name`` carries (``binance-sim``): stored,
    published and labelled apart from the real venue's, so simulated trades can never take
    the place of real ones with the same ids (the first writer of an id wins)."""
    return f"{name}{SIMULATED_SUFFIX}"


def stored_as(venue_name: str) -> VenueSpec | None:
    """The registry entry of the venue whose events carry ``venue_name`` (``binance`` or
    ``binance-sim``); None for a name no venue writes."""
    base = venue_name.removesuffix(SIMULATED_SUFFIX)
    return REGISTRY.get(base)


def venue_config(name: str, simulator_url: str | None = None, credential: str = "") -> VenueConfig:
    """The venue's own endpoints, or the local simulator's: same protocol, other URLs, and
    events named ``simulated(name)``. ``credential`` is the venue's API token (see
    ``VenueSpec.credential``); the simulator gets its own, never the real one."""
    s = spec(name)
    if not simulator_url:
        return replace(s.config, credential=credential) if credential else s.config
    parts = urlsplit(simulator_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"simulator URL must be http(s)://host:port, got {simulator_url!r}")
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    ws = urlunsplit((ws_scheme, parts.netloc, s.simulator_ws_path, "", ""))
    rest = f"{parts.scheme}://{parts.netloc}"
    return replace(
        s.config,
        name=simulated(s.config.name),
        ws_url=ws,
        rest_url=rest,
        credential=s.simulator_credential,
    )


def stall_timeout(name: str, requested_s: float) -> float:
    """The stall watchdog's timeout for ``name``: ``requested_s``, but never shorter than
    the venue's keep-alive allows (``VenueSpec.min_stall_timeout_s``)."""
    return max(requested_s, spec(name).min_stall_timeout_s)


def rest_client(
    name: str, config: VenueConfig | None = None, min_interval_s: float | None = None
) -> TradeHistory:
    """The venue's REST history client; ``min_interval_s`` paces it more gently than
    the venue's default (``VenueSpec.rest_interval_s``)."""
    s = spec(name)
    cfg = config or s.config
    gap = s.rest_interval_s if min_interval_s is None else min_interval_s
    return s.rest(cfg, Http(cfg.rest_url, min_interval_s=gap))


def gap_history(name: str, config: VenueConfig | None = None) -> IdHistory | None:
    """REST history that gap repair asks for ids, for venues whose trade ids are
    sequential (it finds them by id, or by time within the bounds the tracker gives);
    None where they are not (their trades are published as they come)."""
    if not spec(name).sequential_ids:
        return None
    return rest_client(name, config)  # type: ignore[return-value]


def trades_client(
    name: str, config: VenueConfig | None = None, min_interval_s: float | None = None
) -> TradeHistory:
    """The REST client of a venue that serves trades by time; ValueError for one that
    does not (Finnhub's free plan)."""
    if not spec(name).trade_history:
        with_history = [n for n, s in REGISTRY.items() if s.trade_history]
        raise ValueError(
            f"{name} has no trade history over REST (venues with it: {', '.join(with_history)});"
            " use backfill_candles"
        )
    return rest_client(name, config, min_interval_s)


def klines_client(
    name: str, config: VenueConfig | None = None, min_interval_s: float | None = None
) -> TradeHistory:
    """The REST client of a venue that serves candles; ValueError for one that does not."""
    if not spec(name).klines:
        with_klines = [n for n, s in REGISTRY.items() if s.klines]
        raise ValueError(
            f"{name} has no kline history (venues with klines: {', '.join(with_klines)}); "
            "use backfill_trades"
        )
    return rest_client(name, config, min_interval_s)
