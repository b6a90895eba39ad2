"""Venue adapters by name: ``venue('binance')`` or ``venue('binance', simulator_config)``.

Binance US is the Binance adapter with its own endpoints; pointing any venue at the
local simulator is only a different ``VenueConfig``.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks.feeds import binance, coinbase, kraken
from tasks.feeds.base import Venue, VenueConfig

_ADAPTERS: dict[str, Callable[[VenueConfig], Venue]] = {
    "binance": binance.Binance,
    "binanceus": binance.Binance,
    "coinbase": coinbase.Coinbase,
    "kraken": kraken.Kraken,
}
_CONFIGS: dict[str, VenueConfig] = {
    **binance.CONFIGS,
    "coinbase": coinbase.CONFIG,
    "kraken": kraken.CONFIG,
}
VENUES: tuple[str, ...] = tuple(_ADAPTERS)


def default_config(name: str) -> VenueConfig:
    """The venue's public endpoints and limits."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown venue {name!r}; known: {', '.join(VENUES)}")
    return _CONFIGS[name]


def venue(name: str, config: VenueConfig | None = None) -> Venue:
    """The adapter speaking ``name``'s protocol; ``config`` (e.g. the simulator's URLs)
    replaces the defaults. Events carry ``config.name`` as their venue."""
    default = default_config(name)
    return _ADAPTERS[name](config or default)
