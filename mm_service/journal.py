"""The mm's durable journal: its view's records in SQLite (WAL mode) in the run directory.

Every record the policy applies to its view (``mm_service.records``) is
appended here in the order applied, one row per batch (a msgpack array of
records in their one wire form, ``records.encode``), so a write is one
statement, atomic by itself; replaying the records over the boot address map
rebuilds the view after ``kill -9``. WAL with ``synchronous=NORMAL`` survives
the death of the process (what we model); ``--fsync`` makes it survive power
loss too. The journal remembers which kernel boot it belongs to: a journal
from an earlier boot is set aside, not replayed, since that kernel's state is
gone. It also names its format (``records.JOURNAL_FORMAT``): a journal
written in another format (by an earlier mm) is refused with a message that
says so, never misread.

Compaction: a batch that starts with a ``snapshot`` op (the whole view, see
``View.snapshot``) replaces every op before it, in the same transaction, so
a crash at any moment leaves either the old ops or the snapshot, never a mix
and never neither.
"""

from __future__ import annotations

import os
import sqlite3
import time
from operator import attrgetter
from typing import Any, Callable, Iterator

import msgpack

from mm_service import records as J


def _encoder(cls: type) -> Callable[[Any], tuple]:
    """``records.encode`` for one record class, as a tuple (msgpack packs it as the same array): the tag, then
    the fields read by one ``attrgetter`` (about half the time of reading them one by one)."""
    head, names = (J.TAGS[cls],), J._FIELDS[cls]
    if len(names) == 1:
        get1 = attrgetter(names[0])
        return lambda rec: (*head, get1(rec))
    get = attrgetter(*names)
    return lambda rec: head + get(rec)


ENCODERS: dict[type, Callable[[Any], tuple]] = {cls: _encoder(cls) for cls in J.TAGS}


class JournalFormatError(RuntimeError):
    """The journal was written in a format this mm does not read."""


class Journal:
    def __init__(self, path: str, fsync: bool = False, check: bool = True) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # one mm per run directory (mm.lock) is the only user of its journal: exclusive locking keeps the
        # WAL index in the process's memory (no shared-memory file, fewer system calls per write)
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self.db.execute("CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY, op BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.appended = 0
        self._pack = msgpack.Packer(use_bin_type=True).pack  # (made once: packb makes one per call)
        self._insert = "INSERT INTO ops (op) VALUES (?)"
        if check:
            self.check_format()

    def check_format(self) -> None:
        """Refuse a journal in another format (JournalFormatError); mark an empty one as ours."""
        path = self.path
        fmt = self.meta("format")
        if fmt is None:
            if self.db.execute("SELECT 1 FROM ops LIMIT 1").fetchone() is not None:
                raise JournalFormatError(f"{path} holds a journal written by an earlier mm (format 1); this mm reads "
                                         f"format {J.JOURNAL_FORMAT}. Stop the system and start it afresh (or move "
                                         "the file aside: the mm then starts with an empty view)")
            self.set_meta("format", str(J.JOURNAL_FORMAT))
        elif fmt != str(J.JOURNAL_FORMAT):
            raise JournalFormatError(f"{path} holds a journal in format {fmt}; this mm reads format "
                                     f"{J.JOURNAL_FORMAT}")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def count(self) -> int:
        """Ops in the journal."""
        return sum(len(batch) for batch in self._batches())

    def append(self, ops: list[J.Record]) -> None:
        """Journal records in one transaction; a batch with a snapshot replaces everything before it."""
        if not ops:
            return
        snapshot = J.Snapshot
        for i in range(len(ops) - 1, -1, -1):
            if type(ops[i]) is snapshot:
                ops = ops[i:]  # (what came before it in the batch is in it too)
                break
        enc = ENCODERS
        row = (self._pack([enc[type(r)](r) for r in ops]),)  # (the bytes of records.encode's lists)
        if type(ops[0]) is not snapshot:
            self.db.execute(self._insert, row)  # one statement: its own transaction
        else:  # compaction: the snapshot replaces everything before it, in one transaction
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("DELETE FROM ops")
                self.db.execute("INSERT INTO ops (op) VALUES (?)", row)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        self.appended += len(ops)

    def _batches(self) -> Iterator[list[Any]]:
        for (blob,) in self.db.execute("SELECT op FROM ops ORDER BY seq"):
            yield msgpack.unpackb(blob, raw=False, strict_map_key=False)

    def replay(self) -> Iterator[J.Record]:
        for batch in self._batches():
            for item in batch:
                yield J.decode(item)

    def close(self) -> None:
        self.db.close()

    @classmethod
    def open_for_boot(cls, path: str, boot_id: str, fsync: bool = False) -> tuple["Journal", str | None]:
        """Open the journal for this kernel boot; a journal of another boot is renamed aside.
        Returns (journal, path the stale journal was moved to, or None)."""
        moved = None
        if os.path.exists(path):
            j = cls(path, fsync, check=False)
            old = j.meta("boot_id")
            if old is not None and old != boot_id:
                j.close()
                moved = f"{path}.stale-{int(time.time())}"
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.replace(path + suffix, moved + suffix)
            else:
                try:
                    j.check_format()
                except JournalFormatError:
                    j.close()
                    raise
                if old is None:
                    j.set_meta("boot_id", boot_id)
                return j, None
        j = cls(path, fsync)
        j.set_meta("boot_id", boot_id)
        return j, moved
