"""Tests for camgateway.runtime.config: the YAML contract, validation and defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml
from twisted.python import usage
from twisted.trial import unittest

from camgateway.runtime.config import (
    DUALCAM_SOURCES,
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

BASE = Path("/srv/gateway")

CONTRACT = """\
listen: ["tcp:5000:interface=0.0.0.0"]
storage: {spool: /var/lib/camgateway/spool}
sinks: [{type: disk, root: /var/lib/camgateway/files}]
devices: {allow: []}
timeouts: {idle: 120, metadata: 10}
download: {mode: auto, metadata: true, dualcam_sources: [videor, videof, photor, photof]}
"""

SAMPLE = Path(__file__).resolve().parents[1] / "etc" / "camgateway.yaml"


def parse(text: str, base: Path = BASE) -> Config:
    return parse_config(yaml.safe_load(text), "test.yaml", base)


def default_chain(base: Path) -> tuple:
    """The built-in chain under ``base``, as configured explicitly (mp4 then disk with ffmpeg, else disk)."""
    from camgateway.delivery.sinks.mp4 import default_sinks

    chain = default_sinks("camgateway-data/files")
    expected = parse_config({"sinks": chain}, "test.yaml", base).sinks
    assert expected[-1]["root"] == str(base / "camgateway-data" / "files")
    return expected


class ContractTests(unittest.TestCase):
    """The public contract YAML parses to the documented values."""

    def test_contract(self) -> None:
        config = parse(CONTRACT)
        self.assertEqual(config.listen, ("tcp:5000:interface=0.0.0.0",))
        self.assertEqual(config.spool, Path("/var/lib/camgateway/spool"))
        self.assertEqual(config.sinks, ({"type": "disk", "root": "/var/lib/camgateway/files"},))
        self.assertEqual(config.allow, frozenset())
        self.assertEqual(config.idle_timeout, 120.0)
        self.assertEqual(config.metadata_timeout, 10.0)
        self.assertEqual(config.mode, "auto")
        self.assertIs(config.metadata, True)
        self.assertEqual(config.dualcam_sources, ("videor", "videof", "photor", "photof"))
        self.assertEqual(config.source, "test.yaml")
        # Keys the contract leaves out keep their defaults.
        d = Config()
        for name in ("partial_ttl", "checkpoint_bytes", "step_timeout", "resume_retries",
                     "max_connections", "max_file_bytes", "min_free_bytes"):
            self.assertEqual(getattr(config, name), getattr(d, name), name)

    def test_every_key_set(self) -> None:
        config = parse("""
