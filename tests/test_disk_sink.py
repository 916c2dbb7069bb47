"""Tests for camgateway.delivery.sinks.disk: names, sidecars, no overwrites, hostile paths."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from camgateway.delivery.sinks import IFileSink, ReceivedFile
from camgateway.delivery.sinks import disk as disk_module
from camgateway.runtime.context import FileHeads
from camgateway.delivery.sinks.disk import DiskSink, indented_json
from tests.support import run_now

UTC = datetime.timezone.utc
IMEI = "863719061653375"
RECEIVED_AT = datetime.datetime(2024, 10, 30, 11, 35, 44, 165000, tzinfo=UTC)
CAPTURED = datetime.datetime(2024, 10, 29, 23, 59, 58, 250000, tzinfo=UTC)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4 + b"\xff\xd9"
PTMF = b"PTMF\x00\x01" + bytes(range(200))
MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(100)
UNKNOWN = b"\x01\x02\x03\x04 not a known format"

NAME = re.compile(r"^\d{8}T\d{6}Z_[a-z_]+(_[A-Za-z0-9._-]{1,64})?(-\d+)?\.[a-z0-9]+$")


class SinkTestCase(unittest.TestCase):
    """A temporary spool and root, and ReceivedFile records built by hand."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.spool = self.base / "spool"
        self.spool.mkdir(parents=True)
        self.root = self.base / "files"
        self.sink = DiskSink(self.root, run_now)
        self.count = 0

    def spool_file(self, content: bytes) -> Path:
        self.count += 1
        path = self.spool / f"partial-{self.count}.part"
        path.write_bytes(content)
        return path

    def received(self, content: bytes = JPEG, **fields: Any) -> ReceivedFile:
        values: dict[str, Any] = dict(
            path=self.spool_file(content), imei=IMEI, peer="10.0.0.1:40000", protocol_id=5,
            camera="dualcam", flow="dualcam", source="photof", identifier=b"%photof",
            media="photo", metadata={"layout": "dualcam", "version": 3, "trigger": "crash"},
            size=len(content), sha256=hashlib.sha256(content).hexdigest(), start_total=29,
            start_crc=0, computed_crc=0x1234, received_at=RECEIVED_AT, capture_time=CAPTURED,
            resumed_from=0, crc_errors=1)
        values.update(fields)
        return ReceivedFile(**values)

    def path_file(self, identifier: bytes, content: bytes = JPEG, **fields: Any) -> ReceivedFile:
        values: dict[str, Any] = dict(flow="path", camera="dsm", source="dsm", identifier=identifier,
                                      start_total=len(content), start_crc=0x1234)
        values.update(fields)
        return self.received(content, **values)

    def store(self, received: ReceivedFile) -> Path:
        stored = self.sink.store(received)
        self.assertIsInstance(stored, str)
        return Path(stored)

    def all_entries(self) -> list[Path]:
        return sorted(self.root.rglob("*")) if self.root.exists() else []

    def assertNoTemporaries(self) -> None:
        for entry in self.all_entries():
            if entry.is_dir():
                continue
            self.assertFalse(entry.name.startswith("."), entry)
            self.assertNotIn(".tmp", entry.name, entry)
            if entry.suffix == ".json":
                self.assertTrue(entry.with_suffix("").exists(), f"sidecar without file: {entry}")
            else:
                self.assertTrue(entry.with_name(entry.name + ".json").exists(), f"file without sidecar: {entry}")

    def assertStored(self, stored: Path, received: ReceivedFile, content: bytes) -> None:
        self.assertEqual(stored.read_bytes(), content)
        self.assertTrue(received.path.exists(), "the spool file must stay in place")
        self.assertEqual(received.path.read_bytes(), content)
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar, json.loads(json.dumps(received.sidecar())))


class OrderTests(SinkTestCase):
    """The sidecar takes its final name before the media file appears."""

    def test_sidecar_first(self) -> None:
        linked: list[str] = []
        real_link = os.link

        def link(src: Any, dst: Any) -> None:
            real_link(src, dst)
            linked.append(Path(dst).name)

        self.patch(os, "link", link)
        stored = self.store(self.received())
        self.assertEqual(linked, [stored.name + ".json", stored.name])
        self.assertNoTemporaries()


