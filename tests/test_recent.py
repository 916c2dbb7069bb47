"""Services.recent: the latest stored files and where each sink put them."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.trial.unittest import TestCase

from camgateway.runtime.context import RecentFiles


def received(imei: str, sha: str) -> SimpleNamespace:
    return SimpleNamespace(imei=imei, sha256=sha)


class RecentFilesTests(TestCase):
    def test_places_found_by_camera_and_content(self) -> None:
        recent = RecentFiles(maxlen=3)
        a, b = received("1", "aa"), received("2", "aa")
        places_a = recent.append(a)
        recent.append(b)
        recent.places(received("1", "aa")).append("disk:/a")  # type: ignore[union-attr]
        self.assertEqual(places_a, ["disk:/a"])
        self.assertEqual([(r.imei, p) for r, p in recent], [("1", ["disk:/a"]), ("2", [])])
        self.assertIsNone(recent.places(received("1", "bb")))

    def test_oldest_forgotten_beyond_maxlen(self) -> None:
        recent = RecentFiles(maxlen=2)
        for n in range(4):
            recent.append(received("1", f"{n}"))
        self.assertEqual(len(recent), 2)
        self.assertEqual([r.sha256 for r, _ in recent], ["2", "3"])
        self.assertIsNone(recent.places(received("1", "0")))
        self.assertEqual(recent.places(received("1", "3")), [])

    def test_same_content_again_goes_to_the_newest_and_survives_the_oldest(self) -> None:
        recent = RecentFiles(maxlen=2)
        recent.append(received("1", "aa"))
        newest = recent.append(received("1", "aa"))
        self.assertIs(recent.places(received("1", "aa")), newest)
        recent.append(received("1", "bb"))  # the older "aa" is forgotten, the newer kept
        self.assertIs(recent.places(received("1", "aa")), newest)
