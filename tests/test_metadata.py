"""Tests for camgateway.wire.metadata (PROTOCOL.md section 6)."""

from __future__ import annotations

import datetime
import json
import math
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from camgateway.wire.metadata import capture_time, decode_metadata

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
NO_VECTORS = "../shared/vectors not present (real captures are not shipped in the repo)"

UTC = datetime.timezone.utc
CAMERAS = ("dualcam", "dsm", "adas", "json", "unknown")

# 2024-10-30T11:35:05.250Z in milliseconds, and a whole-second trigger time.
TS_MS = 1730288105250
TRIGGER_MS = 1730288100000


def dualcam(version: int, *, file_type: int = 16, ts: int = TS_MS, trigger: int = 3,
            length: int = 7, framerate: int = 25, tz: int = -150,
            lat: float = -33.8688, lon: float = -70.6483,
            trigger_ts: int = TRIGGER_MS) -> bytes:
    """A DualCam metadata payload of the given version, built field by field."""
    out = struct.pack(">BBQBH", version, file_type, ts, trigger, length)
    if version >= 2:
        out += struct.pack(">B", framerate)
    if version >= 3:
        out += struct.pack(">hdd", tz, lat, lon)
    if version >= 4:
        out += struct.pack(">Q", trigger_ts)
    return out


def dsm(*, ts: int = 1730288105, file_type: int = 1, trigger: int = 13,
        lat: int = -33868800, lon: int = -70648300, events: int = 0b100001001,
        name: bytes = b"nhoJ") -> bytes:
    """A DSM metadata payload (26 bytes); ``name`` is given already reversed."""
    return struct.pack(">IBBiiH10s", ts, file_type, trigger, lat, lon, events, name)


def adas(*, ts: int = 1730288105, file_type: int = 0, trigger: int = 0,
         lat: int = 54687157, lon: int = -25279652, length: int = 12) -> bytes:
    """An ADAS metadata payload (15 bytes)."""
    return struct.pack(">IBBiiB", ts, file_type, trigger, lat, lon, length)


def load_capture_metadata(name: str) -> bytes:
    """The 0x000B payload from a real capture (its second frame, after init)."""
    capture = json.loads((VECTORS / name).read_text())
    stream = bytes.fromhex("".join(p["data"].replace(",", "") for p in capture["packets"]))
    frame = stream[16:]  # the init packet is 16 bytes
    assert frame[:2] == b"\x00\x0b", frame[:4].hex()
    length = struct.unpack(">H", frame[2:4])[0]
    return frame[4:4 + length]


