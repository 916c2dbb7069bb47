"""The operations keys of the configuration: ``http`` and ``log``; endpoint checks of --check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from camgateway.runtime.config import Config, ConfigError, effective, load_config, mask_url, parse_config
from camgateway.delivery.sinks import mp4 as mp4_sink
from camgateway.runtime.tap import check_config, check_endpoints, config_report

TOKEN = "0123456789abcdef-token"


class HttpSectionTests(TestCase):
    def test_defaults_are_off(self) -> None:
        config = parse_config({})
        self.assertEqual((config.http_listen, config.http_token), ((), None))
        self.assertEqual((config.log_format, config.log_file, config.progress_interval), ("auto", None, 30.0))

    def test_values(self) -> None:
        config = parse_config({"http": {"listen": ["tcp:8080:interface=127.0.0.1", "tcp6:8081"], "token": TOKEN}})
        self.assertEqual(config.http_listen, ("tcp:8080:interface=127.0.0.1", "tcp6:8081"))
        self.assertEqual(config.http_token, TOKEN)
        self.assertEqual(parse_config({"http": {"listen": "tcp:8080"}}).http_listen, ("tcp:8080",))
        self.assertEqual(parse_config({"http": {"listen": []}}).http_listen, ())

    def test_token_file(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        (base / "token").write_text(TOKEN + "\n")
        config = parse_config({"http": {"listen": ["tcp:0"], "token_file": "token"}}, base=base)
        self.assertEqual(config.http_token, TOKEN)

    def assertKey(self, raw: object, key: str, base: Path | None = None) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            parse_config(raw, base=base)
        self.assertEqual(caught.exception.key, key, str(caught.exception))
        self.assertTrue(str(caught.exception).startswith(key + ":"))
        return caught.exception

    def test_errors_name_the_key(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        (base / "short").write_text("abc\n")
        (base / "empty").write_text("\n")
        self.assertKey({"http": {"port": 8080}}, "http.port")
        self.assertKey({"http": "tcp:8080"}, "http")
        self.assertKey({"http": {"listen": 8080.5}}, "http.listen")
        self.assertKey({"http": {"listen": ["tcp:8080", None]}}, "http.listen[1]")
        self.assertKey({"http": {"token": 12345678901234567890}}, "http.token")
        self.assertKey({"http": {"token": ""}}, "http.token")
        self.assertKey({"http": {"token": " " + TOKEN}}, "http.token")
        self.assertIn("too short", str(self.assertKey({"http": {"token": "abc"}}, "http.token")))
        self.assertKey({"http": {"token": TOKEN, "token_file": "x"}}, "http.token_file")
        self.assertIn("cannot read", str(self.assertKey({"http": {"token_file": "missing"}}, "http.token_file",
                                                        base)))
        self.assertKey({"http": {"token_file": "short"}}, "http.token_file", base)
        self.assertKey({"http": {"token_file": "empty"}}, "http.token_file", base)
        self.assertKey({"http": {"token_file": ""}}, "http.token_file", base)


class LogSectionTests(TestCase):
    def test_values(self) -> None:
        base = Path("/srv")
        config = parse_config({"log": {"format": "json", "file": "log/camgateway.log", "progress_interval": "10s"}},
                              base=base)
        self.assertEqual((config.log_format, config.log_file, config.progress_interval),
                         ("json", base / "log" / "camgateway.log", 10.0))
        self.assertEqual(parse_config({"log": {"format": "text", "progress_interval": 2}}).progress_interval, 2.0)

    def test_errors_name_the_key(self) -> None:
        for raw, key in (({"log": {"format": "xml"}}, "log.format"), ({"log": {"format": None}}, "log.format"),
                         ({"log": {"level": "debug"}}, "log.level"), ({"log": []}, "log"),
                         ({"log": {"file": ""}}, "log.file"), ({"log": {"file": "/var/log/"}}, "log.file"),
                         ({"log": {"file": 3}}, "log.file"),
                         ({"log": {"progress_interval": 0}}, "log.progress_interval"),
                         ({"log": {"progress_interval": "soon"}}, "log.progress_interval"),
                         ({"log": {"progress_interval": True}}, "log.progress_interval")):
            with self.assertRaises(ConfigError) as caught:
                parse_config(raw)
            self.assertEqual(caught.exception.key, key, raw)

    def test_the_sample_file_parses(self) -> None:
        sample = Path(__file__).resolve().parents[1] / "etc" / "camgateway.yaml"
        config = load_config(sample)
        self.assertEqual(config.http_listen, ())
        self.assertEqual(config.log_format, "auto")


class EndpointCheckTests(TestCase):
    """``--check``/``camgateway check-config`` parse endpoint strings and load TLS keys, naming the key."""

    def test_good_endpoints(self) -> None:
        check_endpoints(Config(listen=("tcp:5000:interface=0.0.0.0",), http_listen=("tcp:8080", "unix:/tmp/s")))
        report = "\n".join(config_report(Config(http_listen=("tcp:8080",), http_token=TOKEN)))
        self.assertEqual(yaml.safe_load(report)["http"], {"listen": ["tcp:8080"], "token": "***"})
        self.assertNotIn(TOKEN, report)

    def test_bad_endpoints_name_the_key(self) -> None:
        for config, key in ((Config(listen=("tcp:abc",)), "listen[0]"),
                            (Config(listen=("tcp:5000", "bogus:1")), "listen[1]"),
                            (Config(http_listen=("ssl:8443:privateKey=/nonexistent/key.pem",)), "http.listen[0]")):
            with self.assertRaises(ConfigError) as caught:
                check_endpoints(config)
            self.assertEqual(caught.exception.key, key)

    def test_every_bad_endpoint_at_once(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            check_endpoints(Config(listen=("tcp:abc", "tcp:5000", "bogus:1"),
                                   http_listen=("ssl:8443:privateKey=/nonexistent/key.pem",)))
        self.assertEqual([e.key for e in caught.exception.errors], ["listen[0]", "listen[2]", "http.listen[0]"])

    def test_check_config_collects_every_error(self) -> None:
        """Endpoints (after --listen replaced them), workers and log.file's folder, in one error."""
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        config = Config(listen=("tcp:99999", "ssl:5001:privateKey=k.pem", "tcp:7000", "tcp:7000"), workers=2,
                        log_file=work / "missing" / "gw.log")
        with self.assertRaises(ConfigError) as caught:
            check_config(config)
        self.assertEqual([e.key for e in caught.exception.errors],
                         ["listen[0]", "listen[3]", "listen[1]", "listen[1]", "log.file"])
        self.assertIn(f"the folder {work / 'missing'} does not exist", str(caught.exception))
        (work / "folder.log").mkdir()
        with self.assertRaises(ConfigError) as caught:
            check_config(Config(log_file=work / "folder.log"))
        self.assertEqual(caught.exception.key, "log.file")
        check_config(Config(log_file=work / "gw.log"))

    def test_check_config_command(self) -> None:
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        good, bad = work / "good.yaml", work / "bad.yaml"
        good.write_text("listen: ['tcp:5000']\nhttp: {listen: ['tcp:8080:interface=127.0.0.1']}\nlog: {format: json}\n")
        bad.write_text("http: {listen: ['ssl:8443:privateKey=missing.pem:certKey=missing.pem']}\n")
        command = [sys.executable, "-c", "import sys; from camgateway.runtime.cli import main; sys.exit(main(sys.argv[1:]))"]
        ok = subprocess.run(command + ["--config", str(good), "check-config"], cwd=work, capture_output=True,
                            text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn("configuration OK", ok.stdout)
        self.assertEqual(yaml.safe_load(ok.stdout)["log"]["format"], "json")
        failed = subprocess.run(command + ["--config", str(bad), "check-config"], cwd=work, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(failed.returncode, 2)
        self.assertIn("http.listen[0]", failed.stderr)


CHECK_CONFIG = [sys.executable, "-c", "import sys; from camgateway.runtime.cli import main; sys.exit(main(sys.argv[1:]))"]


class CheckConfigTests(TestCase):
    """``camgateway check-config``: every error at once, the file named, the configuration in effect as YAML."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()

    def check(self, text: str) -> subprocess.CompletedProcess[str]:
        path = self.work / "gw.yaml"
        path.write_text(text)
        return subprocess.run(CHECK_CONFIG + ["--config", str(path), "check-config"], cwd=self.work,
                              capture_output=True, text=True, timeout=60)

    def test_every_error_at_once(self) -> None:
        (self.work / "a-file").write_text("x\n")
        result = self.check("listen: ['tcp:99999', 'tcp:5000', 'tcp:5000']\n"
                            "sinks: [{type: disk, root: a-file/files}]\n"
                            "devices: {allow: ['86371906165337']}\n"
                            "timeouts: {idle: -3}\n")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        for key in ("sinks[0].root", "devices.allow[0]", "timeouts.idle", "listen[0]", "listen[2]"):
            self.assertIn(f"\n  {key}: ", result.stderr)
        self.assertIn("5 errors", result.stderr)

    def test_yaml_errors_name_the_file(self) -> None:
        result = self.check("listen: [tcp:5000]\ntimeouts: {idle: 30\n")
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"--config: {self.work / 'gw.yaml'}, line 3", result.stderr)
        result = self.check("timeouts:\n  idle: 30\n  idle: 60\n")
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"timeouts.idle: given twice in {self.work / 'gw.yaml'} (line 2 and line 3)", result.stderr)

    def test_prints_the_configuration_in_effect(self) -> None:
        result = self.check("listen: ['tcp:5000']\nstorage: {spool: sp, resume: sqlite}\n"
                            "sinks: [{type: disk, root: files}]\n"
                            "timeouts: {idle: 45}\nlimits: {max_file_bytes: 200MB}\noutbox: {concurrency: 4}\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        shown = yaml.safe_load(result.stdout)
        self.assertEqual(shown["storage"]["resume"], "sqlite")
        self.assertEqual(shown["storage"]["spool"], str(self.work / "sp"))
        self.assertEqual(shown["timeouts"], {"idle": "45s", "metadata": "10s", "step": "1m"})
        self.assertEqual(shown["limits"], {"max_connections": 20000, "max_file_bytes": "200MB",
                                           "min_free_bytes": "256MiB"})
        self.assertEqual(shown["outbox"]["concurrency"], 4)
        self.assertEqual(shown["outbox"]["give_up_after"], "7d")

    def test_never_prints_a_secret(self) -> None:
        (self.work / "token").write_text(TOKEN + "\n")
        result = self.check(
            "storage: {resume: 'redis://:redis-secret@127.0.0.1:6379/0'}\n"
            "http: {token_file: token}\n"
            "sinks:\n"
            "- type: http\n"
            "  url: 'https://user:url-secret@fleet.example.com/api/{imei}/{name}?key=1&access_token=query-secret'\n"
            "  headers: {Authorization: 'Bearer header-secret', X-Token: {env: HOME, prefix: 'Bearer '}}\n"
            "- {type: disk, root: files}\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        for secret in ("redis-secret", "url-secret", "query-secret", "header-secret", TOKEN):
            self.assertNotIn(secret, result.stdout + result.stderr)
        shown = yaml.safe_load(result.stdout)
        self.assertEqual(shown["storage"]["resume"], "redis://:***@127.0.0.1:6379/0")
        self.assertEqual(shown["http"]["token"], "***")
        http_sink = shown["sinks"][0]
        self.assertEqual(http_sink["url"],
                         "https://user:***@fleet.example.com/api/{imei}/{name}?key=1&access_token=***")
        self.assertEqual(http_sink["headers"], {"Authorization": "***",
                                                "X-Token": {"env": "HOME", "prefix": "Bearer "}})

    def test_the_sample_passes_its_own_check(self) -> None:
        sample = Path(__file__).resolve().parents[1] / "etc" / "camgateway.yaml"
        result = subprocess.run(CHECK_CONFIG + ["--config", str(sample), "check-config"], cwd=self.work,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(yaml.safe_load(result.stdout)["storage"]["spool"], "/var/lib/camgateway/spool")


class EffectiveTests(TestCase):
    """``effective``: the configuration in the file's shape, read back to the same Config (but secrets)."""

    def test_round_trip(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir()
        for raw in ({}, {"listen": ["tcp:6000", "tcp6:6001"], "workers": 3,
                         "storage": {"spool": "sp", "partial_ttl": "36h", "checkpoint_bytes": 1000, "instance": "gw1",
                                     "lease_ttl": 0.5},
                         "sinks": [{"type": "disk", "root": "files"},
                                   {"type": "command", "command": [sys.executable, "-c", "pass"], "timeout": 90}],
                         "devices": {"allow": ["013519004441013", "863719061653375"]},
                         "timeouts": {"idle": 61, "metadata": 3, "step": "2h"},
                         "download": {"mode": "dsm", "metadata": False, "dualcam_sources": ["photof"],
                                      "resume_retries": 2},
                         "limits": {"max_connections": 9, "max_file_bytes": "3GiB", "min_free_bytes": 0},
                         "outbox": {"concurrency": 2, "give_up_after": "1w", "claim_ttl": 45, "degraded_after": 90},
                         "http": {"listen": ["tcp:8080", "unix:/run/gw.sock"]},
                         "log": {"format": "json", "file": "gw.log", "progress_interval": "5s"}}):
            config = parse_config(raw, "x.yaml", base)
            shown = yaml.safe_load(yaml.safe_dump(effective(config)))
            self.assertEqual(parse_config(shown, "x.yaml", base), config, raw)

    def test_mask_url(self) -> None:
        for url, masked in (("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
                            ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
                            ("https://token@host/x", "https://***@host/x"),
                            ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
                            ("redis://host:6379/0", "redis://host:6379/0"), ("sqlite", "sqlite")):
            self.assertEqual(mask_url(url), masked)


class SinkChainTests(TestCase):
    """A chain whose output no sink stores is refused by ``check-config`` and at start, naming the sink."""

    LINE = f"{mp4_sink.passes_on} go only to the sinks after it; put a disk, http or command sink after it"

    def setUp(self) -> None:
        if shutil.which("ffmpeg") is None:
            raise SkipTest("ffmpeg not installed (the mp4 sink needs it; .ci/run installs Debian's ffmpeg)")
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()

    def config(self, sinks: str) -> Path:
        path = self.work / "camgateway.yaml"
        path.write_text(f"listen: ['tcp:0:interface=127.0.0.1']\nstorage: {{spool: spool}}\nsinks: {sinks}\n")
        return path

    def test_check_config_refuses_and_names_the_sink(self) -> None:
        from tests.test_chains import camgateway_command

        for sinks, key in (("[{type: mp4}]", "sinks[0]"), ("[{type: disk, root: files}, {type: mp4}]", "sinks[1]")):
            result = subprocess.run(camgateway_command() + ["--config", str(self.config(sinks)), "check-config"],
                                    cwd=self.work, capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 2, sinks)
            self.assertIn(f"{key}: the mp4 sink is the last sink and stores nothing itself: {self.LINE}",
                          result.stderr)
        result = subprocess.run(camgateway_command() + ["--config", str(self.config(
            "[{type: mp4}, {type: disk, root: files}]")), "check-config"], cwd=self.work, capture_output=True,
            text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration OK", result.stdout)

    def test_twistd_check_and_start_refuse(self) -> None:
        from tests.test_twistd import twistd

        config = self.config("[{type: disk, root: files}, {type: mp4}]")
        for args in (["--check"], []):
            result = subprocess.run([twistd(), "-n", "--pidfile=", "camgateway", "--config", str(config), *args],
                                    cwd=self.work, capture_output=True, text=True, timeout=60)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(f"sinks[1]: the mp4 sink is the last sink and stores nothing itself: {self.LINE}",
                          result.stdout + result.stderr)
            self.assertFalse((self.work / "spool").exists())  # refused before anything was made