class LayoutTests(SinkTestCase):
    """<root>/<imei>/<YYYY-MM-DD>/<YYYYmmddTHHMMSSZ>_<source>[_<basename>].<ext>"""

    def test_dualcam_with_capture_time(self) -> None:
        received = self.received()
        stored = self.store(received)
        self.assertEqual(stored, self.root / IMEI / "2024-10-29" / "20241029T235958Z_photof.jpg")
        self.assertStored(stored, received, JPEG)
        self.assertNoTemporaries()

    def test_received_at_without_capture_time(self) -> None:
        received = self.received(capture_time=None)
        stored = self.store(received)
        self.assertEqual(stored, self.root / IMEI / "2024-10-30" / "20241030T113544Z_photof.jpg")
        self.assertStored(stored, received, JPEG)

    def test_path_flow_basename(self) -> None:
        received = self.path_file(b"/mnt/sd/dsm/picture/20241030_113505.jpg\x00")
        stored = self.store(received)
        self.assertEqual(stored, self.root / IMEI / "2024-10-29" / "20241029T235958Z_dsm_20241030_113505.jpg")
        self.assertStored(stored, received, JPEG)

    def test_time_in_utc(self) -> None:
        """A capture time in another zone is named by its UTC time, as the Z says."""
        plus_two = datetime.timezone(datetime.timedelta(hours=2))
        received = self.received(capture_time=datetime.datetime(2024, 10, 30, 1, 30, 0, tzinfo=plus_two))
        stored = self.store(received)
        self.assertEqual(stored, self.root / IMEI / "2024-10-29" / "20241029T233000Z_photof.jpg")
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["capture_time"], "2024-10-29T23:30:00.000Z")

    def test_non_numeric_imei(self) -> None:
        stored = self.store(self.received(imei="../../x"))
        self.assertEqual(stored.parent.parent, self.root / "unknown")

    def test_deliver_fires_with_path(self) -> None:
        received = self.received()
        d = self.sink.deliver(received)
        result = self.successResultOf(d)
        self.assertEqual(result, str(self.root / IMEI / "2024-10-29" / "20241029T235958Z_photof.jpg"))
        self.assertStored(Path(result), received, JPEG)

    def test_deliver_runs_store_through_run_in_thread(self) -> None:
        calls: list[Any] = []

        def run(f: Any, *args: Any) -> Any:
            calls.append((f, args))
            return run_now(f, *args)

        sink = DiskSink(self.root, run)
        received = self.received()
        self.successResultOf(sink.deliver(received))
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][1], (received,))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IFileSink, self.sink))
        self.assertEqual(self.sink.name, f"disk:{self.root}")


