"""The session state machine, driven frame by frame on StringTransport + Clock."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.wire.codec import ALWAYS_SET_BITS, DUALCAM_SOURCE_BITS, PATH_FILE_BIT
from camgateway.wire.crc import crc16
from camgateway.session import machine
from camgateway.session.machine import TRANSITIONS, Session, State
from tests.support import connect, make_services, stored_files

IMEI = 863719061653375
PHOTOF, PHOTOR, VIDEOF, VIDEOR = (DUALCAM_SOURCE_BITS[s] for s in ("photof", "photor", "videof", "videor"))
PATH_BIT = PATH_FILE_BIT
REAL_BITS = ALWAYS_SET_BITS


def data_frames(content: bytes, start: int = 0, size: int = 1024, crc: int = 0) -> list[bytes]:
    """DATA frames of ``content`` from byte ``start``, CRC chained from ``crc``."""
    frames = []
    for i in range(start, len(content), size):
        chunk = content[i : i + size]
        crc = crc16(chunk, crc)
        frames.append(codec.data(chunk, crc))
    return frames


def dualcam_meta(file_type: int = 4, ts_ms: int = 1730288105000) -> bytes:
    import struct

    return struct.pack(">BBQBHBhdd", 3, file_type, ts_ms, 0, 0, 0, 300, 24.9, 67.1)


class SessionTestCase(TestCase):
    """Shared set-up: services in a temp dir on a Clock, a camera on a StringTransport."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.rng = random.Random(7)

    def gateway(self, **config: object) -> None:
        self.services = make_services(self.root, **config)
        self.clock = self.services.clock
        self.protocol, self.transport = connect(self.services)

    def feed(self, *frames: bytes) -> None:
        self.protocol.dataReceived(b"".join(frames))

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def state(self) -> State:
        return self.protocol.session.state

    def receive_dualcam(self, source: str, content: bytes, meta: bool = True) -> None:
        """From just after the init: metadata, FILE REQUEST, START, RESUME, SYNC, DATA."""
        ident = ("%" + source).encode()
        if meta:
            self.assertEqual(self.sent(), codec.metadata_request(ident))
            self.feed(codec.metadata(dualcam_meta()))
        self.assertEqual(self.sent(), codec.file_request(ident))
        packets = (len(content) + 1023) // 1024
        self.feed(codec.start(packets, 0))
        self.assertEqual(self.sent(), codec.resume(1))
        self.feed(codec.sync(1), *data_frames(content))