class DualCamTests(unittest.TestCase):
    """The versioned DualCam/DashCam binary layout."""

    def test_v1(self) -> None:
        self.assertEqual(len(dualcam(1)), 13)
        decoded = decode_metadata(dualcam(1), "dualcam")
        self.assertEqual(decoded, {
            "layout": "dualcam-v1", "version": 1, "file_type": 16,
            "file_type_name": "videof", "timestamp": "2024-10-30T11:35:05.250Z",
            "trigger": 3, "trigger_name": "crash", "length_s": 7,
        })

    def test_v2(self) -> None:
        payload = dualcam(2, file_type=8, trigger=11, ts=1730288105000)
        self.assertEqual(len(payload), 14)
        self.assertEqual(decode_metadata(payload, "dualcam"), {
            "layout": "dualcam-v2", "version": 2, "file_type": 8,
            "file_type_name": "photor", "timestamp": "2024-10-30T11:35:05Z",
            "trigger": 11, "trigger_name": "DIN4", "length_s": 7, "framerate": 25,
        })

    def test_v3(self) -> None:
        payload = dualcam(3, file_type=4, trigger=0)
        self.assertEqual(len(payload), 32)
        self.assertEqual(decode_metadata(payload, "dualcam"), {
            "layout": "dualcam-v3", "version": 3, "file_type": 4,
            "file_type_name": "photof", "timestamp": "2024-10-30T11:35:05.250Z",
            "trigger": 0, "trigger_name": "server request", "length_s": 7,
            "framerate": 25, "timezone_minutes": -150,
            "latitude": -33.8688, "longitude": -70.6483,
        })

    def test_v4(self) -> None:
        payload = dualcam(4, file_type=32, trigger=9, tz=-720)
        self.assertEqual(len(payload), 40)
        self.assertEqual(decode_metadata(payload, "dualcam"), {
            "layout": "dualcam-v4", "version": 4, "file_type": 32,
            "file_type_name": "videor", "timestamp": "2024-10-30T11:35:05.250Z",
            "trigger": 9, "trigger_name": "periodic", "length_s": 7,
            "framerate": 25, "timezone_minutes": -720,
            "latitude": -33.8688, "longitude": -70.6483,
            "trigger_timestamp": "2024-10-30T11:35:00Z",
        })

    def test_unknown_file_type_and_trigger(self) -> None:
        decoded = decode_metadata(dualcam(2, file_type=5, trigger=12), "dualcam")
        self.assertEqual((decoded["file_type"], decoded["file_type_name"]), (5, None))
        self.assertEqual((decoded["trigger"], decoded["trigger_name"]), (12, None))

    def test_longer_keeps_extra(self) -> None:
        decoded = decode_metadata(dualcam(3) + b"\xde\xad\xbe\xef", "dualcam")
        self.assertEqual(decoded["layout"], "dualcam-v3")
        self.assertEqual(decoded["extra"], "deadbeef")
        self.assertEqual(decoded["latitude"], -33.8688)
        self.assertNotIn("extra", decode_metadata(dualcam(3), "dualcam"))

    def test_shorter_is_raw(self) -> None:
        payload = dualcam(4)[:-1]
        decoded = decode_metadata(payload, "dualcam")
        self.assertEqual(decoded["layout"], "raw")
        self.assertEqual(decoded["raw"], payload.hex())
        self.assertIn("40", decoded["error"])

    def test_unknown_version_is_raw(self) -> None:
        payload = b"\x05" + dualcam(4)[1:]
        decoded = decode_metadata(payload, "dualcam")
        self.assertEqual(decoded, {"layout": "raw", "raw": payload.hex(),
                                   "error": "unknown dualcam version 5"})

    def test_non_finite_coordinates(self) -> None:
        payload = dualcam(3, lat=math.nan, lon=-math.inf)
        decoded = decode_metadata(payload, "dualcam")
        self.assertIsNone(decoded["latitude"])
        self.assertIsNone(decoded["longitude"])
        json.dumps(decoded, allow_nan=False)

    def test_timestamp_out_of_range(self) -> None:
        huge = 2**64 - 1
        decoded = decode_metadata(dualcam(4, ts=huge, trigger_ts=huge), "dualcam")
        self.assertEqual(decoded["layout"], "dualcam-v4")
        self.assertIsNone(decoded["timestamp"])
        self.assertEqual(decoded["timestamp_raw"], huge)
        self.assertIsNone(decoded["trigger_timestamp"])
        self.assertEqual(decoded["trigger_timestamp_raw"], huge)
        self.assertIsNone(capture_time(decoded))

    def test_unknown_camera_guesses_exact_sizes(self) -> None:
        for version in (1, 2, 3, 4):
            self.assertEqual(decode_metadata(dualcam(version), "unknown")["layout"],
                             f"dualcam-v{version}")
        # Longer than its size is not guessed as DualCam.
        self.assertEqual(decode_metadata(dualcam(3) + b"\0", "unknown")["layout"], "raw")


