"""Traces, metrics and the access log around every agent request.

The work is in exchange.py, a module of its own so that mypyc compiles it
(setup.py): a compiled package __init__ gets a wrong __path__ from mypyc when its
shared library lies inside the package, and then the interpreted submodules
(tracing, otlp_metrics) cannot be found.
"""

from .exchange import Attempt, Exchange, Telemetry, build

__all__ = ["Attempt", "Exchange", "Telemetry", "build"]
