"""Dead letters: the files a sink refused, listed and sent again to that sink.

A dead letter is a folder ``<spool>/dead/<entry id>-<sink index>/`` with the
file (``file``, missing when no instance had it) and ``dead-letter.json``
(written by :func:`camgateway.delivery.outbox.write_dead_letter`). The
``camgateway dead-letters`` command and the status API's
``POST /api/dead-letters/<id>/retry`` share what is here: a retried letter
goes back into the outbox for the sink that refused it (found by its name),
and only that sink, since the file went on along the chain when it was refused.

The functions that read or change files block: the gateway runs them in a
thread (:func:`prepare_retry`, :func:`forget_letter`); the store's
``enqueue`` is called on the reactor thread in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Optional, Sequence

from camgateway.base.units import iso
from camgateway.delivery.outbox import RETRY
from camgateway.storage.records import OutboxEntry

__all__ = ["DeadLetterError", "NoSuchLetter", "dead_letters", "read_letter", "prepare_retry", "forget_letter",
           "retry_dead_letter", "retry_id", "valid_letter_id"]

#: The names of dead-letter folders (``<entry id>-<sink index>``, or older letters' entry ids).
_LETTER_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")


class DeadLetterError(Exception):
    """A dead letter that cannot be retried as asked (the message says why)."""


class NoSuchLetter(DeadLetterError):
    """No dead letter has this id."""


def valid_letter_id(letter_id: str) -> bool:
    """Whether ``letter_id`` can name a dead-letter folder (never a path elsewhere)."""
    return _LETTER_ID.fullmatch(letter_id) is not None and letter_id not in (".", "..")


def _time(value: Any) -> Optional[str]:
    """A dead letter's time as ISO 8601 UTC (older letters hold seconds since the epoch)."""
    return iso(float(value)) if isinstance(value, (int, float)) else value


def _load(dead: Any, letter_id: str) -> dict[str, Any]:
    """A dead letter's ``dead-letter.json`` as written (blocking); :class:`NoSuchLetter` when there is none."""
    if not valid_letter_id(letter_id):
        raise NoSuchLetter(f"no dead letter {letter_id!r}")
    try:
        with open(os.path.join(dead, letter_id, "dead-letter.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise NoSuchLetter(f"no dead letter {letter_id!r}") from None


def read_letter(dead: Any, letter_id: str) -> dict[str, Any]:
    """One dead letter's ``dead-letter.json`` with its ``id``, ISO times and attempts (blocking).

    :class:`NoSuchLetter` when there is none of that id.
    """
    info = _load(dead, letter_id)
    info["id"] = letter_id
    info["time"] = _time(info.get("time"))
    entry = info.get("entry", {})
    info.setdefault("attempts", entry.get("attempts", 0) + 1)  # (older letters)
    for key in ("next_attempt", "created"):
        if key in entry:
            entry[key] = _time(entry[key])
    return info


def dead_letters(spool: Any) -> list[dict[str, Any]]:
    """Every dead letter, oldest first: its ``dead-letter.json`` and its ``id`` (the folder's name) (blocking)."""
    out = []
    if spool.dead.is_dir():
        for folder in sorted(spool.dead.iterdir()):
            if (folder / "dead-letter.json").is_file():
                try:
                    out.append(read_letter(spool.dead, folder.name))
                except NoSuchLetter:  # (retried meanwhile)
                    continue
    return sorted(out, key=lambda i: i.get("time") or "")


def _refusing_sink(info: dict[str, Any], names: Optional[Sequence[str]]) -> int:
    """The index, in the chain configured now, of the sink that refused a dead letter."""
    index, name = int(info["sink"]), info.get("sink_name")
    if names is None:
        return index
    if isinstance(name, str) and name in names:
        return list(names).index(name)
    if "attempts" not in info and 0 <= index < len(names):  # written before sinks had names
        return index
    raise DeadLetterError(f"refused by sink {name!r}, which the configuration no longer has"
                          f" (sinks: {', '.join(names)}): give that sink its name again to retry")


def retry_id(letter_id: str) -> str:
    """The outbox entry id of a retried letter: the same if it is retried again after a crash (one entry)."""
    return hashlib.blake2b(f"{letter_id}/retry".encode(), digest_size=16).hexdigest()


def prepare_retry(spool: Any, letter_id: str, now: float, names: Optional[Sequence[str]] = None) -> OutboxEntry:
    """The outbox entry that sends a dead letter again, its file linked into the spool (blocking).

    ``names`` are the configured sinks' names: the refusing sink is found by
    its name (else by its index). The file keeps its id; the entry's record
    carries :data:`~camgateway.delivery.outbox.RETRY`, so it ends at that sink.
    :class:`NoSuchLetter` for an unknown id, :class:`DeadLetterError` when
    the letter's file was lost or its sink is no longer configured.
    """
    info = _load(spool.dead, letter_id)
    folder = spool.dead / letter_id
    if not (folder / "file").is_file():
        raise DeadLetterError(f"its file was lost (no instance had it): only its record is kept in {folder}")
    index = _refusing_sink(info, names)
    entry = info["entry"]
    record = dict(entry["record"])
    record["id"] = record.get("id") or entry["id"]
    record[RETRY] = {"sink": index, "sink_name": info.get("sink_name")}
    name = spool.new_name()
    os.link(folder / "file", spool.path(name))
    return OutboxEntry(retry_id(letter_id), name, index, 0, now, None, record, now)


def forget_letter(spool: Any, letter_id: str) -> None:
    """Remove a retried dead letter's folder (blocking)."""
    shutil.rmtree(spool.dead / letter_id, ignore_errors=True)


def retry_dead_letter(spool: Any, store: Any, letter_id: str, now: float,
                      names: Optional[Sequence[str]] = None) -> Any:
    """Put a dead letter back into the outbox for the sink that refused it, only (returns the store's Deferred).

    The file work runs here, on the calling thread (see :func:`prepare_retry`).
    """
    entry = prepare_retry(spool, letter_id, now, names)
    d = store.enqueue(entry, None)
    d.addCallback(lambda _: forget_letter(spool, letter_id))
    return d