class RealCaptureTests(unittest.TestCase):
    """The v3 payloads recorded from a real DualCam (protocol id 5)."""

    def setUp(self) -> None:
        if not VECTORS.is_dir():
            raise unittest.SkipTest(NO_VECTORS)

    def test_photo_front_a(self) -> None:
        payload = load_capture_metadata("dualcam-photo-front-a.json")
        self.assertEqual(payload.hex(), "030400000192dd35362800000000012c"
                                        "4038edb61bb05faf4050c84585d47922")
        decoded = decode_metadata(payload, "dualcam")
        self.assertEqual(decoded["layout"], "dualcam-v3")
        self.assertEqual(decoded["file_type_name"], "photof")
        self.assertEqual(decoded["timestamp"], "2024-10-30T11:35:05Z")
        self.assertEqual(capture_time(decoded),
                         datetime.datetime(2024, 10, 30, 11, 35, 5, tzinfo=UTC))
        self.assertEqual(decoded["trigger_name"], "server request")
        self.assertEqual((decoded["length_s"], decoded["framerate"]), (0, 0))
        self.assertEqual(decoded["timezone_minutes"], 300)  # UTC+5
        self.assertAlmostEqual(decoded["latitude"], 24.92856, places=6)
        self.assertAlmostEqual(decoded["longitude"], 67.129243, places=6)
        self.assertNotIn("extra", decoded)
        # The shape alone identifies it too.
        self.assertEqual(decode_metadata(payload, "unknown"), decoded)

    def test_video_front(self) -> None:
        payload = load_capture_metadata("dualcam-video-front-resume.json")
        decoded = decode_metadata(payload, "dualcam")
        self.assertEqual(decoded["layout"], "dualcam-v3")
        self.assertEqual(decoded["file_type_name"], "videof")
        self.assertEqual(decoded["timestamp"], "2024-10-29T12:43:42Z")
        self.assertEqual((decoded["length_s"], decoded["framerate"]), (3, 20))
        self.assertAlmostEqual(decoded["latitude"], 24.920998, places=6)
        self.assertAlmostEqual(decoded["longitude"], 67.134945, places=6)


class DsmTests(unittest.TestCase):
    """The 26-byte DSM layout."""

    def test_decode(self) -> None:
        payload = dsm()
        self.assertEqual(len(payload), 26)
        self.assertEqual(decode_metadata(payload, "dsm"), {
            "layout": "dsm", "timestamp": "2024-10-30T11:35:05Z",
            "file_type": 1, "file_type_name": "snapshot",
            "trigger": 13, "trigger_name": "DSM event",
            "latitude": -33.8688, "longitude": -70.6483,
            "events": 0b100001001,
            "event_names": ["drowsiness", "phone", "g-sensor"],
            "driver_name": "John",
        })

    def test_names_and_empty_driver(self) -> None:
        decoded = decode_metadata(
            dsm(file_type=3, trigger=14, events=0x1FF, name=b""), "dsm")
        self.assertEqual(decoded["file_type_name"], "retransmitted snapshot")
        self.assertEqual(decoded["trigger_name"], "file retransmit")
        self.assertEqual(decoded["event_names"], [
            "drowsiness", "distraction", "yawning", "phone", "smoking",
            "driver absence", "mask", "seat belt", "g-sensor"])
        self.assertIsNone(decoded["driver_name"])
        decoded = decode_metadata(dsm(trigger=0, events=0, file_type=9), "dsm")
        self.assertEqual(decoded["trigger_name"], "none")
        self.assertEqual(decoded["event_names"], [])
        self.assertIsNone(decoded["file_type_name"])

    def test_utf8_driver_name(self) -> None:
        decoded = decode_metadata(dsm(name="Zoë".encode()[::-1]), "dsm")
        self.assertEqual(decoded["driver_name"], "Zoë")

    def test_longer_and_shorter(self) -> None:
        decoded = decode_metadata(dsm() + b"\x01\x02", "dsm")
        self.assertEqual((decoded["layout"], decoded["extra"]), ("dsm", "0102"))
        self.assertEqual(decode_metadata(dsm()[:25], "dsm")["layout"], "raw")

    def test_guessed(self) -> None:
        self.assertEqual(decode_metadata(dsm(), "unknown"), decode_metadata(dsm(), "dsm"))