class DualCamFlowTests(SessionTestCase):
    """PROTOCOL.md sections 4-5, DualCam by settings bits."""

    def test_photo_received_then_repeat_init_then_close(self) -> None:
        self.gateway()
        content = b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9"
        self.feed(codec.init_packet(5, IMEI, REAL_BITS | PHOTOF))
        self.receive_dualcam("photof", content)
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(self.state, State.AWAIT_INIT)
        self.feed(codec.init_packet(5, IMEI, REAL_BITS))
        self.assertEqual(self.sent(), codec.close())
        self.assertTrue(self.transport.disconnecting)
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)
        self.assertEqual(stored.suffix, ".jpg")
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["imei"], str(IMEI))
        self.assertEqual(sidecar["start"], {"total": 5, "crc": 0, "unit": "packets"})
        self.assertEqual(sidecar["metadata"]["layout"], "dualcam-v3")
        self.assertEqual(sidecar["computed_crc"], crc16(content))

    def test_sources_in_configured_order(self) -> None:
        self.gateway(metadata=False, dualcam_sources=("photof", "videor"))
        self.feed(codec.init_packet(5, IMEI, PHOTOF | VIDEOR | PHOTOR))
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))
        self.feed(codec.start(0, 0))  # nothing there after all: next source
        self.assertEqual(self.sent(), codec.file_request(b"%videor"))
        self.feed(codec.start(0, 0))
        self.assertEqual(self.sent(), codec.repeat_init())
        # photor is set but not configured; photof/videor were empty: nothing left
        self.feed(codec.init_packet(5, IMEI, PHOTOF | VIDEOR | PHOTOR))
        self.assertEqual(self.sent(), codec.close())

    def test_default_order_is_rear_video_first(self) -> None:
        self.gateway(metadata=False)
        self.feed(codec.init_packet(5, IMEI, PHOTOF | PHOTOR | VIDEOF | VIDEOR))
        self.assertEqual(self.sent(), codec.file_request(b"%videor"))

    def test_first_init_without_files_gets_close(self) -> None:
        self.gateway()
        self.feed(codec.init_packet(5, IMEI, REAL_BITS))
        self.assertEqual(self.sent(), codec.close())
        self.assertEqual(self.state, State.CLOSED)

    def test_two_files_in_one_session(self) -> None:
        self.gateway(metadata=False)
        a, b = os.urandom(3000), os.urandom(1024 * 4)
        self.feed(codec.init_packet(5, IMEI, PHOTOF | VIDEOF))
        self.receive_dualcam("videof", b, meta=False)
        self.assertEqual(self.sent(), codec.repeat_init())
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.receive_dualcam("photof", a, meta=False)
        self.assertEqual(self.sent(), codec.repeat_init())
        self.feed(codec.init_packet(5, IMEI, 0))
        self.assertEqual(self.sent(), codec.close())
        self.assertEqual(sorted(p.read_bytes() for p in stored_files(self.root)), sorted([a, b]))

    def test_sync_zero_is_packet_one(self) -> None:
        self.gateway(metadata=False)
        content = os.urandom(2048)
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.sent()
        self.feed(codec.start(2, 0))
        self.sent()
        self.feed(codec.sync(0), *data_frames(content))
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(stored_files(self.root)[0].read_bytes(), content)

    def test_short_packet_before_the_last_is_an_error(self) -> None:
        self.gateway(metadata=False)
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.feed(codec.start(3, 0), codec.sync(1))
        self.sent()
        self.feed(codec.data(b"x" * 100, crc16(b"x" * 100)))
        self.assertEqual(self.state, State.CLOSED)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_short_packet_inside_a_run_is_an_error(self) -> None:
        """The same rule on the decoder's fast path (frames after the first since SYNC)."""
        self.gateway(metadata=False)
        content = os.urandom(4096)
        self.feed(codec.init_packet(5, IMEI, PHOTOF), codec.start(4, 0), codec.sync(1))
        frames = data_frames(content)
        short = codec.data(b"y" * 10, crc16(b"y" * 10, crc16(content[:2048])))
        self.feed(*frames[:2], short)
        self.assertEqual(self.state, State.CLOSED)
        self.assertEqual(self.services.stats.protocol_errors, 1)
        self.protocol.connectionLost(None)
        [partial] = self.services.store.partials.values()
        self.assertEqual(partial.held, 2048)  # the two good packets are kept

    def test_status_in_the_same_read_as_start_gets_no_resume(self) -> None:
        """A DualCam gives a file up with START and STATUS in one write: no RESUME, nothing kept."""
        self.gateway(metadata=False)
        photo = b"\xff\xd8" + os.urandom(3000)
        self.feed(codec.init_packet(5, IMEI, VIDEOR | PHOTOF))
        self.assertEqual(self.sent(), codec.file_request(b"%videor"))
        self.feed(codec.start(9, 0), codec.status(6))  # the open completes within this read
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))
        self.assertEqual(self.services.store.partials, {})
        self.assertEqual(self.services.spool.names(), set())
        self.feed(codec.start(3, 0))
        self.assertEqual(self.sent(), codec.resume(1))
        self.feed(codec.sync(1), *data_frames(photo))
        self.assertEqual(self.sent(), codec.repeat_init())
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), photo)

    def test_status_instead_of_start(self) -> None:
        self.gateway(metadata=False)
        self.feed(codec.init_packet(5, IMEI, PHOTOF | PHOTOR))
        self.assertEqual(self.sent(), codec.file_request(b"%photor"))
        self.feed(codec.status(0x11))
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))
        self.feed(codec.status(0x11))
        self.assertEqual(self.sent(), codec.repeat_init())
        self.feed(codec.init_packet(5, IMEI, PHOTOF | PHOTOR))
        self.assertEqual(self.sent(), codec.close())

    def test_mode_dsm_ignores_dualcam_bits(self) -> None:
        self.gateway(mode="dsm")
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.assertEqual(self.sent(), codec.close())


