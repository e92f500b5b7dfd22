"""The seed database: what swarms ran, per version of the code and configuration, in one SQLite file.

``SeedDB(directory)`` opens (or makes) ``DIRECTORY/seeds.sqlite``. A
*configuration* is the code's version (``code_version``: ``git rev-parse
HEAD`` of the source tree, with ``+src-<hash>`` when its Python sources differ
from that commit; a hash of the package sources where there is no git) and a
``SwarmConfig`` (steps, mode, arch, memory, planted bug, ...); its id is a
hash of both. Per configuration the database keeps:

- ``ranges``: every range of seeds run (start, count, seeds run and failed,
  steps, client operations, CPU seconds, which worker) — passing seeds exist
  only as these counts; a range already recorded is never added twice, so
  running a swarm again, or merging the same file twice, counts nothing twice;
- ``range_probes``: the probes each range hit (hits, seeds);
- ``failing``: every failing seed with its fingerprint (``swarm.fingerprint``),
  step and message;
- ``fingerprints``: per fingerprint its parts, when it was first seen, the
  trace (zlib-compressed JSON lines, as ``mmsim sim --trace`` writes it) of its
  smallest failing seed, and the shrunk capsule when one was made.

Only the coordinating process writes (workers return summaries); ``merge``
folds in another database (the per-pod files of a Kubernetes job).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sqlite3
import subprocess
import time
import zlib
from typing import Any

from simulator.swarm import RangeResult, SwarmConfig

FILE = "seeds.sqlite"
SCHEMA = 1
PACKAGES = ("simulator", "kernel_server", "mm_service", "protocol", "clients")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS configs (id TEXT PRIMARY KEY, code TEXT NOT NULL, config TEXT NOT NULL, first_seen REAL);
CREATE TABLE IF NOT EXISTS ranges (config_id TEXT NOT NULL, start INTEGER NOT NULL, count INTEGER NOT NULL,
    done INTEGER, failed INTEGER, steps INTEGER, ops INTEGER, cpu REAL, wall REAL, worker TEXT, at REAL,
    PRIMARY KEY (config_id, start, count));
CREATE TABLE IF NOT EXISTS range_probes (config_id TEXT NOT NULL, start INTEGER NOT NULL, count INTEGER NOT NULL,
    name TEXT NOT NULL, hits INTEGER, seeds INTEGER, PRIMARY KEY (config_id, start, count, name));
CREATE TABLE IF NOT EXISTS failing (config_id TEXT NOT NULL, seed INTEGER NOT NULL, fingerprint TEXT NOT NULL,
    step INTEGER, message TEXT, PRIMARY KEY (config_id, seed));
CREATE TABLE IF NOT EXISTS fingerprints (config_id TEXT NOT NULL, fingerprint TEXT NOT NULL, invariant TEXT,
    site TEXT, message TEXT, first_seen REAL, trace_seed INTEGER, trace BLOB, capsule TEXT,
    PRIMARY KEY (config_id, fingerprint));
"""


def _root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1]


def source_hash() -> str:
    """SHA-256 (12 hex digits) of the project's Python sources (the packages that decide a run)."""
    h = hashlib.sha256()
    root = _root()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def code_version() -> str:
    """The commit (``git rev-parse HEAD``), with ``+src-<hash>`` if the sources differ from it; without git,
    ``src-<hash>`` of the sources."""
    root = _root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *PACKAGES], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip() if head else ""
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    if not head:
        return f"src-{source_hash()}"
    return f"{head}+src-{source_hash()}" if dirty else head