class SidecarTests(SinkTestCase):
    """The JSON sidecar beside each file holds every field of ReceivedFile.sidecar()."""

    def test_dualcam_sidecar(self) -> None:
        received = self.received(id="e1")
        stored = self.store(received)
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(set(sidecar), set(received.sidecar()))
        self.assertEqual(sidecar, {
            "id": "e1", "imei": IMEI, "protocol_id": 5, "camera": "dualcam", "flow": "dualcam",
            "source": "photof", "device_path": None, "media": "photo", "size": len(JPEG),
            "sha256": hashlib.sha256(JPEG).hexdigest(),
            "start": {"total": 29, "crc": 0, "unit": "packets"}, "computed_crc": 0x1234,
            "crc_match": None, "capture_time": "2024-10-29T23:59:58.250Z",
            "received_at": "2024-10-30T11:35:44.165Z", "resumed_from": 0, "crc_errors": 1, "derived": None,
            "peer": "10.0.0.1:40000",
            "metadata": {"layout": "dualcam", "version": 3, "trigger": "crash"},
        })

    def test_path_sidecar(self) -> None:
        received = self.path_file(b"/mnt/sd/dsm/a.jpg\x00", capture_time=None, resumed_from=2048,
                                  computed_crc=0x1234)
        stored = self.store(received)
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["device_path"], "/mnt/sd/dsm/a.jpg")
        self.assertEqual(sidecar["start"], {"total": len(JPEG), "crc": 0x1234, "unit": "bytes"})
        self.assertIs(sidecar["crc_match"], True)
        self.assertIsNone(sidecar["capture_time"])
        self.assertEqual(sidecar["resumed_from"], 2048)
        self.assertEqual(sidecar, json.loads(json.dumps(received.sidecar())))

    def test_sidecar_text_is_what_json_dumps_with_indent_writes(self) -> None:
        received = self.path_file(b"/mnt/sd/dsm/\xc3\xa9t\xc3\xa9.jpg\x00", capture_time=None)
        stored = self.store(received)
        text = stored.with_name(stored.name + ".json").read_text()
        self.assertEqual(text, json.dumps(received.sidecar(), indent=2) + "\n")
        for value in ({}, [], {"a": {"b": [1, 2.5, {"c": None}], "e": {}}, "f": [], "g": "\u00fc\"\n"},
                      {"x": [[], [[]], {}, ("t", 1)]}, {"deep": {1: "non-string key", "k": [True]}},
                      {"nan": float("nan"), "big": 1e300, "\u2603": "\U0001F600"}, [None, "s"], "s", 5):
            self.assertEqual(indented_json(value), json.dumps(value, indent=2))

    def test_sidecar_sits_beside_its_own_file(self) -> None:
        stored = [self.store(self.received(content)) for content in (JPEG, JPEG[:-1], JPEG[:-2])]
        for path in stored:
            sidecar = json.loads(path.with_name(path.name + ".json").read_text())
            self.assertEqual(sidecar["sha256"], hashlib.sha256(path.read_bytes()).hexdigest())
            self.assertEqual(sidecar["size"], path.stat().st_size)


class FolderTests(SinkTestCase):
    """A camera's folder of the day is made once, and made again if it was removed meanwhile."""

    def test_made_once(self) -> None:
        made: list[Path] = []
        real = os.makedirs
        self.patch(os, "makedirs", lambda path, *a, **kw: (made.append(Path(path)), real(path, *a, **kw))[1])
        first = self.store(self.received())
        self.assertEqual(made[0], first.parent)
        before = len(made)
        self.store(self.received(JPEG + b"2"))
        self.assertEqual(len(made), before)  # the second store asked nothing of the folder

    def test_removed_folder_is_made_again(self) -> None:
        import shutil

        first = self.store(self.received())
        shutil.rmtree(first.parent)  # e.g. an operator's clean-up of today's folder
        again = self.store(self.received(JPEG + b"2"))
        self.assertEqual(again.parent, first.parent)
        self.assertEqual(again.read_bytes(), JPEG + b"2")
        self.assertTrue(again.with_name(again.name + ".json").exists())


class CollisionTests(SinkTestCase):
    """Two files with the same name never overwrite each other."""

    def test_numbered(self) -> None:
        contents = [JPEG, JPEG + b"2", JPEG + b"33", JPEG + b"444"]
        records = [self.received(c) for c in contents]
        stored = [self.store(r) for r in records]
        folder = self.root / IMEI / "2024-10-29"
        self.assertEqual(stored, [folder / "20241029T235958Z_photof.jpg",
                                  folder / "20241029T235958Z_photof-2.jpg",
                                  folder / "20241029T235958Z_photof-3.jpg",
                                  folder / "20241029T235958Z_photof-4.jpg"])
        for path, record, content in zip(stored, records, contents):
            self.assertStored(path, record, content)
        self.assertNoTemporaries()

    def test_existing_files_are_left_alone(self) -> None:
        folder = self.root / IMEI / "2024-10-29"
        folder.mkdir(parents=True)
        media = folder / "20241029T235958Z_photof.jpg"
        media.write_bytes(b"someone else's file")
        orphan = folder / "20241029T235958Z_photof-2.jpg.json"
        orphan.write_text('{"not": "ours"}')
        received = self.received()
        stored = self.store(received)
        self.assertEqual(stored, folder / "20241029T235958Z_photof-3.jpg")
        self.assertEqual(media.read_bytes(), b"someone else's file")
        self.assertEqual(orphan.read_text(), '{"not": "ours"}')
        self.assertFalse((folder / "20241029T235958Z_photof-2.jpg").exists())
        self.assertStored(stored, received, JPEG)

    def test_same_spool_file_twice(self) -> None:
        """A record without an id (an old one) delivered again is recognised by its content: one copy."""
        received = self.received()
        first = self.store(received)
        second = self.store(received)
        self.assertEqual(first, second)
        self.assertTrue(received.path.exists())


