"""The operations keys of the configuration: ``http`` and ``log``; endpoint checks of --check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from camgateway.config import Config, ConfigError, load_config, parse_config
from camgateway.tap import check_endpoints, config_report

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
        self.assertIn("http_listen: ('tcp:8080',)", report)
        self.assertIn("http_token: set", report)
        self.assertNotIn(TOKEN, report)

    def test_bad_endpoints_name_the_key(self) -> None:
        for config, key in ((Config(listen=("tcp:abc",)), "listen[0]"),
                            (Config(listen=("tcp:5000", "bogus:1")), "listen[1]"),
                            (Config(http_listen=("ssl:8443:privateKey=/nonexistent/key.pem",)), "http.listen[0]")):
            with self.assertRaises(ConfigError) as caught:
                check_endpoints(config)
            self.assertEqual(caught.exception.key, key)

    def test_check_config_command(self) -> None:
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        good, bad = work / "good.yaml", work / "bad.yaml"
        good.write_text("listen: ['tcp:5000']\nhttp: {listen: ['tcp:8080:interface=127.0.0.1']}\nlog: {format: json}\n")
        bad.write_text("http: {listen: ['ssl:8443:privateKey=missing.pem:certKey=missing.pem']}\n")
        command = [sys.executable, "-c", "import sys; from camgateway.cli import main; sys.exit(main(sys.argv[1:]))"]
        ok = subprocess.run(command + ["--config", str(good), "check-config"], cwd=work, capture_output=True,
                            text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn("configuration OK", ok.stdout)
        self.assertIn("log_format: json", ok.stdout)
        failed = subprocess.run(command + ["--config", str(bad), "check-config"], cwd=work, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(failed.returncode, 2)
        self.assertIn("http.listen[0]", failed.stderr)
