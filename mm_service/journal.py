"""The mm's durable journal: its view's ops in SQLite (WAL mode) in the run directory.

Every op the policy applies to its view is appended here (before or, for ops
recovery can re-derive, after it is applied: see ``policy``), one row per
batch (a msgpack array of ops), so a write is one statement, atomic by
itself; replaying the ops over the boot address map rebuilds the view after
``kill -9``. (Rows that hold a single op map, as earlier versions wrote them,
are read too.) WAL with ``synchronous=NORMAL`` survives the death
of the process (what we model); ``--fsync`` makes it survive power loss too.
The journal remembers which kernel boot it belongs to: a journal from an
earlier boot is set aside, not replayed, since that kernel's state is gone.

Compaction: a batch that starts with a ``snapshot`` op (the whole view, see
``View.snapshot``) replaces every op before it, in the same transaction, so
a crash at any moment leaves either the old ops or the snapshot, never a mix
and never neither.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Iterator

import msgpack


class Journal:
    def __init__(self, path: str, fsync: bool = False) -> None:
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

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def count(self) -> int:
        """Ops in the journal."""
        return sum(len(batch) for batch in self._batches())

    def append(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            return
        row = (msgpack.packb(ops, use_bin_type=True),)
        if ops[0].get("op") != "snapshot":
            self.db.execute("INSERT INTO ops (op) VALUES (?)", row)  # one statement: its own transaction
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

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        for (blob,) in self.db.execute("SELECT op FROM ops ORDER BY seq"):
            got = msgpack.unpackb(blob, raw=False, strict_map_key=False)
            yield got if isinstance(got, list) else [got]

    def replay(self) -> Iterator[dict[str, Any]]:
        for batch in self._batches():
            yield from batch

    def close(self) -> None:
        self.db.close()

    @classmethod
    def open_for_boot(cls, path: str, boot_id: str, fsync: bool = False) -> tuple["Journal", str | None]:
        """Open the journal for this kernel boot; a journal of another boot is renamed aside.
        Returns (journal, path the stale journal was moved to, or None)."""
        moved = None
        if os.path.exists(path):
            j = cls(path, fsync)
            old = j.meta("boot_id")
            if old is not None and old != boot_id:
                j.close()
                moved = f"{path}.stale-{int(time.time())}"
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.replace(path + suffix, moved + suffix)
            else:
                if old is None:
                    j.set_meta("boot_id", boot_id)
                return j, None
        j = cls(path, fsync)
        j.set_meta("boot_id", boot_id)
        return j, moved