class AdasTests(unittest.TestCase):
    """The 15-byte ADAS layout."""

    def test_decode(self) -> None:
        payload = adas()
        self.assertEqual(len(payload), 15)
        self.assertEqual(decode_metadata(payload, "adas"), {
            "layout": "adas", "timestamp": "2024-10-30T11:35:05Z",
            "file_type": 0, "file_type_name": "video",
            "trigger": 0, "trigger_name": "server request",
            "latitude": 54.687157, "longitude": -25.279652, "length_s": 12,
        })

    def test_triggers(self) -> None:
        names = [decode_metadata(adas(trigger=t), "adas")["trigger_name"]
                 for t in range(12)]
        self.assertEqual(names, [
            "server request", "DIN1", "DIN2", "DIN3", "DIN4", "crash", "towing",
            "idling", "geofence", "unplug", "green driving", None])

    def test_longer_shorter_guessed(self) -> None:
        self.assertEqual(decode_metadata(adas() + b"\xff", "adas")["extra"], "ff")
        self.assertEqual(decode_metadata(adas()[:14], "adas")["layout"], "raw")
        self.assertEqual(decode_metadata(adas(), "unknown")["layout"], "adas")


class JsonTests(unittest.TestCase):
    """protocol_id >= 6: a JSON object."""

    DOC = {
        "version": 1,
        "file": {"file_type": "video", "file_timestamp": 1730288105,
                 "duration": 10, "framerate": 30},
        "fm_trigger": {"type": "crash"},
        "cam_trigger": {"type": "ignored"},
        "location": {"latitude": -12.5, "longitude": 130.8},
        "driver_name": "John",
    }

    def test_decode(self) -> None:
        payload = json.dumps(self.DOC).encode() + b"\x00\x00\n"
        decoded = decode_metadata(payload, "json")
        self.assertEqual(decoded, {
            "layout": "json", "fields": self.DOC,
            "timestamp": "2024-10-30T11:35:05Z", "file_type": "video",
            "length_s": 10, "framerate": 30, "trigger_name": "crash",
            "latitude": -12.5, "longitude": 130.8, "driver_name": "John",
        })
        # A leading "{" wins over the camera the gateway believes it is.
        for camera in CAMERAS:
            self.assertEqual(decode_metadata(payload, camera), decoded)

    def test_milliseconds_string_and_cam_trigger(self) -> None:
        doc = {"file": {"file_timestamp": TS_MS}, "cam_trigger": {"type": 4}}
        decoded = decode_metadata(json.dumps(doc).encode(), "json")
        self.assertEqual(decoded["timestamp"], "2024-10-30T11:35:05.250Z")
        self.assertEqual(decoded["trigger_name"], 4)
        doc = {"file": {"file_timestamp": "2024-10-30 11:35:05"}}
        decoded = decode_metadata(json.dumps(doc).encode(), "json")
        self.assertEqual(decoded["timestamp"], "2024-10-30 11:35:05")
        self.assertEqual(capture_time(decoded),
                         datetime.datetime(2024, 10, 30, 11, 35, 5, tzinfo=UTC))

    def test_minimal(self) -> None:
        self.assertEqual(decode_metadata(b"{}", "json"), {"layout": "json", "fields": {}})

    def test_out_of_range_and_non_finite(self) -> None:
        payload = b'{"file": {"file_timestamp": 1e20}, "location": {"latitude": NaN,' \
                  b' "longitude": 1e400}}'
        decoded = decode_metadata(payload, "json")
        self.assertIsNone(decoded["timestamp"])
        self.assertEqual(decoded["timestamp_raw"], 1e20)
        self.assertEqual(decoded["fields"]["location"], {"latitude": None, "longitude": None})
        self.assertNotIn("latitude", decoded)  # null in the document: not present
        json.dumps(decoded, allow_nan=False)

    def test_invalid(self) -> None:
        for payload in (b"{not json", b'{"a": 1} trailing', "{\"é\": 1}".encode("latin-1")):
            decoded = decode_metadata(payload, "json")
            self.assertEqual(decoded["layout"], "raw")
            self.assertEqual(decoded["raw"], payload.hex())
        decoded = decode_metadata(b"[1, 2]", "json")
        self.assertEqual((decoded["layout"], decoded["error"]), ("raw", "not JSON"))
        self.assertEqual(decode_metadata(dualcam(3), "json")["layout"], "raw")