listen: ["tcp:6000", "ssl:6001:privateKey=k.pem:certKey=c.pem"]
storage: {spool: sp, partial_ttl: 2d, checkpoint_bytes: 1MiB}
sinks: [{type: disk, root: a}, {type: disk, root: /abs/b}]
devices: {allow: ["863719061653375", 356307042441013, "013519004441013"]}
timeouts: {idle: 5m, metadata: 3s, step: 1h}
download: {mode: dsm, metadata: false, dualcam_sources: [photof, videor], resume_retries: 3}
limits: {max_connections: 10, max_file_bytes: 200MB, min_free_bytes: 0}
""")
        self.assertEqual(config.listen, ("tcp:6000", "ssl:6001:privateKey=k.pem:certKey=c.pem"))
        self.assertEqual(config.spool, BASE / "sp")
        self.assertEqual(config.partial_ttl, 2 * 86400)
        self.assertEqual(config.checkpoint_bytes, 1024 * 1024)
        self.assertEqual(config.sinks, ({"type": "disk", "root": str(BASE / "a")},
                                        {"type": "disk", "root": "/abs/b"}))
        self.assertEqual(config.allow, frozenset({"863719061653375", "356307042441013", "13519004441013"}))
        self.assertEqual((config.idle_timeout, config.metadata_timeout, config.step_timeout),
                         (300.0, 3.0, 3600.0))
        self.assertEqual(config.mode, "dsm")
        self.assertIs(config.metadata, False)
        self.assertEqual(config.dualcam_sources, ("photof", "videor"))
        self.assertEqual(config.resume_retries, 3)
        self.assertEqual(config.max_connections, 10)
        self.assertEqual(config.max_file_bytes, 200_000_000)
        self.assertEqual(config.min_free_bytes, 0)

    def test_empty_document_is_defaults(self) -> None:
        for text in ("", "{}", "storage:\ntimeouts:\n"):
            config = parse(text)
            self.assertEqual(config, dataclasses.replace(
                Config(), spool=BASE / "camgateway-data" / "spool",
                sinks=default_chain(BASE), source="test.yaml"))

    def test_single_string_lists(self) -> None:
        config = parse("listen: tcp:7000\ndownload: {dualcam_sources: photof}")
        self.assertEqual(config.listen, ("tcp:7000",))
        self.assertEqual(config.dualcam_sources, ("photof",))

    def test_sample_file_matches_defaults(self) -> None:
        """etc/camgateway.yaml shows the packaged defaults, as it says."""
        if not SAMPLE.exists():
            raise unittest.SkipTest("no etc/camgateway.yaml")
        config = load_config(SAMPLE, base=BASE)
        expected = dataclasses.replace(
            Config(), spool=Path("/var/lib/camgateway/spool"),
            sinks=({"type": "disk", "root": "/var/lib/camgateway/files"},), source=str(SAMPLE),
            workers=parse_config({"workers": "auto"}).workers)  # a packaged install uses every core
        self.assertEqual(config, expected)


class ErrorTests(unittest.TestCase):
    """Every wrong value is a ConfigError that names its dotted key."""

    def assertKeyError(self, text: str, key: str) -> ConfigError:
        err = self.assertRaises(ConfigError, parse, text)
        self.assertEqual(err.key, key, f"{text!r}: {err}")
        self.assertTrue(str(err).startswith(f"{key}: "), str(err))
        return err

    def test_top_level(self) -> None:
        self.assertKeyError("[1, 2]", "(top level)")
        self.assertKeyError("just text", "(top level)")
        err = self.assertKeyError("listen: [tcp:5000]\nlisen: [tcp:5001]", "lisen")
        self.assertIn("unknown key", str(err))
        self.assertKeyError("42: x", "42")

    def test_listen(self) -> None:
        self.assertKeyError("listen: []", "listen")
        self.assertKeyError("listen: 5000", "listen")
        self.assertKeyError("listen: {tcp: 5000}", "listen")
        self.assertKeyError("listen: [true]", "listen[0]")
        self.assertKeyError("listen: [tcp:5000, 1.5]", "listen[1]")
        self.assertKeyError("listen: [tcp:5000, null]", "listen[1]")

    def test_storage(self) -> None:
        self.assertKeyError("storage: 5", "storage")
        self.assertKeyError("storage: [spool]", "storage")
        self.assertKeyError("storage: {spool: 5}", "storage.spool")
        self.assertKeyError("storage: {spool: ''}", "storage.spool")
        self.assertKeyError("storage: {spool: [a]}", "storage.spool")
        self.assertKeyError("storage: {spol: /x}", "storage.spol")
        for bad in ("forever", "0", "-5s", "true", "[1]", ".inf", ".nan", "10 parsecs"):
            self.assertKeyError(f"storage: {{partial_ttl: {bad}}}", "storage.partial_ttl")
        for bad in ("4 parsecs", "0", "-1", "false", ".inf", ".nan", "0.5", "'0.1B'"):
            self.assertKeyError(f"storage: {{checkpoint_bytes: {bad}}}", "storage.checkpoint_bytes")

    def test_sinks(self) -> None:
        self.assertKeyError("sinks: []", "sinks")
        self.assertKeyError("sinks: {type: disk, root: /x}", "sinks")
        self.assertKeyError("sinks: disk", "sinks")
        self.assertKeyError("sinks: [5]", "sinks[0]")
        self.assertKeyError("sinks: [{type: s3, bucket: b}]", "sinks[0].type")
        self.assertKeyError("sinks: [{root: /x}]", "sinks[0].type")
        self.assertKeyError("sinks: [{type: disk}]", "sinks[0].root")
        self.assertKeyError("sinks: [{type: disk, root: 5}]", "sinks[0].root")
        self.assertKeyError("sinks: [{type: disk, root: ''}]", "sinks[0].root")
        self.assertKeyError("sinks: [{type: disk, root: /a}, {type: disk, root: /b, mode: x}]",
                            "sinks[1].mode")

    def test_devices(self) -> None:
        self.assertKeyError("devices: [1]", "devices")
        self.assertKeyError("devices: {deny: []}", "devices.deny")
        self.assertKeyError("devices: {allow: {a: 1}}", "devices.allow")
        self.assertKeyError("devices: {allow: abc}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: [863719061653375, '86371906165337x']}", "devices.allow[1]")
        self.assertKeyError("devices: {allow: [1.5]}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: [true]}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: [-5]}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: ['']}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: ['1 2']}", "devices.allow[0]")
        self.assertKeyError(f"devices: {{allow: ['{'1' * 21}']}}", "devices.allow[0]")
        # An IMEI has 15 digits: fewer or more is a typo that would refuse the camera.
        self.assertKeyError("devices: {allow: ['86371906165337']}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: ['0863719061653375']}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: ['000']}", "devices.allow[0]")
        err = self.assertKeyError("devices: {allow: [86371906165337]}", "devices.allow[0]")
        self.assertIn("in quotes", str(err))
        # Digits of other scripts are not a decimal IMEI.
        self.assertKeyError("devices: {allow: ['\u0661\u0662\u0663']}", "devices.allow[0]")
        self.assertKeyError("devices: {allow: ['\u00b2']}", "devices.allow[0]")

    def test_timeouts(self) -> None:
        for name in ("idle", "metadata", "step"):
            for bad in ("soon", "0", "-1", "true", "[1]", "''", ".inf", ".nan", "10 parsecs", "5x"):
                self.assertKeyError(f"timeouts: {{{name}: {bad}}}", f"timeouts.{name}")
        self.assertKeyError("timeouts: {connect: 5}", "timeouts.connect")
        self.assertKeyError("timeouts: 5", "timeouts")

    def test_download(self) -> None:
        self.assertKeyError("download: {mode: fast}", "download.mode")
        self.assertKeyError("download: {mode: [auto]}", "download.mode")
        self.assertKeyError("download: {mode: null}", "download.mode")
        self.assertKeyError("download: {metadata: yes please}", "download.metadata")
        self.assertKeyError("download: {metadata: 1}", "download.metadata")
        self.assertKeyError("download: {dualcam_sources: [photof, videox]}", "download.dualcam_sources[1]")
        self.assertKeyError("download: {dualcam_sources: [photof, 5.5]}", "download.dualcam_sources[1]")
        self.assertKeyError("download: {dualcam_sources: 5}", "download.dualcam_sources")
        self.assertKeyError("download: {dualcam_sources: [photof, photof]}", "download.dualcam_sources")
        for bad in ("0", "-1", "true", "1.5", "many"):
            self.assertKeyError(f"download: {{resume_retries: {bad}}}", "download.resume_retries")
        self.assertKeyError("download: {modes: auto}", "download.modes")

    def test_limits(self) -> None:
        for bad in ("0", "-1", "true", "1.5", "lots"):
            self.assertKeyError(f"limits: {{max_connections: {bad}}}", "limits.max_connections")
        for bad in ("big", "0", "-1", "true", ".inf", ".nan", "0.5", "'1 parsec'"):
            self.assertKeyError(f"limits: {{max_file_bytes: {bad}}}", "limits.max_file_bytes")
        for bad in ("-1", "false", "true", ".inf", "'-5MB'", "plenty"):
            self.assertKeyError(f"limits: {{min_free_bytes: {bad}}}", "limits.min_free_bytes")
        self.assertKeyError("limits: {max_files: 5}", "limits.max_files")

    def test_log_section_knows_its_keys(self) -> None:
        """The log section has format, file and progress_interval; levels and the rest stay twistd's."""
        self.assertKeyError("log: {level: debug}", "log.level")
        self.assertKeyError("log: {format: xml}", "log.format")

    def test_config_error_is_a_value_error(self) -> None:
        err = ConfigError("a.b", "broken")
        self.assertIsInstance(err, ValueError)
        self.assertEqual(err.key, "a.b")
        self.assertEqual(str(err), "a.b: broken")


