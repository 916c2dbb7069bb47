"""What one emulated camera saw and did, for reports, tests and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CameraResult"]


@dataclass
class CameraResult:
    """The record of one camera over all its connections."""

    imei: int
    kind: str
    #: Files the camera was given.
    files_total: int = 0
    #: ``(identifier, size)`` of every file the camera considers uploaded.
    delivered: list[tuple[str, int]] = field(default_factory=list)
    #: Identifiers answered with STATUS 0x11 instead of START (a fault).
    refused: list[str] = field(default_factory=list)
    #: Identifiers answered with START then, in the same write, STATUS (a fault):
    #: the camera gave them up, so they are neither delivered nor pending.
    given_up: list[str] = field(default_factory=list)
    #: Identifiers still held when the camera stopped.
    pending: list[str] = field(default_factory=list)
    #: Every RESUME position received, in order.
    resumes: list[int] = field(default_factory=list)
    #: Every SYNC position sent, in order.
    syncs: list[int] = field(default_factory=list)
    #: START frames sent.
    starts: int = 0
    #: CLOSE (``0000 0000``) frames received.
    closes: int = 0
    #: COMPLETE (``0005 0004 00000000``) frames received.
    completes: int = 0
    #: REPEAT INIT (``00 09``) frames received.
    repeat_inits: int = 0
    metadata_requests: int = 0
    metadata_sent: int = 0
    #: Things the gateway did wrong, or that went wrong (gateway silence, give-up).
    errors: list[str] = field(default_factory=list)
    #: TCP connections made (attempts that failed to connect not included).
    connections: int = 0
    connect_failures: int = 0
    #: Connections closed by the gateway (or the network) rather than by the camera.
    closed_by_peer: int = 0
    #: Every byte written, and the file bytes among them (re-sent bytes counted again).
    bytes_sent: int = 0
    data_bytes_sent: int = 0
    #: Faults that fired.
    bad_crcs_sent: int = 0
    drops: int = 0
    garbage: bool = False
    gave_up: bool = False
    started: float = 0.0
    finished: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from the first connection attempt to the end."""
        return max(0.0, self.finished - self.started)

    @property
    def ok(self) -> bool:
        """The camera did what it came for.

        A normal camera delivered (or, by fault, refused or gave up) every file without
        errors; a garbage camera saw the gateway close the connection (or
        send CLOSE).
        """
        if self.garbage:
            return (self.closed_by_peer > 0 or self.closes > 0) and not self.errors
        return not self.pending and not self.errors and not self.gave_up

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        out = asdict(self)
        out["ok"] = self.ok
        out["elapsed"] = self.elapsed
        return out