class RawTests(unittest.TestCase):
    """Whatever does not parse is kept as hex, never an exception."""

    def test_unrecognised(self) -> None:
        for payload in (b"", b"\x07\x00\x01", bytes(range(20))):
            decoded = decode_metadata(payload, "unknown")
            self.assertEqual(decoded["layout"], "raw")
            self.assertEqual(decoded["raw"], payload.hex())
            self.assertIsInstance(decoded["error"], str)
        self.assertEqual(decode_metadata(b"", "dualcam")["layout"], "raw")

    def test_odd_arguments(self) -> None:
        self.assertEqual(decode_metadata(bytearray(dualcam(1)), "dualcam")["layout"],
                         "dualcam-v1")
        self.assertEqual(decode_metadata(memoryview(dsm()), "DSM")["layout"], "dsm")
        self.assertEqual(decode_metadata(adas(), "bogus")["layout"], "adas")
        self.assertEqual(decode_metadata(adas(), None)["layout"], "adas")  # type: ignore[arg-type]
        decoded = decode_metadata("text", "json")  # type: ignore[arg-type]
        self.assertEqual((decoded["layout"], decoded["raw"]), ("raw", ""))


class CaptureTimeTests(unittest.TestCase):
    """capture_time() reads the decoded timestamp back."""

    def test_from_decoded(self) -> None:
        when = capture_time(decode_metadata(dualcam(4), "dualcam"))
        self.assertEqual(when, datetime.datetime(2024, 10, 30, 11, 35, 5, 250000, tzinfo=UTC))
        self.assertEqual(when.utcoffset(), datetime.timedelta(0))

    def test_offset_converted_to_utc(self) -> None:
        when = capture_time({"timestamp": "2024-10-30T16:35:05+05:00"})
        self.assertEqual(when, datetime.datetime(2024, 10, 30, 11, 35, 5, tzinfo=UTC))
        self.assertIs(when.tzinfo, UTC)

    def test_none(self) -> None:
        epoch = decode_metadata(dualcam(1, ts=0), "dualcam")
        self.assertEqual(epoch["timestamp"], "1970-01-01T00:00:00Z")
        for decoded in (epoch, decode_metadata(dsm(ts=0), "dsm"), {}, {"timestamp": None},
                        {"timestamp": "yesterday"}, {"timestamp": 1730288105},
                        {"timestamp": ""}, decode_metadata(b"\x00", "unknown")):
            self.assertIsNone(capture_time(decoded), decoded)


class FuzzTests(unittest.TestCase):
    """decode_metadata never raises and always gives JSON."""

    def check(self, payload: bytes, camera: str) -> None:
        decoded = decode_metadata(payload, camera)
        self.assertIn(decoded["layout"], (
            "dualcam-v1", "dualcam-v2", "dualcam-v3", "dualcam-v4",
            "dsm", "adas", "json", "raw"))
        json.dumps(decoded, allow_nan=False)
        capture_time(decoded)

    @settings(max_examples=500, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=80), st.sampled_from(CAMERAS + ("bogus",)))
    def test_random_bytes(self, payload: bytes, camera: str) -> None:
        self.check(payload, camera)

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from([13, 14, 15, 26, 32, 40]).flatmap(
               lambda n: st.tuples(st.integers(1, 4), st.binary(min_size=n, max_size=n + 3))),
           st.sampled_from(CAMERAS))
    def test_layout_sized(self, sized: tuple[int, bytes], camera: str) -> None:
        version, payload = sized
        self.check(bytes([version]) + payload[1:], camera)

    @settings(max_examples=300, deadline=None)
    @given(st.recursive(
               st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
               lambda inner: st.lists(inner, max_size=3)
               | st.dictionaries(st.sampled_from(
                   ["file", "file_timestamp", "location", "latitude", "longitude",
                    "fm_trigger", "cam_trigger", "type", "duration", "driver_name"]),
                   inner, max_size=4),
               max_leaves=10),
           st.sampled_from(CAMERAS))
    def test_json_documents(self, doc: object, camera: str) -> None:
        payload = b"{" + json.dumps({"file": doc, "location": doc, "x": doc})[1:].encode()
        self.check(payload, camera)