class UnitTests(unittest.TestCase):
    """Sizes and durations accept numbers and unit suffixes."""

    def test_sizes(self) -> None:
        self.assertEqual(parse_size("200MB"), 200_000_000)
        self.assertEqual(parse_size("1GiB"), 1024**3)
        self.assertEqual(parse_size(1048576), 1048576)
        self.assertEqual(parse_size("4MiB"), 4 * 1024**2)
        self.assertEqual(parse_size("1.5k"), 1500)
        self.assertEqual(parse_size(" 10 kb "), 10_000)
        self.assertEqual(parse_size("10KB"), 10_000)
        self.assertEqual(parse_size("2TiB"), 2 * 1024**4)
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("7b"), 7)
        self.assertIsInstance(parse_size("1.5k"), int)

    def test_bad_sizes(self) -> None:
        for bad in ("", "MB", "1e3", "-1MB", "1 parsec", "1.2.3MB", True, None, [1], 0, -3,
                    float("inf"), float("nan"), 0.25):
            err = self.assertRaises(ConfigError, parse_size, bad, "limits.max_file_bytes")
            self.assertEqual(err.key, "limits.max_file_bytes")

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("10s"), 10.0)
        self.assertEqual(parse_duration("7d"), 7 * 86400.0)
        self.assertEqual(parse_duration(120), 120.0)
        self.assertEqual(parse_duration(0.5), 0.5)
        self.assertEqual(parse_duration("2h"), 7200.0)
        self.assertEqual(parse_duration("1.5m"), 90.0)
        self.assertEqual(parse_duration("30min"), 1800.0)
        self.assertEqual(parse_duration("1w"), 7 * 86400.0)
        self.assertEqual(parse_duration("45"), 45.0)

    def test_bad_durations(self) -> None:
        for bad in ("", "s", "10 parsecs", "-5s", "1e3", True, False, None, {}, 0, -1,
                    float("inf"), float("nan"), "10y"):
            err = self.assertRaises(ConfigError, parse_duration, bad, "timeouts.idle")
            self.assertEqual(err.key, "timeouts.idle")