def config_id(code: str, config: SwarmConfig) -> str:
    doc = json.dumps({"code": code, "config": config.to_json()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class SeedDB:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, FILE)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.executescript(_TABLES)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
        got = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if got != str(SCHEMA):
            raise ValueError(f"{self.path} has seed database schema {got}; this mmsim reads schema {SCHEMA}")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SeedDB:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------------

    def config(self, code: str, config: SwarmConfig) -> str:
        cid = config_id(code, config)
        self.db.execute("INSERT OR IGNORE INTO configs VALUES (?, ?, ?, ?)",
                        (cid, code, json.dumps(config.to_json(), sort_keys=True), time.time()))
        self.db.commit()
        return cid

    def done_ranges(self, cid: str) -> list[tuple[int, int]]:
        """Ranges recorded in full (their every seed run)."""
        return [(s, n) for s, n in self.db.execute(
            "SELECT start, count FROM ranges WHERE config_id = ? AND done = count", (cid,))]

    def add_range(self, cid: str, r: RangeResult) -> bool:
        """Fold one range in (False: it was recorded already, nothing changes)."""
        cur = self.db.execute("INSERT OR IGNORE INTO ranges VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                              (cid, r.start, r.count, r.done, r.failed, r.steps, r.ops, r.cpu, r.wall, r.worker,
                               time.time()))
        if cur.rowcount == 0:
            return False
        self.db.executemany("INSERT INTO range_probes VALUES (?,?,?,?,?,?)",
                            [(cid, r.start, r.count, name, h, s) for name, (h, s) in r.probes.items()])
        for f in r.failures:
            fp = f["fingerprint"]
            self.db.execute("INSERT OR IGNORE INTO failing VALUES (?,?,?,?,?)",
                            (cid, f["seed"], fp["id"], f["step"], f["message"]))
            self.db.execute("INSERT OR IGNORE INTO fingerprints (config_id, fingerprint, invariant, site, message, "
                            "first_seen) VALUES (?,?,?,?,?,?)",
                            (cid, fp["id"], fp["invariant"], fp["site"], fp["message"], time.time()))
        self.db.commit()
        return True

    def traces_wanted(self, cid: str) -> list[tuple[str, int]]:
        """(fingerprint, smallest failing seed) of every fingerprint whose stored trace is not of that seed."""
        return list(self.db.execute(
            "SELECT f.fingerprint, MIN(s.seed) FROM fingerprints f JOIN failing s ON s.config_id = f.config_id AND "
            "s.fingerprint = f.fingerprint WHERE f.config_id = ? GROUP BY f.fingerprint "
            "HAVING f.trace_seed IS NULL OR f.trace_seed != MIN(s.seed)", (cid,)))

    def set_trace(self, cid: str, fp: str, seed: int, text: str) -> None:
        self.db.execute("UPDATE fingerprints SET trace_seed = ?, trace = ? WHERE config_id = ? AND fingerprint = ?",
                        (seed, zlib.compress(text.encode("ascii"), 6), cid, fp))
        self.db.commit()

    def set_capsule(self, cid: str, fp: str, capsule: dict[str, Any]) -> None:
        self.db.execute("UPDATE fingerprints SET capsule = ? WHERE config_id = ? AND fingerprint = ?",
                        (json.dumps(capsule), cid, fp))
        self.db.commit()

    def merge(self, other: str) -> dict[str, int]:
        """Fold in the database in directory (or file) ``other``: its configurations, the ranges this one has
        not recorded (with their probes and failing seeds), fingerprints, and traces of smaller seeds."""
        path = os.path.join(other, FILE) if os.path.isdir(other) else other
        if not os.path.exists(path):
            raise FileNotFoundError(f"no seed database at {path}")
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        added = {"ranges": 0, "seeds": 0, "failing": 0}
        try:
            for row in src.execute("SELECT * FROM configs"):
                self.db.execute("INSERT OR IGNORE INTO configs VALUES (?,?,?,?)", row)
            for row in src.execute("SELECT * FROM ranges"):
                cid, start, count = row[:3]
                cur = self.db.execute("INSERT OR IGNORE INTO ranges VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                if cur.rowcount == 0:
                    continue
                added["ranges"] += 1
                added["seeds"] += row[3]
                self.db.executemany("INSERT OR IGNORE INTO range_probes VALUES (?,?,?,?,?,?)", src.execute(
                    "SELECT * FROM range_probes WHERE config_id = ? AND start = ? AND count = ?", (cid, start, count)))
                fails = list(src.execute("SELECT * FROM failing WHERE config_id = ? AND seed >= ? AND seed < ?",
                                         (cid, start, start + count)))
                self.db.executemany("INSERT OR IGNORE INTO failing VALUES (?,?,?,?,?)", fails)
                added["failing"] += len(fails)
            for row in src.execute("SELECT * FROM fingerprints"):
                self.db.execute("INSERT OR IGNORE INTO fingerprints VALUES (?,?,?,?,?,?,?,?,?)", row)
                cid, fp, trace_seed, trace, capsule = row[0], row[1], row[6], row[7], row[8]
                if trace is not None:
                    self.db.execute("UPDATE fingerprints SET trace_seed = ?, trace = ? WHERE config_id = ? AND "
                                    "fingerprint = ? AND (trace_seed IS NULL OR trace_seed > ?)",
                                    (trace_seed, trace, cid, fp, trace_seed))
                if capsule is not None:
                    self.db.execute("UPDATE fingerprints SET capsule = ? WHERE config_id = ? AND fingerprint = ? AND "
                                    "capsule IS NULL", (capsule, cid, fp))
            self.db.commit()
        finally:
            src.close()
        return added

    # ---- reading -------------------------------------------------------------------------------

    def trace(self, cid: str, fp: str) -> tuple[int, str] | None:
        row = self.db.execute("SELECT trace_seed, trace FROM fingerprints WHERE config_id = ? AND fingerprint = ?",
                              (cid, fp)).fetchone()
        if row is None or row[1] is None:
            return None
        return int(row[0]), zlib.decompress(row[1]).decode("ascii")

    def report(self, declared: Any = None) -> list[dict[str, Any]]:
        """Per configuration: seeds run and failed, fingerprints (count, first and smallest seed, the replay
        command, whether a trace and a capsule are stored), probes hit and never hit (of ``declared``)."""
        out = []
        for cid, code, cfg_text, first_seen in self.db.execute("SELECT * FROM configs ORDER BY first_seen"):
            cfg = SwarmConfig.from_json(json.loads(cfg_text))
            seeds, failed, steps, ops, cpu, nranges = self.db.execute(
                "SELECT COALESCE(SUM(done),0), COALESCE(SUM(failed),0), COALESCE(SUM(steps),0), "
                "COALESCE(SUM(ops),0), COALESCE(SUM(cpu),0), COUNT(*) FROM ranges WHERE config_id = ?",
                (cid,)).fetchone()
            fps = []
            for fp, inv, site, msg, trace_seed, has_capsule in self.db.execute(
                    "SELECT fingerprint, invariant, site, message, trace_seed, capsule IS NOT NULL FROM fingerprints "
                    "WHERE config_id = ?", (cid,)):
                count, smallest = self.db.execute("SELECT COUNT(*), MIN(seed) FROM failing WHERE config_id = ? AND "
                                                  "fingerprint = ?", (cid, fp)).fetchone()
                first, example = self.db.execute("SELECT seed, message FROM failing WHERE config_id = ? AND "
                                                 "fingerprint = ? ORDER BY rowid LIMIT 1", (cid, fp)).fetchone()
                fps.append({"fingerprint": fp, "invariant": inv, "site": site, "message": msg, "count": count,
                            "first_seed": first, "smallest_seed": smallest, "example": example,
                            "replay": cfg.replay_command(smallest), "trace_seed": trace_seed,
                            "capsule": bool(has_capsule)})
            fps.sort(key=lambda f: (-f["count"], f["fingerprint"]))
            hits = {name: [h, s] for name, h, s in self.db.execute(
                "SELECT name, SUM(hits), SUM(seeds) FROM range_probes WHERE config_id = ? GROUP BY name", (cid,))}
            doc: dict[str, Any] = {"config_id": cid, "code": code, "config": cfg.to_json(), "ranges": nranges,
                                   "seeds": seeds, "failed": failed, "steps": steps, "client_ops": ops,
                                   "cpu_seconds": round(cpu, 3), "fingerprints": fps, "probes": hits}
            if declared is not None:
                doc["probes_never_hit"] = [n for n in declared if not hits.get(n, [0])[0]]
                doc["probes_undeclared"] = sorted(n for n in hits if n not in declared)
            out.append(doc)
        return out
