"""Small Deferred helpers shared by the session's steps."""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer

__all__ = ["after"]


def after(d: Optional[defer.Deferred]) -> defer.Deferred:
    """A new Deferred that fires with None once ``d`` has fired (at once if ``d`` is None).

    ``d``'s own result, success or failure, is left to its other callbacks.
    """
    later: defer.Deferred = defer.Deferred()
    if d is None:
        later.callback(None)
    else:
        def fire(result: object) -> object:
            later.callback(None)
            return result

        d.addBoth(fire)
    return later