class PathTests(unittest.TestCase):
    """Relative paths resolve against the base directory; absolute ones stay."""

    def test_relative_spool_and_sink(self) -> None:
        config = parse("storage: {spool: data/spool}\nsinks: [{type: disk, root: out}]", Path("/base"))
        self.assertEqual(config.spool, Path("/base/data/spool"))
        self.assertEqual(config.sinks[0]["root"], "/base/out")

    def test_absolute_paths(self) -> None:
        config = parse("storage: {spool: /s}\nsinks: [{type: disk, root: /r}]", Path("/base"))
        self.assertEqual(config.spool, Path("/s"))
        self.assertEqual(config.sinks[0]["root"], "/r")

    def test_home(self) -> None:
        self.patch(os, "environ", dict(os.environ, HOME="/home/cam"))
        config = parse("storage: {spool: ~/spool}\nsinks: [{type: disk, root: ~/files}]", Path("/base"))
        self.assertEqual(config.spool, Path("/home/cam/spool"))
        self.assertEqual(config.sinks[0]["root"], "/home/cam/files")

    def test_defaults_under_base(self) -> None:
        config = parse("{}", Path("/base"))
        self.assertEqual(config.spool, Path("/base/camgateway-data/spool"))
        self.assertEqual(config.sinks, default_chain(Path("/base")))