class MetadataTests(SessionTestCase):
    """Metadata is asked for before each file, with a timeout (section 5.1)."""

    def test_timeout_goes_on_and_stops_asking(self) -> None:
        self.gateway(metadata_timeout=10.0)
        content = os.urandom(1500)
        self.feed(codec.init_packet(5, IMEI, PHOTOF | PHOTOR))
        self.assertEqual(self.sent(), codec.metadata_request(b"%photor"))
        self.clock.advance(9.9)
        self.assertEqual(self.sent(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.sent(), codec.file_request(b"%photor"))
        self.feed(codec.start(2, 0))
        self.assertEqual(self.sent(), codec.resume(1))
        self.feed(codec.sync(1), *data_frames(content))
        self.assertEqual(self.sent(), codec.repeat_init())
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))  # no second wait

    def test_unparseable_metadata_is_kept_raw(self) -> None:
        self.gateway()
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.sent()
        self.feed(codec.metadata(b"\x09garbage"))
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))
        self.feed(codec.start(1, 0), codec.sync(1), *data_frames(b"abc"))
        [stored] = stored_files(self.root)
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["metadata"]["layout"], "raw")
        self.assertEqual(sidecar["metadata"]["raw"], b"\x09garbage".hex())

    def test_metadata_off(self) -> None:
        self.gateway(metadata=False)
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.assertEqual(self.sent(), codec.file_request(b"%photof"))


class PathFlowTests(SessionTestCase):
    """The 0x000C/0x000D flow of DSM, ADAS and DashCam (byte offsets)."""

    def path_file(self, path: bytes, content: bytes, protocol_id: int = 5, enhanced: bool = False) -> None:
        self.feed(codec.init_packet(protocol_id, IMEI, REAL_BITS | PATH_BIT))
        self.assertEqual(self.sent(), codec.path_request())
        self.feed(codec.path(path))
        self.assertEqual(self.sent(), codec.metadata_request())
        import struct

        meta = struct.pack(">IBBiiH10s", 1730288105, 0, 13, -24_900_000, 67_100_000, 0b11, b"nhoJ")
        self.feed(codec.metadata(meta))
        self.assertEqual(self.sent(), codec.file_request(path))
        self.feed(codec.start(len(content), crc16(content)))
        self.assertEqual(self.sent(), codec.resume(0))
        frames = []
        crc = 0
        for i in range(0, len(content), 1024):
            chunk = content[i : i + 1024]
            crc = crc16(chunk, crc)
            frames.append(codec.enhanced_data(i, chunk, crc) if enhanced else codec.data(chunk, crc))
        for piece in _pieces(codec.sync(0) + b"".join(frames), self.rng):
            self.feed(piece)
        self.assertEqual(self.sent(), codec.repeat_init())

    def test_dsm_video(self) -> None:
        self.gateway()
        content = os.urandom(10_000)
        self.path_file(b"/sdcard/dsm/video_1730288105_2.mp4\0", content)
        self.feed(codec.init_packet(5, IMEI, REAL_BITS | PATH_BIT))
        self.assertEqual(self.sent(), codec.path_request())
        self.feed(codec.path(b"\0"))
        self.assertEqual(self.sent(), codec.close())
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)
        self.assertEqual(stored.name, "20241030T113505Z_dsm_video_1730288105_2.mp4")
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["camera"], "dsm")
        self.assertEqual(sidecar["device_path"], "/sdcard/dsm/video_1730288105_2.mp4")
        self.assertTrue(sidecar["crc_match"])
        self.assertEqual(sidecar["metadata"]["driver_name"], "John")
        self.assertEqual(sidecar["metadata"]["latitude"], -24.9)

    def test_enhanced_data_protocol_6(self) -> None:
        self.gateway(metadata=False)
        content = os.urandom(5000)
        self.feed(codec.init_packet(6, IMEI, REAL_BITS | PHOTOF))  # id >= 6: path flow
        self.assertEqual(self.sent(), codec.path_request())
        path = b"/sdcard/dualcam_front/picture_1.jpg\0"
        self.feed(codec.path(path))
        self.assertEqual(self.sent(), codec.file_request(path))
        self.feed(codec.start(len(content), crc16(content)))
        self.assertEqual(self.sent(), codec.resume(0))
        crc = 0
        frames = [codec.sync(0)]
        for i in range(0, len(content), 1024):
            crc = crc16(content[i : i + 1024], crc)
            frames.append(codec.enhanced_data(i, content[i : i + 1024], crc))
        frames[3] = codec.enhanced_data(9999, b"x", 0)  # wrong offset: RESUME at what is held
        self.feed(*frames[:4])
        self.assertEqual(self.sent(), codec.resume(2048))
        self.assertEqual(self.state, State.DISCARDING)
        crc = crc16(content[:2048])
        self.feed(codec.sync(2048))
        rest = [codec.enhanced_data(i, content[i : i + 1024], crc := crc16(content[i : i + 1024], 0 if i == 2048 else crc))
                for i in range(2048, len(content), 1024)]
        self.feed(*rest)
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(stored_files(self.root)[0].read_bytes(), content)

    def test_adas_mode_skips_dsm_files(self) -> None:
        self.gateway(mode="adas")
        self.feed(codec.init_packet(5, IMEI, PATH_BIT))
        self.sent()
        self.feed(codec.path(b"/sdcard/dsm/video.mp4\0"))
        self.assertEqual(self.sent(), codec.close())

    def test_start_total_zero_then_same_path_closes(self) -> None:
        self.gateway(metadata=False)
        path = b"/sdcard/mdas9/picture_5.jpg\0"
        self.feed(codec.init_packet(5, IMEI, PATH_BIT))
        self.sent()
        self.feed(codec.path(path))
        self.assertEqual(self.sent(), codec.file_request(path))
        self.feed(codec.start(0, 0))
        self.assertEqual(self.sent(), codec.repeat_init())
        self.feed(codec.init_packet(5, IMEI, PATH_BIT))
        self.assertEqual(self.sent(), codec.path_request())
        self.feed(codec.path(path))
        self.assertEqual(self.sent(), codec.close())

    def test_traversal_path_stays_inside_root(self) -> None:
        self.gateway(metadata=False)
        content = os.urandom(100)
        path = b"../../../../etc/passwd\0"
        self.feed(codec.init_packet(5, IMEI, PATH_BIT))
        self.sent()
        self.feed(codec.path(path))
        self.feed(codec.start(len(content), crc16(content)), codec.sync(0), *data_frames(content))
        [stored] = stored_files(self.root)
        self.assertTrue(stored.resolve().is_relative_to((self.root / "files").resolve()))
        self.assertEqual(stored.read_bytes(), content)