class RepeatTests(SinkTestCase):
    """The same file (same id and sha256) delivered again is stored once: a crash cannot make copies."""

    def stored(self) -> list[str]:
        """Every name under the root (media and sidecars)."""
        return sorted(p.name for p in self.all_entries() if p.is_file())

    def assertFiles(self, count: int) -> None:
        """``count`` files under the root (media and sidecars), and no temporary one."""
        self.assertEqual(len(self.stored()), count)
        self.assertNoTemporaries()

    def test_same_file_twice_is_stored_once(self) -> None:
        received = self.received(id="e1")
        d1, d2 = self.sink.deliver(received), self.sink.deliver(received)
        first, second = self.successResultOf(d1), self.successResultOf(d2)
        self.assertEqual(first, second)
        self.assertEqual(self.stored(), ["20241029T235958Z_photof.jpg", "20241029T235958Z_photof.jpg.json"])
        self.assertStored(Path(first), received, JPEG)
        self.assertNoTemporaries()

    def test_found_under_a_later_name(self) -> None:
        """Another file took the first name: the repeat finds this one's own at ``-2``."""
        other, received = self.received(JPEG + b"other", id="e0"), self.received(id="e1")
        self.store(other)
        first = self.store(received)
        self.assertEqual(first.name, "20241029T235958Z_photof-2.jpg")
        self.assertEqual(self.store(received), first)
        self.assertFiles(4)

    def test_sidecar_alone_is_completed(self) -> None:
        """A kill between the sidecar's link and the media's leaves the sidecar alone: the repeat links the media."""
        received = self.received(id="e1")
        stored = self.store(received)
        stored.unlink()
        self.assertEqual(self.store(received), stored)
        self.assertStored(stored, received, JPEG)
        self.assertEqual(stored.stat().st_ino, received.path.stat().st_ino)
        self.assertFiles(2)

    def test_sidecar_alone_is_completed_across_filesystems(self) -> None:
        real_link = os.link

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(src).parent == self.spool:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_link(src, dst, *args, **kwargs)

        self.patch(os, "link", link)
        received = self.received(id="e1")
        stored = self.store(received)
        self.assertEqual(self.store(received), stored)  # a copy held the name: recognised by its bytes
        stored.unlink()
        self.assertEqual(self.store(received), stored)
        self.assertStored(stored, received, JPEG)
        self.assertFiles(2)

    def test_other_content_gets_the_next_name_the_same_content_does_not(self) -> None:
        """The same bytes under the same name are the same file, whatever the id (a camera that sent it twice)."""
        received = self.received(id="e1")
        first = self.store(received)
        self.assertEqual(self.store(self.received(id="e2")), first)
        self.assertEqual(self.store(self.received(id="")), first)
        self.assertEqual(self.store(self.received(JPEG + b"x", id="e1")).name, "20241029T235958Z_photof-2.jpg")
        self.assertEqual(self.store(self.received(JPEG + b"y", id="e3")).name, "20241029T235958Z_photof-3.jpg")
        self.assertFiles(6)

    def test_own_sidecar_beside_another_file_takes_the_next_name(self) -> None:
        """The sidecar is this file's but the media name holds something else: that is left, the sidecar goes."""
        received = self.received(id="e1")
        stored = self.store(received)
        stored.unlink()
        stored.write_bytes(b"someone else's file")
        again = self.store(received)
        self.assertEqual(again.name, "20241029T235958Z_photof-2.jpg")
        self.assertStored(again, received, JPEG)
        self.assertEqual(stored.read_bytes(), b"someone else's file")
        self.assertFalse(stored.with_name(stored.name + ".json").exists())

    def test_foreign_or_broken_sidecars_are_not_ours(self) -> None:
        folder = self.root / IMEI / "2024-10-29"
        folder.mkdir(parents=True)
        (folder / "20241029T235958Z_photof.jpg.json").write_text('{"id": "e1", "sha256": "trunc')
        (folder / "20241029T235958Z_photof-2.jpg.json").write_text('["e1"]')
        received = self.received(id="e1")
        self.assertEqual(self.store(received).name, "20241029T235958Z_photof-3.jpg")

    def test_the_same_delivery_linking_first_elsewhere_is_not_undone(self) -> None:
        """Two runs of one delivery at once: the one whose media link finds the other's keeps the pair."""
        received = self.received(id="e1")
        target = self.root / IMEI / "2024-10-29" / "20241029T235958Z_photof.jpg"
        real_link = os.link

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst) == target and not target.exists():
                real_link(src, dst)  # the other run, between this one's two links
            real_link(src, dst, *args, **kwargs)

        self.patch(os, "link", link)
        self.assertEqual(self.store(received), target)
        self.assertStored(target, received, JPEG)
        self.assertEqual(len(self.stored()), 2)

    def test_a_first_delivery_pays_nothing(self) -> None:
        """No collision: no sidecar read, no stat; only the two links (and the sidecar's write)."""
        def never(*args: Any) -> Any:
            raise AssertionError("looked for a repeat with no name taken")

        self.patch(disk_module, "_describes", never)
        self.patch(disk_module, "_holds", never)
        calls: list[str] = []
        for name in ("stat", "lstat", "open", "link", "unlink", "fstat"):
            real = getattr(os, name)
            self.patch(os, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
        self.store(self.received(id="e0"))  # (the folder is made)
        del calls[:]
        self.store(self.received(JPEG + b"2", source="photor", id="e1"))
        # The head, the temporary sidecar, the sidecar's and the media's links,
        # the temporary's unlink, the folder's fsync: as before files had ids.
        self.assertEqual(calls, ["open", "open", "link", "link", "unlink", "open"])
        self.assertNoTemporaries()


class ExtensionTests(SinkTestCase):
    """The extension comes from the content first, then from a known path extension."""

    def ext(self, received: ReceivedFile) -> str:
        return self.store(received).suffix

    def test_from_content(self) -> None:
        self.assertEqual(self.ext(self.received(JPEG)), ".jpg")
        self.assertEqual(self.ext(self.received(PTMF, source="videof", media="video")), ".ptmf")
        self.assertEqual(self.ext(self.received(MP4, source="videor", media="video")), ".mp4")

    def test_the_first_bytes_the_writes_saw_spare_a_read(self) -> None:
        heads = FileHeads()
        self.sink = DiskSink(self.root, run_now, heads=heads)
        # The writes say this file begins as an MP4; on disk it is a PTMF. The sink names it from
        # what the writes saw: it did not read the file.
        known, unknown = self.received(PTMF, source="videor", media="video"), self.received(PTMF)
        heads.put(str(known.path), MP4[:16])
        self.assertEqual((self.ext(known), self.ext(unknown)), (".mp4", ".ptmf"))  # the file nobody saw is read
        self.assertEqual(len(heads), 0)  # taken: a second delivery of the same file reads it
        self.assertEqual(self.ext(known), ".ptmf")

    def test_heads_kept_are_bounded(self) -> None:
        heads = FileHeads(maxlen=2)
        for n in range(3):
            heads.put(f"/spool/{n}", b"%d" % n)
        self.assertEqual((len(heads), heads.take("/spool/0"), heads.take("/spool/2")), (2, None, b"2"))

    def test_content_beats_path(self) -> None:
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/x.mp4\x00", JPEG)), ".jpg")

    def test_from_path(self) -> None:
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/video/x.H265\x00", UNKNOWN, media="video")), ".h265")
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/x.avi\x00", UNKNOWN)), ".avi")
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/x.jpeg", UNKNOWN)), ".jpeg")

    def test_unknown_extension_is_not_used(self) -> None:
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/x.exe\x00", UNKNOWN)), ".bin")
        self.assertEqual(self.ext(self.path_file(b"/sd/dsm/x.sh/\x00", UNKNOWN, media="video")), ".h265")
        self.assertEqual(self.ext(self.path_file(b"/sd/x.jpg\x00.exe", UNKNOWN)), ".jpg")

    def test_fallbacks(self) -> None:
        self.assertEqual(self.ext(self.received(UNKNOWN)), ".bin")
        self.assertEqual(self.ext(self.received(UNKNOWN, source="videof", media="video")), ".h265")
        self.assertEqual(self.ext(self.received(b"", size=0)), ".bin")


HOSTILE = [
    b"../../etc/passwd\x00",
    b"../../../../../../../../tmp/owned.jpg\x00",
    b"/etc/shadow\x00",
    b"/absolute/path/to/file.jpg\x00",
    b"C:\\Windows\\..\\..\\system32\\evil.jpg\x00",
    b"..\\..\\..\\boot.ini",
    b"good.jpg\x00/../../bad.jpg",
    b"mid\x00dle/../../x.jpg\x00",
    b"a" * 600 + b".jpg\x00",
    b"/" + b"b/" * 300 + b"c" * 600,
    b"\xd1\x84\xd0\xbe\xd1\x82\xd0\xbe/\xd1\x81\xd0\xbd\xd0\xb8\xd0\xbc\xd0\xbe\xd0\xba 1.jpg\x00",
    "/sd/\u202eexe.jpg\x00".encode(),
    b"\xff\xfe\xfd/../x\n y.mp4\x00",
    b".",
    b"..",
    b"...\x00",
    b"....jpg\x00",
    b"/\x00",
    b"\x00",
    b"dir/",
    b"-rf --no-preserve-root.jpg",
    b"con:aux|nul*?<>.jpg\x00",
    b"%2e%2e%2f%2e%2e%2fetc%2fpasswd\x00",
    b"  \t\r\n.jpg",
]


class HostilePathTests(SinkTestCase):
    """A device path is data: it never chooses where a file goes (PROTOCOL.md section 8)."""

    def test_hostile_paths(self) -> None:
        outside_before = sorted(p for p in self.base.rglob("*") if self.root not in p.parents and p != self.root)
        folder = (self.root / IMEI / "2024-10-29").resolve()
        names = set()
        for identifier in HOSTILE:
            received = self.path_file(identifier, UNKNOWN)
            stored = self.store(received)
            self.assertEqual(stored.resolve().parent, folder, identifier)
            self.assertEqual(stored.parent, self.root / IMEI / "2024-10-29", identifier)
            self.assertRegex(stored.name, NAME)
            self.assertLessEqual(len(stored.name.encode()), 120, identifier)
            self.assertTrue(stored.name.startswith("20241029T235958Z_dsm"), stored.name)
            self.assertNotIn(stored.name, names)
            names.add(stored.name)
            self.assertStored(stored, received, UNKNOWN)
        outside_after = sorted(p for p in self.base.rglob("*") if self.root not in p.parents and p != self.root)
        # Only the spool files written by the test appeared outside the root.
        self.assertEqual([p for p in outside_after if p not in outside_before and p.parent != self.spool], [])
        self.assertEqual([p.name for p in (self.root / IMEI).iterdir()], ["2024-10-29"])
        self.assertEqual(list(self.root.iterdir()), [self.root / IMEI])
        self.assertNoTemporaries()

    def test_basenames(self) -> None:
        def name_of(identifier: bytes) -> str:
            return self.store(self.path_file(identifier, UNKNOWN)).name

        self.assertEqual(name_of(b"../../etc/passwd\x00"), "20241029T235958Z_dsm_passwd.bin")
        self.assertEqual(name_of(b"C:\\x\\..\\evil.jpg\x00"), "20241029T235958Z_dsm_evil.jpg")
        self.assertEqual(name_of(b"mid\x00dle/../../x.jpg\x00"), "20241029T235958Z_dsm_mid.bin")
        self.assertEqual(name_of(b"a" * 600 + b".jpg\x00"), "20241029T235958Z_dsm_" + "a" * 64 + ".jpg")
        self.assertEqual(name_of(b"..\x00"), "20241029T235958Z_dsm.bin")
        self.assertEqual(name_of(b"\x00"), "20241029T235958Z_dsm-2.bin")


class SpoolTests(SinkTestCase):
    """The sink links or copies the spool file; it never moves or changes it."""

    def test_spool_file_untouched(self) -> None:
        received = self.received()
        before = received.path.stat()
        stored = self.store(received)
        after = received.path.stat()
        self.assertEqual(received.path.read_bytes(), JPEG)
        self.assertEqual((before.st_size, before.st_mtime_ns), (after.st_size, after.st_mtime_ns))
        self.assertEqual(stored.read_bytes(), JPEG)
        self.assertEqual(sorted(p.name for p in self.spool.iterdir()), [received.path.name])
        self.assertNoTemporaries()

    def test_cross_filesystem_copy(self) -> None:
        real_link = os.link
        spool_links: list[Any] = []

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(src).parent == self.spool:
                spool_links.append(src)
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_link(src, dst, *args, **kwargs)

        self.patch(os, "link", link)
        received = self.received()
        stored = self.store(received)
        self.assertEqual(len(spool_links), 1)
        self.assertEqual(stored, self.root / IMEI / "2024-10-29" / "20241029T235958Z_photof.jpg")
        self.assertStored(stored, received, JPEG)
        self.assertNotEqual(stored.stat().st_ino, received.path.stat().st_ino)
        self.assertNoTemporaries()
        # A second file under the same name takes the next number, still copied.
        other = self.received(JPEG + b"x")
        second = self.store(other)
        self.assertEqual(second.name, "20241029T235958Z_photof-2.jpg")
        self.assertStored(second, other, JPEG + b"x")
        self.assertStored(stored, received, JPEG)
        self.assertNoTemporaries()

    def test_cross_filesystem_interleaved(self) -> None:
        """Two copies of same-named files in flight at once do not clobber each other."""
        real_link = os.link
        real_copy = disk_module._copy_durably
        first = self.received(JPEG)
        second = self.received(JPEG + b"second")
        results: list[Path] = []

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(src).parent == self.spool:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_link(src, dst, *args, **kwargs)

        def copy(source: Path, target: Path) -> None:
            real_copy(source, target)
            if Path(source) == first.path:  # while the first copy waits to be linked
                results.append(self.store(second))

        self.patch(os, "link", link)
        self.patch(disk_module, "_copy_durably", copy)
        stored_first = self.store(first)
        self.assertStored(stored_first, first, JPEG)
        self.assertStored(results[0], second, JPEG + b"second")
        self.assertNotEqual(stored_first, results[0])
        self.assertNoTemporaries()

    def test_failed_copy_leaves_nothing(self) -> None:
        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "link", link)
        received = self.received()
        err = self.assertRaises(OSError, self.sink.store, received)
        self.assertEqual(err.errno, errno.EXDEV)
        self.assertEqual([p for p in self.all_entries() if p.is_file()], [])
        self.assertEqual(received.path.read_bytes(), JPEG)

    def test_other_link_errors_propagate(self) -> None:
        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "link", link)
        received = self.received()
        d = self.sink.deliver(received)
        failure = self.failureResultOf(d, OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)
        self.assertEqual([p for p in self.all_entries() if p.is_file()], [])
        self.assertTrue(received.path.exists())