class LoadConfigTests(unittest.TestCase):
    """load_config: defaults when the default file is absent, errors naming --config."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, text: Any, name: str = "gw.yaml") -> Path:
        path = self.dir / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def test_missing_default_file_gives_defaults(self) -> None:
        config = load_config(self.dir / "absent.yaml", explicit=False, base=self.dir)
        self.assertEqual(config.listen, ("tcp:5000:interface=0.0.0.0",))
        self.assertEqual(config.spool, self.dir / "camgateway-data" / "spool")
        self.assertEqual(config.sinks, default_chain(self.dir))
        self.assertEqual(config.source, "built-in defaults")
        self.assertEqual(config.dualcam_sources, DUALCAM_SOURCES)
        self.assertEqual(config.allow, frozenset())

    def test_no_path_gives_defaults(self) -> None:
        config = load_config(None, base=self.dir)
        self.assertEqual(config.source, "built-in defaults")
        self.assertEqual(config.spool, self.dir / "camgateway-data" / "spool")

    def test_default_file_present_is_read(self) -> None:
        path = self.write("timeouts: {idle: 30}")
        config = load_config(path, explicit=False, base=self.dir)
        self.assertEqual(config.idle_timeout, 30.0)
        self.assertEqual(config.source, str(path))

    def test_explicit_missing_file(self) -> None:
        missing = self.dir / "absent.yaml"
        err = self.assertRaises(ConfigError, load_config, missing, explicit=True, base=self.dir)
        self.assertEqual(err.key, "--config")
        self.assertIn("--config", str(err))
        self.assertIn(str(missing), str(err))

    def test_directory(self) -> None:
        err = self.assertRaises(ConfigError, load_config, self.dir, base=self.dir)
        self.assertEqual(err.key, "--config")

    def test_invalid_yaml(self) -> None:
        path = self.write("listen: [tcp:5000\n  storage: {")
        err = self.assertRaises(ConfigError, load_config, path, base=self.dir)
        self.assertEqual(err.key, "--config")
        self.assertIn("YAML", str(err))

    def test_not_utf8(self) -> None:
        path = self.write(b"\xff\xfe\x00listen: x\n")
        err = self.assertRaises(ConfigError, load_config, path, base=self.dir)
        self.assertEqual(err.key, "--config")

    def test_errors_in_file_name_the_key(self) -> None:
        path = self.write("download: {dualcam_sources: [videor, photox]}")
        err = self.assertRaises(ConfigError, load_config, path, base=self.dir)
        self.assertEqual(err.key, "download.dualcam_sources[1]")

    def test_file_relative_paths_use_base(self) -> None:
        path = self.write(CONTRACT.replace("/var/lib/camgateway/spool", "sp"))
        config = load_config(path, base=self.dir)
        self.assertEqual(config.spool, self.dir / "sp")
        self.assertEqual(config.sinks[0]["root"], "/var/lib/camgateway/files")

    def test_empty_file(self) -> None:
        config = load_config(self.write(""), base=self.dir)
        self.assertEqual(config.listen, Config().listen)


class AllowedTests(unittest.TestCase):
    """Config.allowed: an empty list allows every camera, else only those listed."""

    def test_empty_allows_all(self) -> None:
        config = parse("devices: {allow: []}")
        self.assertTrue(config.allowed("863719061653375"))
        self.assertTrue(config.allowed("1"))
        self.assertTrue(Config().allowed("42"))

    def test_list(self) -> None:
        config = parse("devices: {allow: ['863719061653375', 356307042441013]}")
        self.assertTrue(config.allowed("863719061653375"))
        self.assertTrue(config.allowed("356307042441013"))
        self.assertFalse(config.allowed("863719061653376"))
        self.assertFalse(config.allowed(""))

    def test_leading_zeros_normalised(self) -> None:
        config = parse("devices: {allow: ['013519004441013', '863719061653375']}")
        self.assertEqual(config.allow, frozenset({"13519004441013", "863719061653375"}))
        # Sessions ask with str(int): what the init packet's u64 gives.
        self.assertTrue(config.allowed(str(13519004441013)))
        self.assertTrue(config.allowed(str(863719061653375)))
        self.assertFalse(config.allowed("3519004441013"))


class TapOptionsTests(unittest.TestCase):
    """``twistd camgateway`` reports bad configuration as a UsageError naming the key."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def options(self, *args: str) -> Any:
        from camgateway.runtime.tap import Options

        options = Options()
        options.parseOptions(list(args))
        return options

    def test_bad_value(self) -> None:
        path = self.dir / "bad.yaml"
        path.write_text("timeouts: {idle: soon}\n")
        err = self.assertRaises(usage.UsageError, self.options, "--config", str(path))
        self.assertIn("timeouts.idle", str(err))

    def test_unknown_nested_key(self) -> None:
        path = self.dir / "bad.yaml"
        path.write_text("sinks: [{type: disk, root: /x, bucket: b}]\n")
        err = self.assertRaises(usage.UsageError, self.options, "--config", str(path))
        self.assertIn("sinks[0].bucket", str(err))

    def test_missing_file(self) -> None:
        err = self.assertRaises(usage.UsageError, self.options, "--config", str(self.dir / "nope.yaml"))
        self.assertIn("--config", str(err))

    def test_invalid_yaml(self) -> None:
        path = self.dir / "bad.yaml"
        path.write_text("listen: [\n")
        err = self.assertRaises(usage.UsageError, self.options, "--config", str(path))
        self.assertIn("--config", str(err))

    def test_good_file_and_listen_override(self) -> None:
        path = self.dir / "good.yaml"
        path.write_text(CONTRACT)
        options = self.options("--config", str(path))
        self.assertEqual(options["parsed"].idle_timeout, 120.0)
        self.assertEqual(options["parsed"].source, str(path))
        options = self.options("--config", str(path), "--listen", "tcp:6000", "--listen", "tcp:6001")
        self.assertEqual(options["parsed"].listen, ("tcp:6000", "tcp:6001"))