def _pieces(data: bytes, rng: random.Random) -> list[bytes]:
    from tests.support import segments

    return list(segments(data, rng, 1, 7))


class CrcAndSyncTests(SessionTestCase):
    """Bad CRC, RESUME, discarding, SYNC rules (sections 5.4-5.6)."""

    def start_video(self, content: bytes) -> None:
        self.gateway(metadata=False, resume_retries=12)
        self.feed(codec.init_packet(5, IMEI, VIDEOF))
        self.sent()
        self.feed(codec.start((len(content) + 1023) // 1024, 0))
        self.assertEqual(self.sent(), codec.resume(1))

    def test_bad_crc_resume_discard_until_sync(self) -> None:
        content = os.urandom(10 * 1024)
        self.start_video(content)
        frames = data_frames(content)
        bad = bytearray(frames[4])
        bad[-1] ^= 0xFF
        # the device keeps streaming after the bad frame until it sees the RESUME
        self.feed(codec.sync(1), *frames[:4], bytes(bad), *frames[5:7], b"\x00\x03\x00\x04junk")
        self.assertEqual(self.sent(), codec.resume(5))
        self.assertEqual(self.state, State.DISCARDING)
        self.feed(codec.sync(5), *data_frames(content, 4 * 1024))
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(stored_files(self.root)[0].read_bytes(), content)

    def test_resume_repeated_every_2s_then_4s_then_give_up(self) -> None:
        content = os.urandom(4 * 1024)
        self.start_video(content)
        frames = data_frames(content)
        self.feed(codec.sync(1), frames[0], codec.data(b"z" * 1024, 1))
        self.assertEqual(self.sent(), codec.resume(2))
        times = []
        for _ in range(40):
            self.clock.advance(1)
            if self.sent() == codec.resume(2):
                times.append(self.clock.seconds())
        self.assertEqual(times[:9], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0])
        self.assertEqual(times[9:], [22.0, 26.0])  # 4 s after 10 tries
        self.assertEqual(self.state, State.CLOSED)  # resume_retries=12 exhausted
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        partial = list(self.services.store.partials.values())[0]
        self.assertEqual(partial.held, 1024)  # what was good is kept

    def test_rewinding_and_repeated_sync(self) -> None:
        content = os.urandom(8 * 1024)
        self.start_video(content)
        frames = data_frames(content)
        self.feed(codec.sync(1), *frames[:5])  # holds 5 packets
        self.feed(codec.sync(3), *data_frames(content, 2048)[:1])  # rewind to packet 3
        self.feed(codec.sync(3), *data_frames(content, 2048))  # the same SYNC again
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(stored_files(self.root)[0].read_bytes(), content)

    def test_first_frame_after_sync_may_chain_from_before(self) -> None:
        content = os.urandom(4 * 1024)
        self.start_video(content)
        frames = data_frames(content)
        self.feed(codec.sync(1), *frames[:2], codec.sync(3), *frames[2:])  # chain not reset
        self.assertEqual(self.sent(), codec.repeat_init())
        self.assertEqual(stored_files(self.root)[0].read_bytes(), content)

    def test_sync_beyond_held_asks_again(self) -> None:
        content = os.urandom(4 * 1024)
        self.start_video(content)
        self.feed(codec.sync(3))
        self.assertEqual(self.sent(), codec.resume(1))
        self.feed(codec.sync(1), *data_frames(content))
        self.assertEqual(self.sent(), codec.repeat_init())

    def test_data_beyond_size_is_an_error(self) -> None:
        self.gateway(metadata=False)
        self.feed(codec.init_packet(5, IMEI, PATH_BIT))
        self.feed(codec.path(b"/x/dsm/a.jpg\0"), codec.start(10, 0), codec.sync(0))
        self.feed(codec.data(b"y" * 11, crc16(b"y" * 11)))
        self.assertEqual(self.state, State.CLOSED)
        self.assertEqual(self.services.stats.protocol_errors, 1)


class HardeningTests(SessionTestCase):
    """Unknown devices, bad frames, stuck peers: logged, closed, nothing lost."""

    def test_allow_list(self) -> None:
        self.gateway(allow=frozenset({"1"}))
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.assertEqual(self.sent(), codec.close())
        self.assertEqual(stored_files(self.root), [])

    def test_unexpected_frame_closes(self) -> None:
        self.gateway()
        self.feed(codec.start(5, 0))
        self.assertEqual(self.state, State.CLOSED)
        self.assertTrue(self.transport.disconnecting)

    def test_garbage_closes(self) -> None:
        self.gateway()
        self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.services.stats.protocol_errors, 1)

    def test_step_timeout(self) -> None:
        self.gateway(metadata=False, step_timeout=30.0)
        self.feed(codec.init_packet(5, IMEI, PHOTOF))
        self.clock.advance(31)
        self.assertEqual(self.state, State.CLOSED)

    def test_connection_lost_mid_file_keeps_partial_and_resumes(self) -> None:
        self.gateway(metadata=False)
        content = os.urandom(6 * 1024 + 10)
        self.feed(codec.init_packet(5, IMEI, VIDEOF), codec.start(7, 0), codec.sync(1), *data_frames(content)[:3])
        self.protocol.connectionLost(None)
        [partial] = self.services.store.partials.values()
        self.assertEqual(partial.held, 3 * 1024)
        protocol, transport = connect(self.services)
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF))
        self.assertEqual(transport.value(), codec.file_request(b"%videof"))
        transport.clear()
        protocol.dataReceived(codec.start(7, 0))
        self.assertEqual(transport.value(), codec.resume(4))
        transport.clear()
        protocol.dataReceived(codec.sync(4) + b"".join(data_frames(content, 3 * 1024)))
        self.assertEqual(transport.value(), codec.repeat_init())
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["resumed_from"], 3 * 1024)
        self.assertEqual(sidecar["computed_crc"], crc16(content))
        self.assertEqual(self.services.store.partials, {})

    def test_changed_file_is_not_spliced(self) -> None:
        self.gateway(metadata=False)
        old, new = os.urandom(4096), os.urandom(3000)
        self.feed(codec.init_packet(5, IMEI, VIDEOF), codec.start(4, 0), codec.sync(1), *data_frames(old)[:2])
        self.protocol.connectionLost(None)
        protocol, transport = connect(self.services)
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF) + codec.start(3, 0))
        self.assertEqual(transport.value()[-8:], codec.resume(1))
        protocol.dataReceived(codec.sync(1) + b"".join(data_frames(new)))
        self.assertEqual(stored_files(self.root)[0].read_bytes(), new)

    def test_second_connection_replaces_first(self) -> None:
        self.gateway(metadata=False)
        content = os.urandom(4096)
        self.feed(codec.init_packet(5, IMEI, VIDEOF), codec.start(4, 0), codec.sync(1), *data_frames(content)[:2])
        protocol, transport = connect(self.services, "10.0.0.2")
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF))
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.protocol.connectionLost(None)  # what abortConnection leads to
        transport.clear()
        protocol.dataReceived(codec.start(4, 0))
        self.assertEqual(transport.value(), codec.resume(3))
        self.assertIs(self.services.sessions[str(IMEI)], protocol.session)

    def test_max_file_bytes(self) -> None:
        self.gateway(metadata=False, max_file_bytes=10_000)
        self.feed(codec.init_packet(5, IMEI, VIDEOF | PHOTOF), codec.start(11, 0))
        self.assertEqual(self.sent()[-11:], codec.file_request(b"%photof"))


