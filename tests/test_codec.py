"""Tests for camgateway.wire.codec: the wire format (PROTOCOL.md sections 1-3 and 5.6)."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from twisted.trial import unittest

from camgateway.wire import codec
from camgateway.wire.codec import Cmd, FrameDecoder, ProtocolError, ServerFrameDecoder
from camgateway.wire.crc import crc16
from tests.support import NO_VECTORS, VECTORS, capture_stream, segments

IMEI = 863719061653375
PATH = b"/mnt/sd/dsm/picture/20241030_113505.jpg\x00"


class Recorder:
    """A FrameReceiver that records every frame as plain tuples.

    Views are copied with ``bytes()``: they are only valid during the call.
    ``on_frame`` lets a test act (discard, stop, raise) from inside a callback.
    """

    def __init__(self, on_frame: Optional[Callable[["Recorder", tuple], None]] = None) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self.batches = 0
        self.on_frame = on_frame

    def _add(self, frame: tuple[Any, ...]) -> None:
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame(self, frame)

    def init(self, protocol_id: int, imei: int, settings: int) -> None:
        self._add(("init", protocol_id, imei, settings))

    def start(self, total: int, crc: int) -> None:
        self._add(("start", total, crc))

    def sync(self, position: int) -> None:
        self._add(("sync", position))

    def data(self, payload: memoryview, crc: int) -> None:
        self._add(("data", bytes(payload), crc))

    def enhanced(self, offset: int, payload: memoryview, crc: int) -> None:
        self._add(("enhanced", offset, bytes(payload), crc))

    def status(self, code: int) -> None:
        self._add(("status", code))

    def metadata(self, payload: bytes) -> None:
        self._add(("metadata", bytes(payload)))

    def path(self, payload: bytes) -> None:
        self._add(("path", bytes(payload)))

    def batch_end(self) -> None:
        self.batches += 1


def decode(chunks: Any) -> Recorder:
    """Feed ``chunks`` to a fresh decoder; the recorder holds what came out."""
    recorder = Recorder()
    decoder = FrameDecoder(recorder)
    for chunk in chunks:
        decoder.feed(chunk)
    return recorder


def mixed_pieces() -> list[tuple[bytes, tuple[Any, ...]]]:
    """Every kind of device frame, encoded, with the frame it decodes to."""
    rng = random.Random(1)
    p1, p2, p3 = rng.randbytes(1024), rng.randbytes(17), rng.randbytes(300)
    c1 = crc16(p1)
    c2 = crc16(p2, c1)
    c3 = crc16(p3)
    meta = bytes(range(32))
    pieces = [
        (codec.init_packet(5, IMEI, 0x44000400), ("init", 5, IMEI, 0x44000400)),
        (codec.metadata(meta), ("metadata", meta)),
        (codec.metadata(b""), ("metadata", b"")),
        (codec.start(29, 0xABCD), ("start", 29, 0xABCD)),
        (codec.sync(1), ("sync", 1)),
        (codec.data(p1, c1), ("data", p1, c1)),
        (codec.data(p2, c2), ("data", p2, c2)),
        (codec.data(b"\x00", 0), ("data", b"\x00", 0)),
        (codec.status(17), ("status", 17)),
        (codec.path(PATH), ("path", PATH)),
        (codec.path(b"\x00"), ("path", b"\x00")),
        (codec.enhanced_data(4096, p3, c3), ("enhanced", 4096, p3, c3)),
        (codec.init_packet(6, 1, 0x02000000), ("init", 6, 1, 0x02000000)),
        (codec.sync(0), ("sync", 0)),
    ]
    return pieces


def mixed_stream() -> tuple[bytes, list[tuple[Any, ...]]]:
    """One stream holding every device frame, and the frames it decodes to."""
    pieces = mixed_pieces()
    return b"".join(p[0] for p in pieces), [p[1] for p in pieces]


class ServerEncoderTests(unittest.TestCase):
    """Every server -> device frame is byte-exact as PROTOCOL.md section 3 says."""

    def test_close(self) -> None:
        self.assertEqual(codec.close(), bytes.fromhex("00000000"))

    def test_resume(self) -> None:
        self.assertEqual(codec.resume(0), bytes.fromhex("0002 0004 00000000"))
        self.assertEqual(codec.resume(1), bytes.fromhex("0002 0004 00000001"))
        self.assertEqual(codec.resume(0x01020304), bytes.fromhex("0002 0004 01020304"))
        self.assertEqual(codec.resume(0xFFFFFFFF), bytes.fromhex("0002 0004 ffffffff"))

    def test_complete(self) -> None:
        self.assertEqual(codec.complete(), bytes.fromhex("0005 0004 00000000"))

    def test_file_request_dualcam(self) -> None:
        self.assertEqual(codec.file_request(b"%photof"), bytes.fromhex("0008 0007") + b"%photof")
        self.assertEqual(codec.file_request(b"%videor"), b"\x00\x08\x00\x07%videor")

    def test_file_request_path_keeps_trailing_nul(self) -> None:
        frame = codec.file_request(PATH)
        self.assertEqual(frame[:2], b"\x00\x08")
        self.assertEqual(int.from_bytes(frame[2:4], "big"), len(PATH))
        self.assertEqual(frame[4:], PATH)
        self.assertTrue(frame.endswith(b".jpg\x00"))
        self.assertEqual(codec.file_request(b"/a\x00"), bytes.fromhex("0008 0003 2f6100"))

    def test_repeat_init_is_bare(self) -> None:
        self.assertEqual(codec.repeat_init(), b"\x00\x09")

    def test_metadata_request(self) -> None:
        self.assertEqual(codec.metadata_request(b"%photof"), bytes.fromhex("000A 0007") + b"%photof")
        self.assertEqual(codec.metadata_request(), bytes.fromhex("000A 0000"))
        self.assertEqual(codec.metadata_request(b""), bytes.fromhex("000A 0000"))

    def test_path_request(self) -> None:
        self.assertEqual(codec.path_request(), bytes.fromhex("000C 0002 0000"))


class DeviceEncoderTests(unittest.TestCase):
    """Device -> server encoders (used by the emulator) have the documented layout."""

    def test_init_packet(self) -> None:
        packet = codec.init_packet(5, IMEI, 0x44000400)
        self.assertEqual(packet, bytes.fromhex("0000 0005 0003118c43db077f 44000400"))
        self.assertEqual(len(packet), codec.INIT_SIZE)
        self.assertEqual(bytes.fromhex("0003118c43db077f"), IMEI.to_bytes(8, "big"))

    def test_init_imei(self) -> None:
        self.assertEqual(codec.init_imei(codec.init_packet(5, IMEI, 0x44000400) + b"\x00\x0b"), IMEI)
        self.assertIsNone(codec.init_imei(codec.start(29) + b"\x00" * 6))  # a frame, not an init

    def test_start_sync_status(self) -> None:
        self.assertEqual(codec.start(29), bytes.fromhex("0001 0006 0000001d 0000"))
        self.assertEqual(codec.start(597868, 0x1234), bytes.fromhex("0001 0006 00091f6c 1234"))
        self.assertEqual(codec.sync(1), bytes.fromhex("0003 0004 00000001"))
        self.assertEqual(codec.status(17), bytes.fromhex("0005 0004 00000011"))

    def test_data_metadata_path_enhanced(self) -> None:
        self.assertEqual(codec.data(b"\xff\xd8", 0x0102), bytes.fromhex("0004 0004 ffd8 0102"))
        self.assertEqual(codec.metadata(b"\x03\x04"), bytes.fromhex("000B 0002 0304"))
        self.assertEqual(codec.path(b"a\x00"), bytes.fromhex("000D 0002 6100"))
        self.assertEqual(codec.enhanced_data(1024, b"\xaa", 0xBEEF),
                         bytes.fromhex("000E 0007 00000400 aa beef"))


class DecoderRoundTripTests(unittest.TestCase):
    """Device encoders round-trip through FrameDecoder, whatever the segmentation."""

    def test_init_packet_decodes(self) -> None:
        recorder = decode([bytes.fromhex("000000050003118c43db077f44000400")])
        self.assertEqual(recorder.frames, [("init", 5, IMEI, 0x44000400)])

    def test_each_frame_alone(self) -> None:
        for encoded, frame in mixed_pieces():
            recorder = decode([encoded])
            self.assertEqual(recorder.frames, [frame])
            self.assertEqual(recorder.batches, 1)

    def test_every_two_piece_split(self) -> None:
        stream, expected = mixed_stream()
        self.assertEqual(decode([stream]).frames, expected)
        for cut in range(len(stream) + 1):
            recorder = decode([stream[:cut], stream[cut:]])
            self.assertEqual(recorder.frames, expected, f"split at {cut}")
            self.assertEqual(recorder.batches, 2)

    def test_random_small_pieces(self) -> None:
        stream, expected = mixed_stream()
        for seed in range(5):
            pieces = list(segments(stream, random.Random(seed), 1, 7))
            self.assertEqual(b"".join(pieces), stream)
            recorder = decode(pieces)
            self.assertEqual(recorder.frames, expected, f"seed {seed}")

    def test_byte_by_byte(self) -> None:
        stream, expected = mixed_stream()
        decoder_recorder = Recorder()
        decoder = FrameDecoder(decoder_recorder)
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
        self.assertEqual(decoder_recorder.frames, expected)
        self.assertEqual(decoder.buffered, 0)

    def test_partial_frame_is_held(self) -> None:
        frame = codec.data(b"x" * 100, 1)
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        decoder.feed(frame[:50])
        self.assertEqual(recorder.frames, [])
        self.assertEqual(decoder.buffered, 50)
        decoder.feed(frame[50:] + codec.sync(3)[:2])
        self.assertEqual(recorder.frames, [("data", b"x" * 100, 1)])
        self.assertEqual(decoder.buffered, 2)

    def test_payload_views_stay_aligned(self) -> None:
        """Payloads handed out as views match the frames across reads and deletions."""
        rng = random.Random(3)
        payloads = [rng.randbytes(n) for n in (1, 2, 100, 1024)] * 5
        stream = b"".join(codec.data(p, crc16(p)) for p in payloads)
        recorder = decode(segments(stream, random.Random(4), 1, 300))
        self.assertEqual([f[1] for f in recorder.frames], payloads)
        self.assertEqual([f[2] for f in recorder.frames], [crc16(p) for p in payloads])

    def test_batch_end_once_per_feed(self) -> None:
        stream, _ = mixed_stream()
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        pieces = list(segments(stream, random.Random(9), 1, 40))
        for n, piece in enumerate(pieces, 1):
            decoder.feed(piece)
            self.assertEqual(recorder.batches, n)
        decoder.feed(b"")
        self.assertEqual(recorder.batches, len(pieces) + 1)

    def test_batch_end_after_the_frames_of_its_read(self) -> None:
        events: list[str] = []

        class Ordered(Recorder):
            def sync(self, position: int) -> None:
                events.append(f"sync {position}")

            def batch_end(self) -> None:
                events.append("batch_end")

        decoder = FrameDecoder(Ordered())
        decoder.feed(codec.sync(1) + codec.sync(2) + codec.sync(3)[:3])
        decoder.feed(codec.sync(3)[3:])
        self.assertEqual(events, ["sync 1", "sync 2", "batch_end", "sync 3", "batch_end"])


class LimitTests(unittest.TestCase):
    """Headers are checked before their payload is waited for (PROTOCOL.md section 1)."""

    def assertRejectsHeader(self, header: bytes) -> ProtocolError:
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        err = self.assertRaises(ProtocolError, decoder.feed, header)
        self.assertEqual(err.offending, header)
        self.assertIn(header.hex(" "), str(err))
        self.assertTrue(decoder.stopped)
        self.assertEqual(recorder.frames, [])
        return err

    def test_data_too_long(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("0004 0403"))
        self.assertRejectsHeader(bytes.fromhex("0004 ffff"))

    def test_data_too_short(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("0004 0000"))
        self.assertRejectsHeader(bytes.fromhex("0004 0001"))

    def test_path_too_long(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("000D 0201"))

    def test_empty_path(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("000D 0000"))

    def test_metadata_too_long(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("000B 0401"))

    def test_enhanced_too_long(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("000E 0407"))

    def test_fixed_lengths(self) -> None:
        self.assertRejectsHeader(bytes.fromhex("0001 0005"))
        self.assertRejectsHeader(bytes.fromhex("0001 0007"))
        self.assertRejectsHeader(bytes.fromhex("0003 0005"))
        self.assertRejectsHeader(bytes.fromhex("0005 0000"))

    def test_unknown_commands(self) -> None:
        for header in (bytes.fromhex("0007 0000"), bytes.fromhex("1234 0002"),
                       bytes.fromhex("0002 0004"), bytes.fromhex("0009 0000")):
            err = self.assertRejectsHeader(header)
            self.assertIn("unknown command", str(err))

    def test_offending_holds_following_bytes(self) -> None:
        decoder = FrameDecoder(Recorder())
        err = self.assertRaises(ProtocolError, decoder.feed, bytes.fromhex("1234 0002 abcd"))
        self.assertEqual(err.offending, bytes.fromhex("1234 0002 abcd"))
        self.assertIn("0x1234", str(err))

    def test_maxima_are_accepted(self) -> None:
        rng = random.Random(5)
        big = rng.randbytes(1024)
        meta = rng.randbytes(1024)
        path = b"p" * 511 + b"\x00"
        recorder = decode([codec.data(big, 9) + codec.metadata(meta) + codec.path(path)
                           + codec.enhanced_data(0, big, 8)])
        self.assertEqual(recorder.frames, [("data", big, 9), ("metadata", meta), ("path", path),
                                           ("enhanced", 0, big, 8)])

    def test_frames_before_the_error_are_delivered(self) -> None:
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        good = codec.sync(1) + codec.data(b"abc", 5)
        self.assertRaises(ProtocolError, decoder.feed, good + bytes.fromhex("0007 0000"))
        self.assertEqual(recorder.frames, [("sync", 1), ("data", b"abc", 5)])

    def test_stopped_after_error(self) -> None:
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        self.assertRaises(ProtocolError, decoder.feed, bytes.fromhex("0004 0403"))
        self.assertTrue(decoder.stopped)
        decoder.feed(codec.sync(1) + codec.init_packet(5, IMEI, 0))
        decoder.feed(bytes.fromhex("0007 0000"))  # no second error either
        self.assertEqual(recorder.frames, [])
        self.assertEqual(decoder.buffered, 0)

    def test_error_raised_by_receiver_stops_decoder(self) -> None:
        def fail_on_data(rec: Recorder, frame: tuple) -> None:
            if frame[0] == "data":
                raise ProtocolError("bad data")

        recorder = Recorder(fail_on_data)
        decoder = FrameDecoder(recorder)
        err = self.assertRaises(ProtocolError, decoder.feed,
                                codec.sync(1) + codec.data(b"abc", 5) + codec.sync(2))
        self.assertEqual(err.message, "bad data")
        self.assertTrue(decoder.stopped)
        decoder.feed(codec.sync(3))
        self.assertEqual(recorder.frames, [("sync", 1), ("data", b"abc", 5)])

    def test_stop_from_receiver(self) -> None:
        decoder: FrameDecoder

        def stop_on_sync(rec: Recorder, frame: tuple) -> None:
            if frame == ("sync", 2):
                decoder.stop()

        recorder = Recorder(stop_on_sync)
        decoder = FrameDecoder(recorder)
        decoder.feed(codec.sync(1) + codec.sync(2) + codec.sync(3))
        decoder.feed(codec.sync(4))
        self.assertEqual(recorder.frames, [("sync", 1), ("sync", 2)])
        self.assertTrue(decoder.stopped)

    def test_protocol_error_offending_is_bounded(self) -> None:
        err = ProtocolError("x", b"a" * 1000)
        self.assertEqual(err.offending, b"a" * 48)
        self.assertEqual(str(ProtocolError("plain")), "plain")


def sync_frame_then_data(position: int, payload: bytes, crc: int) -> bytes:
    return codec.sync(position) + codec.data(payload, crc)


class DiscardTests(unittest.TestCase):
    """After a bad CRC everything up to a real SYNC is dropped (PROTOCOL.md section 5.6)."""

    def discard_stream(self) -> tuple[bytes, int, list[tuple[Any, ...]]]:
        """Junk (DATA frames, garbage, a fake SYNC mark), a real SYNC, then normal frames."""
        rng = random.Random(77)
        junk = (
            codec.data(rng.randbytes(1024), 1)
            + codec.data(b"\x00\x03\x00", 2)  # a partial SYNC mark inside a frame
            + b"\xde\xad\xbe\xef\x00\x03"
            # a fake SYNC mark followed by an implausible header (PATH, and a bad length)
            + codec.SYNC_MARK + b"\x00\x00\x00\x07" + b"\x00\x0d\x00\x05"
            + codec.SYNC_MARK + b"\x00\x00\x00\x08" + b"\x00\x04\x05\x00"
            + codec.SYNC_MARK + b"\x00\x00\x00\x09" + b"\x12\x34\x00\x04"
            + codec.data(rng.randbytes(500), 3)
        )
        self.assertNotIn(codec.SYNC_MARK + b"\x00\x00\x00\x05", junk)
        payload = rng.randbytes(1024)
        tail = (
            sync_frame_then_data(5, payload, crc16(payload))
            + codec.data(b"next", crc16(b"next", crc16(payload)))
            + codec.status(17)
            + codec.init_packet(5, IMEI, 0x40000400)
        )
        expected = [("sync", 5), ("data", payload, crc16(payload)),
                    ("data", b"next", crc16(b"next", crc16(payload))),
                    ("status", 17), ("init", 5, IMEI, 0x40000400)]
        return junk + tail, len(junk), expected

    def run_discard(self, pieces: Any) -> tuple[Recorder, FrameDecoder]:
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        decoder.discard_until_sync()
        self.assertTrue(decoder.discarding)
        for piece in pieces:
            decoder.feed(piece)
        return recorder, decoder

    def test_whole(self) -> None:
        stream, junk, expected = self.discard_stream()
        recorder, decoder = self.run_discard([stream])
        self.assertEqual(recorder.frames, expected)
        self.assertFalse(decoder.discarding)
        self.assertEqual(decoder.discarded, junk)
        self.assertEqual(decoder.buffered, 0)

    def test_every_two_piece_split(self) -> None:
        stream, junk, expected = self.discard_stream()
        for cut in range(len(stream) + 1):
            recorder, decoder = self.run_discard([stream[:cut], stream[cut:]])
            self.assertEqual(recorder.frames, expected, f"split at {cut}")
            self.assertEqual(decoder.discarded, junk, f"split at {cut}")

    def test_random_small_pieces(self) -> None:
        stream, junk, expected = self.discard_stream()
        for seed in range(5):
            recorder, decoder = self.run_discard(segments(stream, random.Random(seed), 1, 7))
            self.assertEqual(recorder.frames, expected, f"seed {seed}")
            self.assertEqual(decoder.discarded, junk)

    def test_sync_mark_split_across_reads(self) -> None:
        garbage = b"\x01\x02\x03\x04\x05"
        tail = sync_frame_then_data(9, b"abc", 7)
        for cut in range(1, 4):
            recorder, decoder = self.run_discard([garbage + tail[:cut], tail[cut:]])
            self.assertEqual(recorder.frames, [("sync", 9), ("data", b"abc", 7)], cut)
            self.assertEqual(decoder.discarded, len(garbage))

    def test_nothing_delivered_while_no_sync(self) -> None:
        rng = random.Random(8)
        junk = b"".join(codec.data(rng.randbytes(1000), 0) for _ in range(5)) + codec.status(3)
        self.assertNotIn(codec.SYNC_MARK, junk)
        recorder, decoder = self.run_discard([junk])
        self.assertEqual(recorder.frames, [])
        self.assertTrue(decoder.discarding)
        self.assertLessEqual(decoder.buffered, 3)
        self.assertEqual(decoder.discarded + decoder.buffered, len(junk))
        self.assertEqual(recorder.batches, 1)

    def test_garbage_is_never_a_protocol_error(self) -> None:
        rng = random.Random(10)
        junk = rng.randbytes(5000)
        while codec.SYNC_MARK in junk:
            junk = junk.replace(codec.SYNC_MARK, b"")
        recorder, decoder = self.run_discard(segments(junk, rng, 1, 100))
        self.assertFalse(decoder.stopped)
        self.assertEqual(recorder.frames, [])

    def test_sync_followed_by_data_header_only(self) -> None:
        """A SYNC is delivered once the next header shows it is plausible."""
        recorder, decoder = self.run_discard([b"zz" + codec.sync(4)])
        self.assertEqual(recorder.frames, [])
        decoder.feed(codec.data(b"q", 1)[:4])
        self.assertEqual(recorder.frames, [("sync", 4)])
        decoder.feed(codec.data(b"q", 1)[4:])
        self.assertEqual(recorder.frames, [("sync", 4), ("data", b"q", 1)])

    def test_discard_from_inside_a_callback(self) -> None:
        """The session discards on a bad CRC; the rest of the same read is dropped."""
        def discard_on_bad(rec: Recorder, frame: tuple) -> None:
            if frame[0] == "data" and frame[2] == 0xBAD:
                decoder.discard_until_sync()

        recorder = Recorder(discard_on_bad)
        decoder = FrameDecoder(recorder)
        after_bad = codec.data(b"lost1", 1) + codec.data(b"lost2", 2)
        stream = (codec.sync(1) + codec.data(b"good", 1) + codec.data(b"bad", 0xBAD)
                  + after_bad + sync_frame_then_data(3, b"again", 4))
        decoder.feed(stream)
        self.assertEqual(recorder.frames, [("sync", 1), ("data", b"good", 1), ("data", b"bad", 0xBAD),
                                           ("sync", 3), ("data", b"again", 4)])
        self.assertEqual(decoder.discarded, len(after_bad))

    def test_discard_twice(self) -> None:
        recorder, decoder = self.run_discard([b"xx" + sync_frame_then_data(2, b"a", 1)])
        decoder.discard_until_sync()
        decoder.feed(b"yyy" + codec.data(b"b", 2) + sync_frame_then_data(3, b"c", 3))
        self.assertEqual(recorder.frames, [("sync", 2), ("data", b"a", 1), ("sync", 3), ("data", b"c", 3)])
        self.assertEqual(decoder.discarded, 2 + 3 + len(codec.data(b"b", 2)))

    def test_sync_beyond_limit_is_data(self) -> None:
        """A SYNC mark past the position asked for is data that looks like a SYNC."""
        recorder = Recorder()
        decoder = FrameDecoder(recorder)
        decoder.discard_until_sync(5)
        fake = sync_frame_then_data(6, b"f", 1)
        decoder.feed(b"ab" + fake + sync_frame_then_data(5, b"r", 2))
        self.assertEqual(recorder.frames, [("sync", 5), ("data", b"r", 2)])
        self.assertEqual(decoder.discarded, 2 + len(fake))
        decoder.discard_until_sync(5)
        decoder.feed(sync_frame_then_data(3, b"s", 3))
        self.assertEqual(recorder.frames[2:], [("sync", 3), ("data", b"s", 3)])

    def test_default_limit_accepts_any_position(self) -> None:
        recorder, _ = self.run_discard([b"x" + sync_frame_then_data(0xFFFFFFFF, b"a", 1)])
        self.assertEqual(recorder.frames, [("sync", 0xFFFFFFFF), ("data", b"a", 1)])

    def test_sync_followed_by_enhanced_or_status(self) -> None:
        for follow, frame in ((codec.enhanced_data(0, b"e", 1), ("enhanced", 0, b"e", 1)),
                              (codec.status(4), ("status", 4)),
                              (codec.sync(8), ("sync", 8))):
            recorder, _ = self.run_discard([b"junk" + codec.sync(7) + follow])
            self.assertEqual(recorder.frames, [("sync", 7), frame])


class ServerFrameDecoderTests(unittest.TestCase):
    """The emulator's decoder of server frames, with the bare REPEAT INIT."""

    def server_stream(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        pieces = [
            (codec.metadata_request(b"%photof"), (Cmd.METADATA_REQUEST, b"%photof")),
            (codec.file_request(b"%photof"), (Cmd.FILE_REQUEST, b"%photof")),
            (codec.resume(1), (Cmd.RESUME, b"\x00\x00\x00\x01")),
            (codec.repeat_init(), (Cmd.REPEAT_INIT, b"")),
            (codec.path_request(), (Cmd.PATH_REQUEST, b"\x00\x00")),
            (codec.repeat_init(), (Cmd.REPEAT_INIT, b"")),
            (codec.metadata_request(), (Cmd.METADATA_REQUEST, b"")),
            (codec.file_request(PATH), (Cmd.FILE_REQUEST, PATH)),
            (codec.repeat_init(), (Cmd.REPEAT_INIT, b"")),
            (codec.repeat_init(), (Cmd.REPEAT_INIT, b"")),
            (codec.complete(), (Cmd.STATUS, b"\x00" * 4)),
            (codec.close(), (Cmd.INIT, b"")),
        ]
        return b"".join(p[0] for p in pieces), [p[1] for p in pieces]

    def test_whole(self) -> None:
        stream, expected = self.server_stream()
        self.assertEqual(ServerFrameDecoder().feed(stream), expected)

    def test_every_two_piece_split(self) -> None:
        stream, expected = self.server_stream()
        for cut in range(len(stream) + 1):
            decoder = ServerFrameDecoder()
            frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
            self.assertEqual(frames, expected, f"split at {cut}")

    def test_random_small_pieces(self) -> None:
        stream, expected = self.server_stream()
        for seed in range(5):
            decoder = ServerFrameDecoder()
            frames: list[tuple[int, bytes]] = []
            for piece in segments(stream, random.Random(seed), 1, 7):
                frames += decoder.feed(piece)
            self.assertEqual(frames, expected)

    def test_repeat_init_split(self) -> None:
        decoder = ServerFrameDecoder()
        self.assertEqual(decoder.feed(b"\x00"), [])
        self.assertEqual(decoder.feed(b"\x09"), [(Cmd.REPEAT_INIT, b"")])

    def test_too_long(self) -> None:
        self.assertRaises(ProtocolError, ServerFrameDecoder().feed, bytes.fromhex("0008 0201"))


class CaptureTests(unittest.TestCase):
    """A real DualCam session (../shared/vectors) decodes as the README describes."""

    def setUp(self) -> None:
        if not (VECTORS / "dualcam-photo-front-a.json").exists():
            raise unittest.SkipTest(NO_VECTORS)
        self.stream = capture_stream("dualcam-photo-front-a.json")

    def check(self, frames: list[tuple[Any, ...]]) -> None:
        self.assertEqual(frames[0], ("init", 5, IMEI, 0x44000400))
        self.assertEqual(frames[1][0], "metadata")
        self.assertEqual(len(frames[1][1]), 32)
        self.assertEqual(frames[2][:2], ("start", 29))
        self.assertEqual(frames[3], ("sync", 1))
        data = frames[4:33]
        self.assertEqual([f[0] for f in data], ["data"] * 29)
        crc = 0
        for n, (_, payload, frame_crc) in enumerate(data):
            crc = crc16(payload, crc)
            self.assertEqual(crc, frame_crc, f"DATA frame {n}")
        self.assertEqual(frames[33], ("init", 5, IMEI, 0x40000400))
        self.assertEqual(len(frames), 34)
        photo = b"".join(f[1] for f in data)
        self.assertEqual(len(photo), 29395)
        self.assertTrue(photo.startswith(b"\xff\xd8"))
        self.assertTrue(photo.endswith(b"\xff\xd9"))
        self.assertTrue(all(len(f[1]) == 1024 for f in data[:-1]))

    def test_whole(self) -> None:
        recorder = decode([self.stream])
        self.check(recorder.frames)

    def test_small_pieces(self) -> None:
        whole = decode([self.stream]).frames
        for seed in range(3):
            recorder = decode(segments(self.stream, random.Random(seed), 1, 7))
            self.assertEqual(recorder.frames, whole)
        self.check(whole)
