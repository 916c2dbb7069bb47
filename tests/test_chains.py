"""Sink chains end to end: names, dead letters retried at the refusing sink, the ``camgateway`` command.

A real gateway (SQLite store, the shipped sinks: a disk, programs of the
test's own, HTTP servers of the test's own), a camera emulator, and the
``camgateway`` command run as a subprocess on the gateway's configuration.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web import server

from camgateway import __version__
from camgateway.runtime.config import load_config
from tests.ops_support import OpsTestCase, get_json, http_get, jpeg_camera, tiny_jpeg
from tests.support import poll
from tests.test_metrics import parse, value
from tests.test_sinks import Endpoint


def camgateway_command() -> list[str]:
    """The ``camgateway`` command of this Python (the venv's console script), else its entry point."""
    script = Path(sys.executable).with_name("camgateway")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from camgateway.runtime.cli import main; sys.exit(main(sys.argv[1:]))"]


def run_camgateway(*args: str, cwd: Optional[Path] = None) -> defer.Deferred:
    """Run the command without blocking the reactor (the gateway runs in it): ``(stdout, stderr, code)``."""
    command = camgateway_command()
    d = getProcessOutputAndValue(command[0], command[1:] + list(args), env=dict(os.environ),
                                 path=str(cwd) if cwd else None, reactor=reactor)
    return d.addCallback(lambda out: (out[0].decode(), out[1].decode(), out[2]))


def counting_program(folder: Path, name: str, refuse_first: bool = False) -> Path:
    """A program for a command sink: records each run (the file's id) in ``folder/<name>.runs``.

    With ``refuse_first`` its first run exits 100: a dead letter.
    """
    program = folder / name
    runs, refused = folder / f"{name}.runs", folder / f"{name}.refused"
    program.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$CAMGATEWAY_FILE_ID" >> '{runs}'
        if [ {'1' if refuse_first else '0'} = 1 ] && [ ! -e '{refused}' ]; then
            : > '{refused}'
            echo "not now" >&2
            exit 100
        fi
        exit 0
        """))
    program.chmod(0o755)
    return program


def runs(folder: Path, name: str) -> list[str]:
    """The file ids a counting program was run with, in order."""
    path = folder / f"{name}.runs"
    return path.read_text().split() if path.exists() else []


class ChainTestCase(OpsTestCase):
    """A gateway whose configuration is a YAML file the ``camgateway`` command reads too."""

    def serve(self, script: list[Any]) -> tuple[Endpoint, int]:
        """An HTTP server of the test's own: its requests, and its port."""
        endpoint = Endpoint(script)
        port = reactor.listenTCP(0, server.Site(endpoint), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return endpoint, port.getHost().port

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.config_path = self.work / "camgateway.yaml"

    @defer.inlineCallbacks
    def start_chain(self, sinks: list[dict[str, Any]]) -> Any:
        """Write the configuration (the spool and ``sinks``) and start a gateway on it."""
        self.config_path.write_text(json.dumps({"storage": {"spool": "spool"}, "sinks": sinks}))
        config = load_config(self.config_path, base=self.work)
        yield self.start_ops(root=self.work, spool=config.spool, sinks=config.sinks)

    @defer.inlineCallbacks
    def send_photo(self, n: int = 0) -> Any:
        """One camera sends one photo; fires once the outbox has nothing due."""
        [result] = yield self.cameras([jpeg_camera(n, tiny_jpeg())])
        self.assertTrue(result.ok, result)

    def camgateway(self, *args: str) -> defer.Deferred:
        return run_camgateway("--config", str(self.config_path), *args, cwd=self.work)

    def media_files(self) -> list[Path]:
        return sorted(p for p in (self.work / "files").rglob("*") if p.is_file() and p.suffix != ".json")

    @defer.inlineCallbacks
    def outbox_empty(self) -> Any:
        entries = yield self.gateway.services.store.pending()
        return not entries


class RetryTests(ChainTestCase):
    """``dead-letters --retry-all`` sends each file again to the sink that refused it, and to no other."""

    @defer.inlineCallbacks
    def test_each_dead_letter_goes_back_to_its_sink_only(self) -> Any:
        endpoint, port = self.serve([400])  # refuses the first POST for good, then takes them
        program = counting_program(self.work, "ingest", refuse_first=True)
        counter = counting_program(self.work, "count")
        yield self.start_chain([{"type": "command", "command": str(program)},
                                {"type": "disk", "root": "files"},
                                {"type": "http", "url": f"http://127.0.0.1:{port}/up/{{imei}}/{{name}}"},
                                {"type": "command", "command": str(counter)}])
        yield self.send_photo()
        yield poll(self.outbox_empty, what="the file through the chain")
        [stored] = self.media_files()
        self.assertEqual((len(runs(self.work, "ingest")), len(endpoint.requests), len(runs(self.work, "count"))),
                         (1, 1, 1))

        out, err, code = yield self.camgateway("dead-letters", "--json")
        self.assertEqual(code, 0, err)
        letters = json.loads(out)
        self.assertEqual(sorted((letter["sink"], letter["sink_name"], letter["attempts"]) for letter in letters),
                         [(0, "command:ingest", 1), (2, f"http:127.0.0.1:{port}", 1)])
        for letter in letters:
            self.assertRegex(letter["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        out, err, code = yield self.camgateway("dead-letters")
        self.assertEqual(code, 0, err)
        self.assertIn("command:ingest", out)
        self.assertIn("2 dead letter(s)", out)

        out, err, code = yield self.camgateway("dead-letters", "--retry-all")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count("back in the outbox"), 2)
        out, err, code = yield self.camgateway("dead-letters", "--retry", letters[0]["id"], "../spool")
        self.assertEqual((code, out, err.count("camgateway: no dead letter ")), (1, "", 2), err)

        def retried() -> Any:
            if len(runs(self.work, "ingest")) < 2 or len(endpoint.requests) < 2:
                return None
            return self.outbox_empty()

        yield poll(retried, what="both retries delivered")
        yield self.drained()  # nothing in flight, nothing in the outbox: nothing more can come
        self.assertEqual(len(runs(self.work, "ingest")), 2)  # the refusing program, once more
        self.assertEqual([r["method"] for r in endpoint.requests], [b"POST", b"POST"])  # the refusing server too
        self.assertEqual(len(runs(self.work, "count")), 1)  # the sink after both: not again
        self.assertEqual(self.media_files(), [stored])  # the disk sink: not again (no -2 copy)
        file_id = runs(self.work, "count")[0]
        self.assertEqual(set(runs(self.work, "ingest")), {file_id})  # every delivery under the file's id
        self.assertEqual({tuple(r["headers"].getRawHeaders("idempotency-key")) for r in endpoint.requests},
                         {(file_id,)})
        self.assertEqual(list((self.work / "spool" / "dead").iterdir()), [])
        self.assertEqual(self.spool_leftovers(), [])

    @defer.inlineCallbacks
    def test_sidecars_are_as_private_as_their_files(self) -> Any:
        """A sidecar holds the camera's GPS positions: mode 0640, as its media file."""
        yield self.start_chain([{"type": "disk", "root": "files"}])
        yield self.send_photo()
        [media] = self.media_files()
        sidecar = media.with_name(media.name + ".json")
        self.assertEqual(stat.S_IMODE(sidecar.stat().st_mode), stat.S_IMODE(media.stat().st_mode))
        self.assertEqual(stat.S_IMODE(sidecar.stat().st_mode) & 0o007, 0)


class NameTests(ChainTestCase):
    """Two sinks of a type are two names: in ``/metrics``, ``/api/outbox`` and ``camgateway outbox``."""

    @defer.inlineCallbacks
    def test_two_command_and_two_http_sinks(self) -> Any:
        up, up_port = self.serve([])
        down, down_port = self.serve([503] * 1000)  # never takes it: the file waits in the outbox there
        program = counting_program(self.work, "count")
        yield self.start_chain([{"type": "disk", "root": "files"},
                                {"type": "command", "command": str(program)},
                                {"type": "command", "command": str(program)},
                                {"type": "http", "url": f"http://127.0.0.1:{up_port}/up/{{imei}}/{{name}}"},
                                {"type": "http", "url": f"http://127.0.0.1:{down_port}/up/{{imei}}/{{name}}"}])
        names = [sink.name for sink in self.gateway.services.sinks]
        self.assertEqual(names, ["disk", "command:count", "command:count-2", f"http:127.0.0.1:{up_port}",
                                 f"http:127.0.0.1:{down_port}"])
        yield self.send_photo()
        yield poll(lambda: down.requests, what="the file at the last sink")

        _, _, body = yield http_get(self.url("metrics"))
        _, samples = parse(body.decode())
        for name in names[:4]:
            self.assertEqual(value(samples, "camgateway_sink_deliveries_total", sink=name), 1, name)
            self.assertEqual(value(samples, "camgateway_sink_failures_total", sink=name), 0, name)
        self.assertEqual(value(samples, "camgateway_sink_deliveries_total", sink=names[4]), 0)
        self.assertGreaterEqual(value(samples, "camgateway_sink_failures_total", sink=names[4]), 1)
        self.assertEqual(len(runs(self.work, "count")), 2)
        self.assertEqual(len(up.requests), 1)

        [waiting] = yield get_json(self.url("api/outbox"))
        self.assertEqual(waiting["sink"], names[4])
        out, err, code = yield self.camgateway("outbox", "--json")
        self.assertEqual(code, 0, err)
        [listed] = json.loads(out)
        self.assertEqual((listed["id"], listed["sink"], listed["imei"]), (waiting["id"], names[4], waiting["imei"]))
        self.assertGreaterEqual(listed["attempts"], 1)
        self.assertIn("HTTP 503", listed["last_error"])
        out, err, code = yield self.camgateway("outbox")
        self.assertEqual(code, 0, err)
        self.assertIn(f"{waiting['id']}  sink {names[4]}  attempts", out)
        self.assertIn("1 file(s) in the outbox", out)


class CommandLineTests(TestCase):
    """The ``camgateway`` command's version, help, and a missing spool, as a user runs it."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)

    @defer.inlineCallbacks
    def test_version_and_help(self) -> Any:
        out, err, code = yield run_camgateway("--version", cwd=self.work)
        self.assertEqual((out.strip(), code), (f"camgateway {__version__}", 0))
        out, err, code = yield run_camgateway("--help", cwd=self.work)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("usage: camgateway"), out)
        for text in ("check-config", "outbox [--json]", "dead-letters --retry-all", "--version"):
            self.assertIn(text, out)
        self.assertNotIn("``", out)  # plain text
        out, err, code = yield run_camgateway("dead-letters", "--help", cwd=self.work)
        self.assertEqual(code, 0, err)
        self.assertIn("--json", out)

    @defer.inlineCallbacks
    def test_a_missing_spool_is_one_line(self) -> Any:
        config = self.work / "camgateway.yaml"
        config.write_text("storage: {spool: nowhere/spool}\n")
        for args in (["outbox"], ["outbox", "--json"], ["dead-letters"], ["dead-letters", "--retry", "abc"]):
            out, err, code = yield run_camgateway("--config", str(config), *args, cwd=self.work)
            self.assertEqual((code, out), (2, ""), (args, err))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(f"no spool at {self.work / 'nowhere' / 'spool'}", err)
            self.assertNotIn("Traceback", err)
        self.assertFalse((self.work / "nowhere").exists())  # and nothing made there


class SharedStoreRetryTests(TestCase):
    """Several instances keep the outbox in Redis: a retried dead letter goes there, where they look."""

    @defer.inlineCallbacks
    def test_retry_into_redis(self) -> Any:
        from camgateway.delivery.outbox import RETRY, OutboxEntry, write_dead_letter
        from camgateway.storage.redis import RedisStore
        from tests.test_redis_store import SERVER

        url = SERVER.database(self, 7)
        work = Path(self.mktemp()).resolve()
        (work / "spool" / "partials").mkdir(parents=True)
        config = work / "camgateway.yaml"
        config.write_text(json.dumps({"storage": {"spool": "spool", "resume": url},
                                      "sinks": [{"type": "disk", "root": "files", "name": "archive"}]}))
        source = work / "refused"
        source.write_bytes(b"\xff\xd8 photo")
        entry = OutboxEntry("e1", "gone", 0, 2, 100.0, "boom", {"id": "e1", "imei": "1", "source": "photof"}, 50.0)
        write_dead_letter(str(work / "spool" / "dead"), entry, str(source), "archive", "HTTP 400", 200.0)

        out, err, code = yield run_camgateway("--config", str(config), "dead-letters", "--retry-all", cwd=work)
        self.assertEqual(code, 0, err)
        store = RedisStore(url, reactor)
        self.addCleanup(store.close)
        [retried] = yield store.pending()
        self.assertEqual((retried.sink, retried.record["id"], retried.record[RETRY]["sink_name"]),
                         (0, "e1", "archive"))
        self.assertEqual((work / "spool" / "partials" / retried.spool_name).read_bytes(), b"\xff\xd8 photo")
        self.assertFalse((work / "spool" / "resume.sqlite").exists())  # not where no gateway looks
        self.assertEqual(list((work / "spool" / "dead").iterdir()), [])
        out, err, code = yield run_camgateway("--config", str(config), "outbox", "--json", cwd=work)
        self.assertEqual(code, 0, err)
        self.assertEqual([(e["id"], e["sink"]) for e in json.loads(out)], [(retried.id, "archive")])
