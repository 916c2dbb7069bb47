"""The camgateway command: check a configuration, look at the outbox, retry dead letters.

  check-config                        validate the configuration and print it
  outbox [--json]                     list the files waiting for a sink
  dead-letters [--json]               list the files a sink refused, with the reasons
  dead-letters --retry ID [ID ...]    send these again to the sink that refused them
  dead-letters --retry-all            send every dead letter again

A retried dead letter goes back into the outbox for the sink that refused it
(found by its name), and only that sink: the file went on along the chain
when it was refused. A running gateway picks it up within seconds (it polls
the outbox).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from camgateway import __version__
from camgateway.delivery.dead_letters import DeadLetterError, NoSuchLetter, dead_letters, retry_dead_letter
from camgateway.runtime.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from camgateway.transfer.spool import Spool

__all__ = ["main", "dead_letters", "retry_dead_letter", "DeadLetterError"]


def _config(path: Optional[str]) -> Config:
    explicit = path is not None
    return load_config(Path(path) if path is not None else DEFAULT_CONFIG_PATH, explicit=explicit)


def _when(t: Optional[str]) -> str:
    """An ISO time, shorter, for the text listings."""
    if not t:
        return "-"
    moment = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _parser() -> argparse.ArgumentParser:
    summary, _, rest = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(prog="camgateway", usage="%(prog)s [-h] [--version] [--config PATH] COMMAND ...",
                                     description=summary, epilog="commands:\n" + rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_help = f"YAML configuration (default {DEFAULT_CONFIG_PATH} if present)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    parser.add_argument("--version", action="version", version=f"camgateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)
    commands = (("check-config", "validate the configuration and print it"),
                ("outbox", "list the files waiting for a sink"),
                ("dead-letters", "list the files a sink refused, or retry them"))
    made = {}
    for name, text in commands:
        made[name] = sub.add_parser(name, help=text, description=text)
        made[name].add_argument("--config", metavar="PATH", help=config_help, default=argparse.SUPPRESS)
    for name in ("outbox", "dead-letters"):
        made[name].add_argument("--json", action="store_true", help="print JSON (a list of objects)")
    dead = made["dead-letters"]
    dead.add_argument("--retry", nargs="+", metavar="ID",
                      help="send these dead letters again to the sink that refused them")
    dead.add_argument("--retry-all", action="store_true", help="send every dead letter again")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``camgateway`` command."""
    args = _parser().parse_args(argv)
    try:
        config = _config(args.config)
    except ConfigError as e:
        print(f"camgateway: configuration error: {e}", file=sys.stderr)
        return 2
    spool = Spool(config.spool)
    if args.command == "check-config":
        from camgateway.runtime.tap import config_report  # also checks every endpoint string and TLS key

        try:
            print("\n".join(config_report(config)))
        except ConfigError as e:
            print(f"camgateway: configuration error: {e}", file=sys.stderr)
            return 2
        return 0
    if not spool.root.is_dir():
        print(f"camgateway: no spool at {spool.root} (storage.spool of {config.source}): nothing was received"
              " with this configuration; is --config the gateway's?", file=sys.stderr)
        return 2
    if args.command == "dead-letters" and not (args.retry or args.retry_all):
        letters = dead_letters(spool)
        if args.json:
            print(json.dumps(letters, indent=2))
            return 0
        for info in letters:
            record = info["entry"]["record"]
            print(f"{info['id']}  {_when(info['time'])}  {info['sink_name']}  camera {record.get('imei')}"
                  f" {record.get('source')} {record.get('size')} bytes, {info['attempts']} attempt(s):"
                  f" {info['reason']}")
        print(f"{len(letters)} dead letter(s) in {spool.dead}")
        return 0
    return _with_store(args, config, spool)


def _open_store(config: Config, spool: Spool, reactor: Any) -> Any:
    """The outbox's store: the spool's SQLite file, or the Redis of several instances."""
    if config.resume == "sqlite":
        from camgateway.storage.sqlite import SQLiteStore

        return SQLiteStore(spool.store_path, reactor)
    from camgateway.storage.redis import RedisStore

    return RedisStore(config.resume, reactor, instance=f"camgateway-cli-{os.getpid()}",
                      claim_ttl=config.outbox_claim_ttl)


def _with_store(args: Any, config: Config, spool: Spool) -> int:
    from twisted.internet import defer, task

    from camgateway.delivery.sinks.registry import sink_names
    from camgateway.web.views import outbox_view
    from camgateway.runtime.workers import worker_folders, worker_spool

    names = sink_names(config.sinks)
    sinks = [SimpleNamespace(name=name) for name in names]  # (what outbox_view reads of a sink)
    result = {"code": 0}

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        if args.command == "outbox":  # every worker's (see camgateway.runtime.workers)
            listed = []
            workers = [0, *worker_folders(spool.root)] if config.resume == "sqlite" else [0]
            for index in workers:
                worker = Spool(worker_spool(spool.root, index))
                if config.resume == "sqlite" and not worker.store_path.exists():
                    continue  # (made by the gateway when it starts)
                store = _open_store(config, worker, reactor)
                try:
                    entries = yield store.pending()
                finally:
                    yield store.close()
                for e in entries:
                    view = outbox_view(e, sinks, ())
                    view.pop("in_flight", None)  # (only the gateway knows)
                    view["worker"] = index
                    listed.append(view)
            if args.json:
                print(json.dumps(listed, indent=2))
                return
            for view in listed:
                print(f"{view['id']}  sink {view['sink']}  attempts {view['attempts']}"
                      f"  next {_when(view['next_attempt'])}"
                      f"  camera {view['imei']} {view['source']}: {view['last_error'] or '-'}"
                      + (f"  (worker {view['worker']})" if view["worker"] else ""))
            print(f"{len(listed)} file(s) in the outbox")
            return
        store = _open_store(config, spool, reactor)
        try:
            ids = [i["id"] for i in dead_letters(spool)] if args.retry_all else args.retry
            for letter_id in ids:
                try:
                    yield retry_dead_letter(spool, store, letter_id, reactor.seconds(), names)
                except DeadLetterError as e:
                    why = (f"no dead letter {letter_id} in {spool.dead}" if isinstance(e, NoSuchLetter)
                           else f"{letter_id}: {e}")
                    print(f"camgateway: {why}", file=sys.stderr)
                    result["code"] = 1
                    continue
                print(f"{letter_id}: back in the outbox")
        finally:
            yield store.close()
        if result["code"]:
            raise SystemExit(result["code"])

    task.react(run, [])  # exits the process with run's outcome
    return result["code"]