class AllErrorsTests(unittest.TestCase):
    """Validation goes on after an error: one ConfigError carries every error, each naming its key."""

    def test_every_error_at_once(self) -> None:
        err = self.assertRaises(ConfigError, parse, """
listen: [tcp:5000, tcp:99999]
lisen: [tcp:5001]
storage: {partial_ttl: forever, spol: /x}
devices: {allow: ['12345']}
timeouts: {idle: -3, metadata: soon}
download: {mode: fast, dualcam_sources: [photof, videox, photoy]}
limits: {max_connections: 0}
outbox: {concurrency: many}
http: {listen: 8080, token: short}
log: {format: xml, level: debug}
workers: 0
""")
        keys = [e.key for e in err.errors]
        self.assertEqual(keys, ["lisen", "storage.spol", "storage.partial_ttl", "devices.allow[0]", "timeouts.idle",
                                "timeouts.metadata", "download.mode", "download.dualcam_sources[1]",
                                "download.dualcam_sources[2]", "limits.max_connections", "outbox.concurrency",
                                "http.listen", "http.token", "log.level", "log.format", "workers", "listen[1]"])
        self.assertEqual(err.key, "lisen")
        lines = str(err).splitlines()
        self.assertEqual(lines[0], f"{len(keys)} errors:")
        self.assertEqual([line.split(":")[0].strip() for line in lines[1:]], keys)
        for each in err.errors:
            self.assertEqual(each.errors, (each,))
            self.assertEqual(str(each), f"{each.key}: {each.message}")

    def test_one_error_is_itself(self) -> None:
        err = self.assertRaises(ConfigError, parse, "timeouts: {idle: -3}")
        self.assertEqual((err.key, err.errors), ("timeouts.idle", (err,)))
        self.assertEqual(str(err), "timeouts.idle: must be positive, got -3")

    def test_several_of_several_flattens(self) -> None:
        a, b, c = ConfigError("a", "x"), ConfigError("b", "y"), ConfigError("c", "z")
        combined = ConfigError.several([ConfigError.several([a, b]), c])
        self.assertEqual(combined.errors, (a, b, c))
        self.assertIs(ConfigError.several([a]), a)
        self.assertIsInstance(combined, ValueError)

    def test_workers_lists_every_endpoint_it_cannot_hand_over(self) -> None:
        err = self.assertRaises(ConfigError, parse, "workers: 2\nstorage: {resume: 'redis://:pw@r:6379/0'}\n"
                                                    "listen: ['ssl:5001:privateKey=k.pem', tcp:5000, 'unix:/x']")
        self.assertEqual([e.key for e in err.errors], ["workers", "listen[0]", "listen[2]"])

    def test_a_wrong_resume_url_hides_its_password(self) -> None:
        err = self.assertRaises(ConfigError, parse, "storage: {resume: 'http://:hunter2@r:6379/0'}")
        self.assertEqual(err.key, "storage.resume")
        self.assertNotIn("hunter2", str(err))


