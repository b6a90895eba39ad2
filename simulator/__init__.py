"""Local exchange simulator: Binance, Coinbase Advanced Trade and Kraken v2 protocols over
one deterministic market, with fault injection and a ledger of everything it sent, so
the whole pipeline runs offline and is pointed at real venues by changing only URLs.
"""

from simulator.faults import MALFORMED_KINDS, FaultSettings
from simulator.server import VENUES, SimConfig, Simulator

__all__ = ["MALFORMED_KINDS", "VENUES", "FaultSettings", "SimConfig", "Simulator"]
