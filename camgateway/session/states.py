"""The states of a camera session (the table is in :mod:`camgateway.session.machine`)."""

from __future__ import annotations

import enum

__all__ = ["State", "S"]


class State(enum.Enum):
    """Where a session is in the protocol."""

    AWAIT_INIT = "awaiting init"
    LEASING = "taking the camera's lease"
    AWAIT_PATH = "awaiting file path"
    AWAIT_METADATA = "awaiting metadata"
    AWAIT_START = "awaiting START"
    PREPARING = "opening transfer"
    AWAIT_SYNC = "awaiting SYNC"
    RECEIVING = "receiving"
    DISCARDING = "discarding until SYNC"
    STORING = "storing file"
    CLOSED = "closed"


S = State