class TableTests(SessionTestCase):
    """The transition table is the single place transitions are declared."""

    def test_every_handler_exists(self) -> None:
        for (state, inp), (handler, targets) in TRANSITIONS.items():
            self.assertTrue(hasattr(Session, handler), handler)
            self.assertTrue(targets)
        self.assertNotIn((State.CLOSED, "data"), TRANSITIONS)

    def receiving(self) -> Session:
        """A session receiving a 4-packet video, its first packet taken."""
        self.gateway(metadata=False)
        self.content = os.urandom(4096)
        self.frames = data_frames(self.content)
        self.feed(codec.init_packet(5, IMEI, VIDEOF), codec.start(4, 0), codec.sync(1), self.frames[0])
        self.assertEqual(self.state, State.RECEIVING)
        return self.protocol.session

    def test_data_runs_the_handler_the_table_names(self) -> None:
        seen: list[bytes] = []
        rows = dict(TRANSITIONS)
        rows[(State.RECEIVING, "data")] = ("_data_seen", rows[(State.RECEIVING, "data")][1])
        self.patch(machine, "TRANSITIONS", rows)
        Session._data_seen = lambda session, payload, crc: seen.append(bytes(payload))  # type: ignore[attr-defined]
        self.addCleanup(delattr, Session, "_data_seen")
        session = self.receiving()
        self.assertEqual(seen, [self.content[:1024]])  # the first frame after SYNC: one frame, the handler
        self.assertIsNone(session.runner())  # the table's handler for every frame, not the transfer's runs
        self.feed(*self.frames[1:3])
        self.assertEqual(seen, [self.content[i : i + 1024] for i in range(0, 3072, 1024)])
        self.assertEqual(session.transfer.held, 0)

    def test_the_data_handler_is_bound_once_per_state(self) -> None:
        session = self.receiving()
        run = session.runner()
        self.assertEqual(run, session.transfer.take_run)
        self.assertIs(session.runner(), run)  # bound when RECEIVING began, not made per call
        self.feed(self.frames[1])
        self.assertIs(session.runner(), run)
        self.feed(*self.frames[2:])  # the file is complete: STORING has no DATA row
        self.assertEqual(self.state, State.AWAIT_INIT)
        self.assertIsNone(session.runner())
        self.feed(self.frames[0])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.services.failures[-1]["why"], "unexpected data while awaiting init")
