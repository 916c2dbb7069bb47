"""The private names of Twisted that camgateway relies on, in one place.

Each is used because Twisted offers no public way to do the same job; each
has a public fallback or is checked by ``tests/test_internals.py``, which
fails loudly when a Twisted release renames or removes one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quiet_pool"]

_QuietFactory: Any = None


def quiet_pool(reactor: Any, persistent: bool = True) -> Any:
    """An ``HTTPConnectionPool`` whose connections do not log "Starting factory"/"Stopping factory".

    Twisted's HTTP client makes a factory per connection, and a factory logs
    its start and stop unless it is quiet: two lines per request otherwise.
    """
    global _QuietFactory
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    if _QuietFactory is None:
        _QuietFactory = type("_QuietHTTP11ClientFactory", (_HTTP11ClientFactory,), {"noisy": False})
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietFactory
    return pool
