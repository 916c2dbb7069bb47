"""Reading a slow camera a few frames at a time: the socket's receive low-water mark.

A camera on a slow link sends its DATA frames one at a time, far apart, and
the reactor reads each as it comes: a wake-up, a ``recv`` and a pass through
the decoder for every kilobyte, about 30 µs of the gateway's CPU each. For
10,000 cameras at a frame a second that is a third of a core, taken from the
cameras that stream at full speed (docs/performance.md). With ``SO_RCVLOWAT`` set, Linux keeps a connection's bytes until that
many are waiting and only then reports it readable (from 4.20 it does not
even wake the reactor before), so the gateway reads several frames at once.

:class:`SlowReads` sets the mark while a file's DATA flows (state
``RECEIVING``), and keeps it from holding any byte for long:

* It is never more than the file's bytes still to come, less what the decoder
  already holds: the file's last frames always make the socket readable.
* It is sized to :data:`READ_WAIT` seconds of the camera's own rate, in whole
  frames, and at most :data:`MARK_MAX` bytes. A camera sending under two
  frames in that time is not held at all, nor is one whose reads already
  bring more than :data:`MARK_MIN` bytes (it is not slow).
* Every other state reads every byte at once: leaving ``RECEIVING`` drops
  the mark (:meth:`SlowReads.drop`).
* A held connection not read for twice its wait (the camera slowed down, or
  sent a short frame such as STATUS in the middle of a file and waits for
  the answer) loses its mark at the next scan of the sessions
  (:meth:`SlowReads.stale`, twice a second): what waits is read at once.

A byte held by the kernel is a byte not yet received: the camera has been
told nothing about it, and a crash or a closed connection loses it as it
would lose a byte still on the wire (the camera sends it again from the
resume offset). The cost is kernel memory: each held connection keeps up to
its mark in its receive queue (6.4 KB per connection on average, measured
for the benchmark's 9,850 cameras at 1 KiB/s, beside 10.0 KB of RSS; the
benchmark's report counts both), and latency: a STATUS sent in the middle
of a file waits up to twice :data:`READ_WAIT` for the scan.

Only plain TCP connections are held (the link says whether it can); TLS
ones are read as they come.
"""

from __future__ import annotations

from typing import Optional, Protocol

from camgateway.wire.codec import DATA_FRAME, PACKET

__all__ = ["SlowReads", "ReadMarkLink", "READ_WAIT", "MARK_MIN", "MARK_MAX"]

#: Seconds of a slow camera's data the kernel may hold before the gateway reads it.
#: 8 s (8 frames a read at 1 KiB/s) costs the gateway 14-20 µs per slow frame,
#: against 25-34 µs with 4 s and 13-19 µs with 16 s (slow cameras alone):
#: past 8 s the reads are no longer what costs.
READ_WAIT = 8.0
#: Marks under two frames are not worth a system call; reads that bring more are not slow.
MARK_MIN = 2 * DATA_FRAME
#: The most a connection's mark holds (kernel memory per connection).
MARK_MAX = 8 * DATA_FRAME


class ReadMarkLink(Protocol):
    """What :class:`SlowReads` needs of the connection."""

    def set_read_mark(self, nbytes: int) -> bool:
        """Report the socket readable only once ``nbytes`` wait (1: any byte); False if it cannot."""


class SlowReads:
    """The receive low-water mark of one camera connection (see the module docstring)."""

    __slots__ = ("_link", "wait", "mark", "_at", "_held")

    def __init__(self, link: ReadMarkLink, wait: float = READ_WAIT) -> None:
        self._link: Optional[ReadMarkLink] = link
        #: Seconds of the camera's rate a mark holds.
        self.wait = wait
        #: The mark in force (1: every byte is read as it comes).
        self.mark = 1
        self._at: Optional[float] = None  # when the last read while receiving was
        self._held = 0  # the file's bytes held after it

    def read(self, now: float, held: int, left: int) -> None:
        """A read while receiving is over: the file's ``held`` bytes, ``left`` at least still to come on the wire."""
        if self._link is None:  # a link that cannot hold
            return
        at, before = self._at, self._held
        if at is not None and held == before:  # no frame completed: the rate is measured between reads that did
            return
        self._at, self._held = now, held
        if at is None:  # the first read of this stretch: a rate needs two
            return
        got = held - before
        if self.mark == 1 and got > MARK_MIN:  # a camera that is not slow
            return
        elapsed = now - at
        # Frames the camera sends in ``wait`` at the rate of this read (rounded:
        # a held camera's reads each bring about its mark, a little early or late).
        frames = int(got * self.wait / (elapsed * PACKET) + 0.5) if got > 0 and elapsed > 0 else 0
        mark = min(frames * DATA_FRAME, MARK_MAX, left)
        self._set(mark if mark >= MARK_MIN else 1)

    def stale(self, now: float) -> None:
        """The periodic scan: a held connection unread for twice its wait is read at once."""
        at = self.stale_at()
        if at is not None and now > at:
            self.drop()

    def stale_at(self) -> Optional[float]:
        """When a held connection not read again becomes stale (None: not held)."""
        if self.mark == 1 or self._at is None:
            return None
        return self._at + 2 * self.wait

    def drop(self) -> None:
        """Read every byte as it comes again (leaving ``RECEIVING``, or stale)."""
        self._at = None
        self._set(1)

    def _set(self, mark: int) -> None:
        if mark == self.mark or self._link is None:
            return
        if self._link.set_read_mark(mark):
            self.mark = mark
        else:  # not a socket that can (TLS, a test transport), or it is gone: never again
            self._link = None
            self.mark = 1