class EndpointStringTests(unittest.TestCase):
    """``listen``/``http.listen``: ports in range, no address twice (checked with the rest of the file)."""

    def keys(self, text: str) -> list[str]:
        return [e.key for e in self.assertRaises(ConfigError, parse, text).errors]

    def test_port_out_of_range(self) -> None:
        self.assertEqual(self.keys("listen: ['tcp:99999']"), ["listen[0]"])
        self.assertEqual(self.keys("listen: ['tcp:5000', 'tcp6:port=70000']"), ["listen[1]"])
        self.assertEqual(self.keys("listen: ['haproxy:tcp:65536']"), ["listen[0]"])
        self.assertEqual(self.keys("http: {listen: ['ssl:123456:privateKey=k.pem']}"), ["http.listen[0]"])
        self.assertEqual(self.keys("listen: ['tcp:-1']"), ["listen[0]"])
        self.assertIn("out of range", str(self.assertRaises(ConfigError, parse, "listen: ['tcp:99999']")))
        for good in ("tcp:0", "tcp:65535", "tcp:5000:interface=127.0.0.1", "tcp6:5000:interface=\\:\\:1",
                     "ssl:5001:privateKey=k.pem:certKey=c.pem", "unix:/run/camgateway.sock", "haproxy:tcp:5000",
                     "systemd:domain=INET:index=0"):
            self.assertEqual(parse(f"listen: ['{good}']").listen, (good,))

    def test_an_address_twice(self) -> None:
        self.assertEqual(self.keys("listen: [tcp:5000, tcp:5000]"), ["listen[1]"])
        self.assertEqual(self.keys("listen: [tcp:5000, 'tcp:5000:interface=0.0.0.0']"), ["listen[1]"])
        self.assertEqual(self.keys("listen: ['tcp:0:interface=127.0.0.1', 'tcp:0:interface=127.0.0.1']"),
                         ["listen[1]"])
        self.assertEqual(self.keys("listen: [tcp:8080]\nhttp: {listen: ['tcp:port=8080']}"), ["http.listen[0]"])
        self.assertEqual(self.keys("listen: ['unix:/x', 'unix:/x']"), ["listen[1]"])
        err = self.assertRaises(ConfigError, parse, "listen: [tcp:5000, tcp:5000]")
        self.assertIn("listen[0]", str(err))
        # Other addresses of one port, or two free ports, are not the same.
        parse("listen: ['tcp:5000:interface=127.0.0.1', 'tcp:5000:interface=10.0.0.1', 'tcp6:5000', tcp:0,"
              " 'tcp:0:interface=127.0.0.1']\nhttp: {listen: [tcp:8080]}")


class PathCheckTests(unittest.TestCase):
    """A spool or disk sink root that is, or lies under, a regular file is refused: it can never be made."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        (self.dir / "file").write_text("not a folder\n")

    def test_under_a_file(self) -> None:
        err = self.assertRaises(ConfigError, parse,
                                "storage: {spool: file/spool}\nsinks: [{type: disk, root: file/a/b}]", self.dir)
        self.assertEqual([e.key for e in err.errors], ["storage.spool", "sinks[0].root"])
        self.assertIn(f"{self.dir / 'file'} is a file, not a directory", str(err))

    def test_a_file(self) -> None:
        err = self.assertRaises(ConfigError, parse, "storage: {spool: file}", self.dir)
        self.assertEqual(err.key, "storage.spool")
        self.assertIn("is a file", str(err))

    def test_missing_folders_are_made_later(self) -> None:
        config = parse("storage: {spool: a/b/spool}\nsinks: [{type: disk, root: c/d}]", self.dir)
        self.assertEqual(config.spool, self.dir / "a" / "b" / "spool")


class YamlFileTests(unittest.TestCase):
    """load_config: YAML errors name the file and line; a key given twice is refused."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def load(self, text: str) -> Config:
        path = self.dir / "gw.yaml"
        path.write_text(text)
        return load_config(path, base=self.dir)

    def test_syntax_error_names_file_and_line(self) -> None:
        err = self.assertRaises(ConfigError, self.load, "listen: [tcp:5000]\ntimeouts:\n  idle: 5\n idle: [\n")
        self.assertEqual(err.key, "--config")
        self.assertIn(f"{self.dir / 'gw.yaml'}, line 4", str(err))
        self.assertNotIn("<unicode string>", str(err))

    def test_a_key_twice(self) -> None:
        for text, key, lines in (("listen: [tcp:5000]\nlisten: [tcp:6000]\n", "listen", (1, 2)),
                                 ("storage:\n  spool: a\n  partial_ttl: 1d\n  spool: b\n", "storage.spool", (2, 4)),
                                 ("sinks:\n- {type: disk, root: a, root: b}\n", "sinks[0].root", (2, 2))):
            err = self.assertRaises(ConfigError, self.load, text)
            self.assertEqual(err.key, key, text)
            self.assertIn(f"given twice in {self.dir / 'gw.yaml'} (line {lines[0]} and line {lines[1]})", str(err))

    def test_merge_keys_may_be_overridden(self) -> None:
        config = self.load("timeouts: &t {idle: 30, metadata: 5}\nlimits: {max_connections: 7}\n")
        self.assertEqual(config.idle_timeout, 30.0)
        from camgateway.runtime.config import UniqueKeyLoader

        doc = yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n", Loader=UniqueKeyLoader)
        self.assertEqual(doc["b"], {"x": 1, "y": 3})
