"""The floor: the least a Twisted receiver must do for the benchmark's byte exchange.

``python benchmarks/floor.py --port PORT --root DIR`` listens on 127.0.0.1
(``--interface`` for another address) with the epoll reactor, as
``twistd camgateway`` does. Per connection it:

* appends **every byte received**, unparsed, to one file
  (``DIR/<imei>-<n>.bin``, opened when the init arrives), one ``os.write``
  per read, as the gateway writes one ``pwrite`` per read;
* answers the camera with the same round trips the gateway makes
  (PROTOCOL.md 4-5: METADATA REQUEST, FILE REQUEST, RESUME, and REPEAT INIT
  after each file, CLOSE when nothing is left, in the gateway's default
  source order), so the emulator sends exactly the same bytes to both;
* looks only at the few control frames it must answer (init, PATH,
  METADATA, START, SYNC: a length field each). The DATA stream is never
  framed, CRC-checked or copied: after SYNC the floor counts the bytes the
  file takes on the wire and then treats it as complete. A path-flow START
  gives the size in bytes: ``size + 6 bytes per frame of up to 1024``. A
  DualCam START gives packets, of which only the last may be short: the
  floor counts ``1030 bytes`` for each but the last, then reads the last
  frame's 4-byte header for its length (one header per file, so any size
  works, as real photos and videos need: the benchmark's own sizes are
  whole packets, but an independent load generator's need not be).
* makes the file durable before acknowledging it: ``fdatasync`` in a
  thread, then REPEAT INIT. The gateway also acknowledges only after the
  file is on stable storage, so completion times compare like with like.

What it does not do is everything the gateway adds on top of moving bytes:
frame parsing and CRC of every DATA frame, the resume store (SQLite),
checkpoints every ``storage.checkpoint_bytes``, SHA-256, the sidecar, the
hard link into the sink and directory fsyncs, timeouts and logging per file.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

PATH_BIT = 0x02000000
#: The gateway's default ``download.dualcam_sources`` order, with the settings bits.
SOURCES = ((b"videor", 0x20000000), (b"videof", 0x10000000), (b"photor", 0x08000000), (b"photof", 0x04000000))
CLOSE = b"\x00\x00\x00\x00"
REPEAT_INIT = b"\x00\x09"
PATH_REQUEST = b"\x00\x0c\x00\x02\x00\x00"
FRAME = 1024

_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")


def _frame(cmd: int, payload: bytes) -> bytes:
    return _u16.pack(cmd) + _u16.pack(len(payload)) + payload


class FloorProtocol(Protocol):
    """One camera connection of the floor server."""

    def __init__(self, factory: "FloorFactory") -> None:
        self.factory = factory
        self.fd = -1
        self.control = bytearray()
        self.data_left = 0
        #: After ``data_left``, the header of a DualCam file's last frame is still to come.
        self.last_header = False
        self.header = b""
        self.identifier = b""
        self.dualcam = True
        self.expect = 0
        self.total = 0  # START's size: packets (DualCam) or bytes
        self.file_bytes = 0  # the file's own bytes, once known

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self.fd < 0:
            self.control += data  # before the init: kept, written once the file is open
            self._control()
            return
        os.write(self.fd, data)
        self._take(data)

    def _take(self, data: bytes) -> None:
        """Count DATA bytes while a file streams; anything after it is control."""
        left = self.data_left
        if left:
            if len(data) < left:
                self.data_left = left - len(data)
                return
            self.data_left = 0
            data = data[left:]
            if not self.last_header:
                self._file_done()
        if self.last_header:  # a DualCam file's last frame: its header says how long it is
            got = self.header + data[: 4 - len(self.header)]
            data = data[4 - len(self.header) :]
            if len(got) < 4:
                self.header = got
                return
            self.header, self.last_header = b"", False
            self.data_left = _u16.unpack_from(got, 2)[0]  # the payload and its CRC
            self.file_bytes = (self.total - 1) * FRAME + max(0, self.data_left - 2)
            if self.data_left:
                self._take(data)
                return
            self._file_done()
        if data:
            self.control += data
            self._control()

    # -- the few control frames

    def _control(self) -> None:
        buf = self.control
        while len(buf) >= 4 and not (self.data_left or self.last_header):
            if buf[0] == 0 and buf[1] == 0:  # init packet, 16 bytes
                if len(buf) < 16:
                    return
                frame, rest = bytes(buf[:16]), buf[16:]
                if self.fd < 0:
                    imei = struct.unpack_from(">Q", frame, 4)[0]
                    n = self.factory.files = self.factory.files + 1
                    path = os.path.join(self.factory.root, f"{imei}-{n}.bin")
                    self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                    os.write(self.fd, bytes(buf))  # the init and anything after it, as received
                self._init(_u32.unpack_from(frame, 12)[0])
            else:
                cmd, length = _u16.unpack_from(buf, 0)[0], _u16.unpack_from(buf, 2)[0]
                if len(buf) < 4 + length:
                    return
                payload, rest = bytes(buf[4:4 + length]), buf[4 + length:]
                if cmd == 0x0003:  # SYNC: the DATA stream follows
                    self.control = bytearray()
                    self._stream(bytes(rest))
                    return
                self._answer(cmd, payload)
            buf = self.control = bytearray(rest)

    def _init(self, settings: int) -> None:
        if settings & PATH_BIT:
            self.dualcam = False
            self.transport.write(PATH_REQUEST)
            return
        for name, bit in SOURCES:
            if settings & bit:
                self.dualcam = True
                self.identifier = b"%" + name
                self.transport.write(_frame(0x000A, self.identifier))
                return
        self._close()

    def _answer(self, cmd: int, payload: bytes) -> None:
        if cmd == 0x000D:  # PATH
            if not payload.rstrip(b"\0"):
                self._close()
                return
            self.identifier = payload
            self.transport.write(_frame(0x000A, b""))
        elif cmd == 0x000B:  # METADATA
            self.transport.write(_frame(0x0008, self.identifier))
        elif cmd == 0x0001:  # START
            total = self.total = _u32.unpack_from(payload, 0)[0]
            if total == 0:
                self.transport.write(REPEAT_INIT)
                return
            if self.dualcam:  # packets: whole ones, then the last, whose header gives its length
                self.expect = (total - 1) * (FRAME + 6)
                self.transport.write(_frame(0x0002, _u32.pack(1)))
            else:  # bytes
                self.expect = total + 6 * -(-total // FRAME)
                self.file_bytes = total
                self.transport.write(_frame(0x0002, _u32.pack(0)))
        else:  # STATUS or anything unexpected: the file is over
            self.transport.write(REPEAT_INIT)

    def _stream(self, rest: bytes) -> None:
        self.data_left, self.last_header = self.expect, self.dualcam
        if rest:
            self._take(rest)

    def _file_done(self) -> None:
        fd = self.fd
        d = deferToThread(os.fdatasync, fd)
        d.addCallback(lambda _: self._acknowledge())
        d.addErrback(lambda f: (print(f"floor: fdatasync failed: {f.value}", file=sys.stderr), self._close()))

    def _acknowledge(self) -> None:
        self.factory.files_done += 1
        self.factory.file_bytes += self.file_bytes
        if self.transport is not None and self.connected:
            self.transport.write(REPEAT_INIT)

    def _close(self) -> None:
        self.transport.write(CLOSE)
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            d = deferToThread(os.fdatasync, fd)
            d.addBoth(lambda _: os.close(fd))


class FloorFactory(Factory):
    """Shares the output directory and a few counters."""

    noisy = False

    def __init__(self, root: str) -> None:
        self.root = root
        self.connections = 0
        self.files = 0
        self.files_done = 0
        #: The acknowledged files' own bytes (without the frames' headers and CRCs).
        self.file_bytes = 0

    def buildProtocol(self, addr: object) -> FloorProtocol:
        return FloorProtocol(self)


def _listen_shared(port: int, backlog: int, factory: FloorFactory, interface: str = "127.0.0.1") -> object:
    """Listen on interface:port with SO_REUSEPORT: the kernel spreads connections over the processes."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((interface, port))
    sock.listen(backlog)
    sock.setblocking(False)
    listening = reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory)
    sock.close()
    return listening


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--root", required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=1,
                        help="receiving processes on the port (SO_REUSEPORT), like the gateway's workers")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.makedirs(args.root, exist_ok=True)
    factory = FloorFactory(args.root)
    children: list = []
    if args.processes > 1 or args.child:
        port = _listen_shared(args.port, args.backlog, factory, args.interface)
        if not args.child:
            import subprocess

            for _ in range(args.processes - 1):
                child = subprocess.Popen([sys.executable, __file__, "--port", str(args.port), "--root", args.root,
                                          "--interface", args.interface, "--backlog", str(args.backlog), "--child"],
                                         stdout=subprocess.PIPE, text=True)
                child.stdout.readline()  # its "floor listening" line
                children.append(child)

            def stop_children() -> None:
                for child in children:
                    child.terminate()
                for child in children:
                    child.wait(30)

            reactor.addSystemEventTrigger("before", "shutdown", stop_children)
    else:
        port = reactor.listenTCP(args.port, factory, backlog=args.backlog, interface=args.interface)
    reactor.suggestThreadPoolSize(10)  # the gateway's threads: twistd's default pool
    print(f"floor listening on {port.getHost()} with {type(reactor).__name__}, RLIMIT_NOFILE {hard},"
          f" {args.processes} process(es)", flush=True)
    reactor.run()
    print(f"floor stopped: {factory.connections} connections, {factory.files_done} files,"
          f" {factory.file_bytes} file bytes", flush=True)


if __name__ == "__main__":
    main()
