"""The ``camgateway`` command: check a configuration, look at the outbox, retry dead letters.

    camgateway check-config [--config PATH]
    camgateway outbox [--config PATH]
    camgateway dead-letters [--config PATH]                 list them
    camgateway dead-letters --retry ID [ID ...] | --retry-all

A retried dead letter goes back into the outbox at the sink that refused it;
a running gateway picks it up within seconds (it polls the outbox).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from camgateway.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from camgateway.outbox import OutboxEntry
from camgateway.spool import Spool

__all__ = ["main", "dead_letters", "retry_dead_letter"]


def _config(path: Optional[str]) -> Config:
    explicit = path is not None
    return load_config(Path(path) if explicit else DEFAULT_CONFIG_PATH, explicit=explicit)


def dead_letters(spool: Spool) -> list[dict[str, Any]]:
    """Every dead letter, oldest first."""
    out = []
    if spool.dead.is_dir():
        for folder in sorted(spool.dead.iterdir()):
            info_path = folder / "dead-letter.json"
            if info_path.is_file():
                info = json.loads(info_path.read_text())
                info["id"] = folder.name
                out.append(info)
    return sorted(out, key=lambda i: i.get("time", 0))


def retry_dead_letter(spool: Spool, store: Any, letter_id: str, now: float) -> Any:
    """Put a dead letter back into the outbox (returns the store's Deferred)."""
    folder = spool.dead / letter_id
    info = json.loads((folder / "dead-letter.json").read_text())
    entry = OutboxEntry(**info["entry"])
    name = spool.new_name()
    os.link(folder / "file", spool.path(name))
    entry = OutboxEntry(entry.id, name, int(info["sink"]), 0, now, None, entry.record, entry.created)
    d = store.enqueue(entry, None)
    d.addCallback(lambda _: shutil.rmtree(folder))
    return d


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``camgateway`` command."""
    parser = argparse.ArgumentParser(prog="camgateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help=f"YAML configuration (default {DEFAULT_CONFIG_PATH} if present)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check-config", help="validate the configuration and print it")
    sub.add_parser("outbox", help="list files waiting for delivery")
    dead = sub.add_parser("dead-letters", help="list dead letters, or retry them")
    dead.add_argument("--retry", nargs="+", metavar="ID", help="put these dead letters back into the outbox")
    dead.add_argument("--retry-all", action="store_true", help="put every dead letter back into the outbox")
    args = parser.parse_args(argv)
    try:
        config = _config(args.config)
    except ConfigError as e:
        print(f"camgateway: configuration error: {e}", file=sys.stderr)
        return 2
    spool = Spool(config.spool)
    if args.command == "check-config":
        from camgateway.tap import config_report  # also checks every endpoint string and TLS key

        try:
            print("\n".join(config_report(config)))
        except ConfigError as e:
            print(f"camgateway: configuration error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "dead-letters" and not (args.retry or args.retry_all):
        letters = dead_letters(spool)
        for info in letters:
            record = info["entry"]["record"]
            print(f"{info['id']}  {_when(info['time'])}  {info['sink_name']}  camera {record.get('imei')}"
                  f" {record.get('source')} {record.get('size')} bytes: {info['reason']}")
        print(f"{len(letters)} dead letter(s) in {spool.dead}")
        return 0
    return _with_store(args, spool)


def _with_store(args: Any, spool: Spool) -> int:
    from twisted.internet import defer, task

    from camgateway.sqlite_store import SQLiteStore
    from camgateway.workers import worker_folders, worker_spool

    result = {"code": 0}

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        if args.command == "outbox":  # every worker's (see camgateway.workers)
            total = 0
            for index in [0, *worker_folders(spool.root)]:
                store = SQLiteStore(Spool(worker_spool(spool.root, index)).store_path, reactor)
                try:
                    entries = yield store.pending()
                finally:
                    yield store.close()
                for e in entries:
                    print(f"{e.id}  sink {e.sink}  attempts {e.attempts}  next {_when(e.next_attempt)}"
                          f"  camera {e.record.get('imei')} {e.record.get('source')}: {e.last_error or '-'}"
                          + (f"  (worker {index})" if index else ""))
                total += len(entries)
            print(f"{total} file(s) in the outbox")
            return
        store = SQLiteStore(spool.store_path, reactor)
        try:
            ids = [i["id"] for i in dead_letters(spool)] if args.retry_all else args.retry
            for letter_id in ids:
                if not (spool.dead / letter_id / "dead-letter.json").is_file():
                    print(f"no dead letter {letter_id}", file=sys.stderr)
                    result["code"] = 1
                    continue
                yield retry_dead_letter(spool, store, letter_id, reactor.seconds())
                print(f"{letter_id}: back in the outbox")
        finally:
            yield store.close()
        if result["code"]:
            raise SystemExit(result["code"])

    task.react(run, [])  # exits the process with run's outcome
    return result["code"]
