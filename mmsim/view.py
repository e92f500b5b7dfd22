"""``mmsim view``: one self-contained HTML page of the frames over time (and its recorder).

The page (``mmsim/viewer/``: HTML, CSS and JavaScript, inlined; nothing is
fetched from the network) shows a frame grid that zooms from all of RAM down
to single 4 KiB frames (a canvas that draws only what is visible), ordered by
frame number in tiles of one large-page block (the mm's pageblock) each, large
pages outlined; each frame coloured by its owner (kernel free / used / shared,
each client, user free, not RAM) with a glyph or pattern too, shared frames
striped by reference count; side panels with the free blocks per order and
the fragmentation index (``mmsim.figures``), per-process charges, the kernel
pool against the mm's watermarks over time; a time scrubber over the recorded
snapshots with the calls and faults between them; an overlay of the frames
where the mm's view and the kernel's disagree.

Sources:

- a running system: ``mmsim view --run-dir RUN`` asks it now, as the run's
  ``operator`` (the kernel's ``hello``, ``stats`` with the per-process listing,
  ``frame_info`` over all frames, ``mappings`` of every process over its user
  space, ``events``; the mm's ``stats`` and ``audit``);
- a finished run: ``mmsim up`` and ``mmsim chaos`` record a snapshot about
  every second (``Recording``, a background thread with its own operator
  connections) into ``RUN/view.history`` and leave ``RUN/view.html`` at the
  end; ``mmsim view --run-dir RUN`` rebuilds the page from the history when
  the system is gone;
- a simulator run, through ``Recorder`` (below).

Recorder API (for the simulator; the same recorder serves the live runs)::

    from mmsim.view import Recorder
    rec = Recorder(title="sim seed 7")               # or Recorder(history="RUN/view.history")
    rec.snapshot("step 120", t, kernel_service,      # an in-process KernelService (or a call function)
                 mm_view=mm.view,                    # the mm's View: disagreements are computed from it
                 mm_stats=mm.stats(),                # optional: watermarks, counters
                 events=["map pid 3 ...", ...],      # the calls and faults since the last snapshot
                 violation="I4: ..." or None,        # marks the snapshot (the page can jump to the first)
                 names={key: "client-0"})            # optional names of process keys
    rec.note("kill -9 the mm")                       # an event for the next snapshot
    rec.write("trace-7.view.html")                   # the page; returns its size in bytes

``snapshot`` reads the kernel only through its wire-level calls (``svc.call(identity,
"frame_info", ...)`` as the operator, or the mm if the kernel has no operator key) and
changes nothing: the kernel's call counters are put back as they were, so a seed
replayed with a recorder behaves as it did without one. A failing seed writes its page
beside its trace by replaying with a ``Recorder`` and calling ``write``.

Data format (``FORMAT`` 1), in the page as one JSON object and in the history file as
a msgpack stream of the same records (``{"type": "header"}``, then one
``{"type": "snap"}`` a snapshot; a cut-off last record is ignored):

- header: title, source, arch, frames, page_size, large_page_sizes, pageblock
  (frames), max_order, the code names and colours;
- ``owners``: every process the recording saw, ``{key, pid, name, label}``; a user frame
  mapped by owner i has code ``OWNER_BASE + i`` (codes below: ``figures``);
- each snapshot: ``who`` (one uint16 code per frame) and ``refs`` (uint8 per frame, the
  kernel's reference count, 255 meaning 255 or more), each as the XOR with the previous
  snapshot's array (the first with zeros), sent as ranges: uint32 count, then (gap,
  length) uint32 pairs in elements (gap: from the end of the previous range, or from 0),
  then the XOR bytes of the ranges, little-endian, the
  whole deflated (raw deflate) and base64 in the page; the browser inflates with
  ``DecompressionStream('deflate-raw')``, and since XOR undoes itself the same record
  steps back as well as forward. Then the figures (counts, free blocks per order,
  fragmentation index, per-process charges, pool and watermarks, mm counters, audit),
  ``large`` pages ``[first, pages, owner]``, ``sharers`` (further owners of shared frames
  ``[first, count, owner]``), ``disagree`` runs ``[first, count, class]``, ``events``,
  ``violation``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Optional

import msgpack
import numpy as np

from mmsim import figures as F
from protocol import PAGE_SHIFT, PAGE_SIZE
from protocol.errors import CallError, Error

FORMAT = 1
HISTORY = "view.history"  # in the run directory
PAGE_NAME = "view.html"  # in the run directory
DISAGREE_CLASSES = ("free_but_kernel", "kernel_but_user", "owner_mismatch", "free_but_mapped", "refs_differ")
DISAGREE_TEXT = {
    "free_but_kernel": "free in the mm's view, the kernel's own",
    "kernel_but_user": "the kernel's in the mm's view, user-owned in the kernel",
    "owner_mismatch": "owner differs (RAM or not; in use but the kernel's)",
    "free_but_mapped": "free in the mm's view, mapped in the kernel",
    "refs_differ": "reference counts differ",
}
MAX_RUNS_KEPT = 4096  # disagreement and sharer runs kept per snapshot
MAPPINGS_SEGMENTS = 16384
VIEWER_DIR = os.path.join(os.path.dirname(__file__), "viewer")
VIEW_HELP = ("Write one self-contained HTML page of the frames (zoomable grid, free blocks per order, "
             "fragmentation, per-process charges, watermarks, disagreements, time scrubber) from a running "
             "system or from the history a finished run left in its run directory.")

Call = Callable[[str, dict], dict]


def inprocess_call(svc: Any, identity: str | None = None) -> Call:
    """A call function on an in-process ``KernelService``, as the operator (or the mm when the kernel
    has no operator key); a refusal raises ``CallError`` as over the wire."""
    who = identity or svc.core.operator_key or svc.core.mm_key

    def call(name: str, args: dict | None = None) -> dict:
        r = svc.call(who, name, args or {})
        if isinstance(r, Error):
            raise CallError(r, name)
        return r

    return call


# ---- collecting one moment -----------------------------------------------------------------------

def _kernel_state(kcall: Call, hello: dict) -> dict[str, Any]:
    from mmsim.picture import frame_table, kernel_stats

    kstats = kernel_stats(kcall)
    n = int(kstats["frames"])
    kind, refs = F.kernel_arrays(n, frame_table(kcall, n))
    maps: dict[int, list[list]] = {}
    top = int(hello.get("user_top", 0xC000_0000)) >> PAGE_SHIFT
    for p in kstats.get("per_process", []):
        segs: list[list] = []
        vaddr = 0
        try:
            while vaddr is not None:
                r = kcall("mappings", {"pid": p["pid"], "vaddr": vaddr, "pages": top - (vaddr >> PAGE_SHIFT),
                                       "max_segments": MAPPINGS_SEGMENTS})
                segs.extend(r["segments"])
                vaddr = r["rest"]
        except CallError as exc:
            if exc.name != "ESRCH":  # the process went away meanwhile: its frames show as owner unknown
                raise
        maps[p["pid"]] = segs
    return {"kstats": kstats, "kind": kind, "refs": refs, "maps": maps}


def _disagreements(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    from protocol import runs as R

    out: list[list[int]] = []
    for ci, name in enumerate(DISAGREE_CLASSES):
        a = arrays.get(name)
        if a is not None and a.size:
            out.extend([f, c, ci] for f, c in R.from_array(np.sort(a)))
    out.sort()
    return out[:MAX_RUNS_KEPT]


def _audit_of_view(mm_view: Any, kind: np.ndarray, refs: np.ndarray) -> dict[str, Any]:
    """The mm's ``View.compare`` against the kernel's arrays (0 none, 1 kernel, 2 user)."""
    kinds = np.where(kind == F.NOT_RAM, 0, np.where(kind == F.U_FREE, 2, 1)).astype(np.uint8)
    rep = mm_view.compare(kinds, refs)
    return {"divergences": rep["divergences"], "class_counts": rep["class_counts"],
            "pending": len(getattr(mm_view, "pending", {})), "runs": _disagreements(rep["arrays"]),
            "complete": True}


def _audit_of_report(report: dict[str, Any]) -> dict[str, Any]:
    """The mm's ``audit`` reply (it names at most the first 32 runs of each class)."""
    runs: list[list[int]] = []
    for ci, name in enumerate(DISAGREE_CLASSES):
        for f, c in report.get("classes", {}).get(name, []):
            runs.append([int(f), int(c), ci])
    runs.sort()
    return {"divergences": int(report.get("divergences", 0)), "class_counts": report.get("class_counts", {}),
            "pending": report.get("pending", 0), "runs": runs[:MAX_RUNS_KEPT], "complete": False}


# ---- encoding ------------------------------------------------------------------------------------

def xor_ranges(prev: np.ndarray, new: np.ndarray, gap: int = 16) -> bytes:
    """The XOR of ``new`` with ``prev`` where they differ, as ranges (see the module docstring),
    deflated. Ranges closer than ``gap`` elements merge."""
    d = np.bitwise_xor(prev, new)
    nz = np.flatnonzero(d)
    if nz.size == 0:
        starts = lens = np.zeros(0, dtype=np.int64)
    elif nz.size > d.size // 4:
        starts, lens = np.array([0]), np.array([d.size])
    else:
        cut = np.flatnonzero(np.diff(nz) > gap) + 1
        starts = nz[np.concatenate(([0], cut))]
        ends = nz[np.concatenate((cut - 1, [nz.size - 1]))] + 1
        lens = ends - starts
    head = np.empty(1 + 2 * starts.size, dtype="<u4")
    head[0] = starts.size
    head[1::2] = starts - np.concatenate(([0], (starts + lens)[:-1]))  # the gap since the previous range's end
    head[2::2] = lens
    if starts.size == 1 and lens[0] == d.size:
        payload = d.astype(d.dtype.newbyteorder("<"), copy=False).tobytes()
    elif starts.size:
        idx = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(int(lens.sum()))
        payload = d[idx].astype(d.dtype.newbyteorder("<"), copy=False).tobytes()
    else:
        payload = b""
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    return z.compress(head.tobytes() + payload) + z.flush()


def apply_xor(target: np.ndarray, blob: bytes) -> None:
    """Apply one ``xor_ranges`` record to ``target`` in place (forward or back: XOR undoes itself)."""
    raw = zlib.decompress(blob, -15)
    m = int(np.frombuffer(raw, dtype="<u4", count=1)[0])
    pairs = np.frombuffer(raw, dtype="<u4", count=2 * m, offset=4).astype(np.int64)
    payload = np.frombuffer(raw, dtype=target.dtype.newbyteorder("<"), offset=4 + 8 * m)
    pos = end = 0
    for gap, n in zip(pairs[0::2].tolist(), pairs[1::2].tolist()):
        s = end + gap
        target[s:s + n] ^= payload[pos:pos + n].astype(target.dtype)
        pos += n
        end = s + n


class Recorder:
    """Snapshots of one system, encoded as they come (the previous arrays are kept to diff against);
    ``write`` makes the page. With ``history``, every record is also appended to that file at once."""

    def __init__(self, title: str = "mmsim", source: str = "", history: str | None = None,
                 names: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> None:
        self.title, self.source = title, source
        self.history = history
        self.names = names if names is not None else {}  # process key -> name (a key pair's)
        self.labels = labels if labels is not None else {}  # name -> what it runs
        self.header: dict[str, Any] | None = None
        self.owners: list[dict[str, Any]] = []
        self._owner_ix: dict[tuple[str, int], int] = {}
        self.snaps: list[dict[str, Any]] = []
        self._who: np.ndarray | None = None
        self._refs: np.ndarray | None = None
        self._last: dict[str, Any] | None = None  # the previous snapshot's figures (for event summaries)
        self._notes: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    # ---- input ---------------------------------------------------------------------------------

    def note(self, text: str, violation: bool = False) -> None:
        """An event (a call, a fault) shown with the next snapshot; ``violation`` marks that snapshot."""
        with self._lock:
            self._notes.append((str(text), bool(violation)))

    def snapshot(self, label: str, time: float, kernel: Any, mm_view: Any = None, events: Iterable[str] = (),
                 violation: str | None = None, mm_stats: dict[str, Any] | None = None,
                 names: dict[str, str] | None = None) -> dict[str, Any]:
        """Record the system now (see the module docstring). ``kernel``: an in-process
        ``KernelService`` or a call function; returns the snapshot's figures."""
        svc = kernel if hasattr(kernel, "core") and hasattr(kernel, "call") else None
        kcall = inprocess_call(svc) if svc is not None else kernel
        counters = (svc.calls, svc.refused) if svc is not None else None
        try:
            hello = kcall("hello", {})
            st = _kernel_state(kcall, hello)
        finally:
            if svc is not None:
                svc.calls, svc.refused = counters
        if names:
            self.names.update(names)
        audit = _audit_of_view(mm_view, st["kind"], st["refs"]) if mm_view is not None else None
        return self.add(label, time, hello, st, mm_stats=mm_stats, audit=audit, events=list(events),
                        violation=violation)

    def add(self, label: str, t: float, hello: dict[str, Any], st: dict[str, Any], *,
            mm_stats: dict[str, Any] | None = None, mm_error: str = "", audit: dict[str, Any] | None = None,
            events: list[str] | None = None, violation: str | None = None) -> dict[str, Any]:
        """Encode one moment: ``st`` as ``_kernel_state`` gathers it."""
        kstats, kind, refs, maps = st["kstats"], st["kind"], st["refs"], st["maps"]
        n = int(kind.size)
        if self.header is None:
            self._start(hello, n)
        elif n != self.header["frames"]:
            raise ValueError(f"the system now has {n} frames, not {self.header['frames']}: a new recording is needed")
        who, large, sharers, new_owners, per_owner = self._owners_of(kind, refs, kstats, maps)
        refs8 = np.minimum(refs, 255).astype(np.uint8)
        prev_who = self._who if self._who is not None else np.zeros(n, dtype=np.uint16)
        prev_refs = self._refs if self._refs is not None else np.zeros(n, dtype=np.uint8)
        rec = self._figures(label, t, kind, refs, kstats, mm_stats, mm_error, audit, per_owner)
        rec["large"], rec["sharers"] = large, sharers
        rec["counts"]["owner_unknown"] = int(np.count_nonzero(who == F.U_UNKNOWN))
        with self._lock:
            notes, self._notes = self._notes, []
        rec["events"] = self._summary(rec) + [text for text, _ in notes] + list(events or [])
        bad = [text for text, v in notes if v]
        rec["violation"] = violation or (bad[0] if bad else None)
        rec["new_owners"] = new_owners
        rec["who"] = xor_ranges(prev_who, who)
        rec["refs"] = xor_ranges(prev_refs, refs8)
        self._who, self._refs = who, refs8
        self._last = rec
        self.snaps.append(rec)
        self._append({"type": "snap", **rec})
        return rec

    def _start(self, hello: dict[str, Any], n: int) -> None:
        sizes = [int(s) for s in hello.get("large_page_sizes") or []]
        pb = F.pageblock_order(sizes)
        self.header = {
            "type": "header", "format": FORMAT, "title": self.title, "source": self.source,
            "arch": hello.get("arch", "?"), "frames": n, "page_size": PAGE_SIZE, "large_page_sizes": sizes,
            "pageblock": 1 << pb, "pageblock_order": pb, "max_order": F.max_order(sizes),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if self.history:
            os.makedirs(os.path.dirname(os.path.abspath(self.history)), exist_ok=True)
            with open(self.history, "wb"):
                pass
        self._append(self.header)

    def _append(self, record: dict[str, Any]) -> None:
        if self.history:
            with open(self.history, "ab") as f:
                f.write(msgpack.packb(record, use_bin_type=True))

    def _owner(self, key: str, pid: int, new: list[dict[str, Any]]) -> int:
        ix = self._owner_ix.get((key, pid))
        if ix is None:
            if len(self.owners) >= F.MAX_OWNERS:
                return -1
            ix = len(self.owners)
            name = self.names.get(key, key[:8] + "…")
            o = {"key": key, "pid": pid, "name": name, "label": self.labels.get(name, "")}
            self.owners.append(o)
            self._owner_ix[(key, pid)] = ix
            new.append(o)
        return ix

    def _owners_of(self, kind: np.ndarray, refs: np.ndarray, kstats: dict[str, Any],
                   maps: dict[int, list[list]]) -> tuple[np.ndarray, list, list, list, dict[int, int]]:
        """Per-frame codes (each mapped user frame: its first mapper by pid), large pages, further
        mappers of shared frames, owners first seen now, frames per owner."""
        who = kind.astype(np.uint16)
        user_mapped = (kind == F.U_FREE) & (refs > 0)
        who[user_mapped] = F.U_UNKNOWN
        large: list[list[int]] = []
        sharers: list[list[int]] = []
        new: list[dict[str, Any]] = []
        for p in sorted(kstats.get("per_process", []), key=lambda p: p["pid"]):
            ix = self._owner(p["key"], p["pid"], new)
            if ix < 0:
                continue
            code = F.OWNER_BASE + ix
            for _vaddr, pages, first, _prot, _by, page_size in maps.get(p["pid"], []):
                sl = who[first:first + pages]
                if page_size > PAGE_SIZE:
                    large.append([first, pages, ix])
                unknown = sl == F.U_UNKNOWN
                sl[unknown] = code
                other = (sl >= F.OWNER_BASE) & (sl != code) & ~unknown
                if other.any() and len(sharers) < MAX_RUNS_KEPT:
                    idx = np.flatnonzero(other)
                    cut = np.flatnonzero(np.diff(idx) != 1) + 1
                    for a, b in zip(np.concatenate(([0], cut)).tolist(), np.concatenate((cut, [idx.size])).tolist()):
                        sharers.append([first + int(idx[a]), b - a, ix])
        large.sort()
        sharers.sort()
        owned = who[who >= F.OWNER_BASE]
        counts = np.bincount(owned - F.OWNER_BASE, minlength=0) if owned.size else np.zeros(0, dtype=np.int64)
        per_owner = {i: int(c) for i, c in enumerate(counts.tolist()) if c}
        return who, large, sharers[:MAX_RUNS_KEPT], new, per_owner

    def _figures(self, label: str, t: float, kind: np.ndarray, refs: np.ndarray, kstats: dict[str, Any],
                 mm_stats: dict[str, Any] | None, mm_error: str, audit: dict[str, Any] | None,
                 per_owner: dict[int, int]) -> dict[str, Any]:
        assert self.header is not None
        top = self.header["max_order"]
        user_free = (kind == F.U_FREE) & (refs == 0)
        user_mapped = (kind == F.U_FREE) & (refs > 0)
        ub = F.free_blocks(user_free, top)
        kb = F.free_blocks(kind == F.K_FREE, top)
        counts = {
            "not_ram": int(np.count_nonzero(kind == F.NOT_RAM)), "kernel_free": int(np.count_nonzero(kind == F.K_FREE)),
            "kernel_used": int(np.count_nonzero(kind == F.K_USED)),
            "kernel_shared": int(np.count_nonzero(kind == F.K_SHARED)),
            "user_free": int(np.count_nonzero(user_free)), "user_mapped": int(np.count_nonzero(user_mapped)),
            "user_shared": int(np.count_nonzero(user_mapped & (refs > 1))),
        }
        procs = []
        for p in sorted(kstats.get("per_process", []), key=lambda p: p["pid"]):
            ix = self._owner_ix.get((p["key"], p["pid"]), -1)
            procs.append({"owner": ix, "pid": p["pid"], "pages": p.get("pages", 0), "large_pages": p.get("large_pages", 0),
                          "tables": p.get("tables", 0), "threads": p.get("threads", 0),
                          "endpoints": p.get("endpoints", 0), "kernel_used": p.get("kernel_used"),
                          "kernel_limit": p.get("kernel_limit"), "user_quota": p.get("user_quota"),
                          "frames": per_owner.get(ix, 0)})
        mm = None
        if mm_stats is not None:
            c = mm_stats.get("counters", {})
            mm = {k: c.get(k) for k in ("requests", "refused", "donations", "donated_frames", "reclaims",
                                        "reclaimed_frames", "deaths", "enomem_retries")}
            mm["clients"] = mm_stats.get("clients")
            mm["quota"] = mm_stats.get("quota")
            mm["watermark_events"] = list(mm_stats.get("watermark_events", []))[-10:]
        rec: dict[str, Any] = {
            "label": str(label), "t": float(t), "counts": counts,
            "buddy": {"user": ub.tolist(), "kernel": kb.tolist()},
            "extfrag": {"user": F.extfrag_all(ub), "kernel": F.extfrag_all(kb)},
            "procs": procs,
            "pool": {"kernel_free": kstats.get("kernel_free"), "kernel_reserved": kstats.get("kernel_reserved", 0)},
            "watermarks": (mm_stats or {}).get("watermarks"),
            "kernel_calls": kstats.get("calls"), "kernel_refused": kstats.get("refused"),
            "mm": mm, "mm_error": mm_error,
            "audit": None if audit is None else {k: v for k, v in audit.items() if k != "runs"},
            "disagree": [] if audit is None else audit["runs"],
        }
        return rec

    def _summary(self, rec: dict[str, Any]) -> list[str]:
        """What changed since the previous snapshot, in a few lines (calls, pool, processes)."""
        last = self._last
        if last is None:
            return []
        out = []
        kc, kc0 = rec.get("kernel_calls"), last.get("kernel_calls")
        if isinstance(kc, int) and isinstance(kc0, int) and kc >= kc0:
            kr, kr0 = rec.get("kernel_refused") or 0, last.get("kernel_refused") or 0
            out.append(f"kernel: {kc - kc0:,} calls ({max(0, kr - kr0):,} refused)")
        m, m0 = rec.get("mm"), last.get("mm")
        if m and m0 and isinstance(m.get("requests"), int) and m["requests"] >= (m0.get("requests") or 0):
            out.append(f"mm: {m['requests'] - (m0.get('requests') or 0):,} requests; donated "
                       f"{(m['donated_frames'] or 0) - (m0.get('donated_frames') or 0):,} frames, reclaimed "
                       f"{(m['reclaimed_frames'] or 0) - (m0.get('reclaimed_frames') or 0):,}")
            seen = set(m0.get("watermark_events") or [])
            out.extend(f"mm: {ev}" for ev in m.get("watermark_events", []) if ev not in seen)
        elif m0 and not m:
            out.append("mm: not answering")
        before = {p["owner"] for p in last["procs"]}
        now = {p["owner"] for p in rec["procs"]}
        for ix in sorted(now - before):
            o = self.owners[ix]
            out.append(f"process {o['pid']} ({o['name']}) appeared")
        for ix in sorted(before - now):
            o = self.owners[ix]
            out.append(f"process {o['pid']} ({o['name']}) is gone")
        return out

    # ---- output ---------------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        """The page's data object (bytes as base64)."""
        if self.header is None:
            raise ValueError("nothing recorded: no snapshot was taken")
        h = dict(self.header)
        h.pop("type", None)
        h["code_names"] = {str(k): v for k, v in F.CODE_NAMES.items()}
        h["code_colours"] = {str(k): v for k, v in F.CODE_COLOURS.items()}
        h["code_glyphs"] = {str(k): v for k, v in F.CODE_GLYPHS.items()}
        h["client_colours"] = list(F.CLIENT_COLOURS)
        h["disagree_colour"] = F.DISAGREE_COLOUR
        h["owner_base"] = F.OWNER_BASE
        h["disagree_classes"] = [[c, DISAGREE_TEXT[c]] for c in DISAGREE_CLASSES]
        snaps = []
        for s in self.snaps:
            d = {k: v for k, v in s.items() if k not in ("who", "refs", "new_owners", "type")}
            d["who"] = base64.b64encode(s["who"]).decode()
            d["refs"] = base64.b64encode(s["refs"]).decode()
            snaps.append(d)
        owners = [dict(o, tag=F.owner_tag(i), colour=F.owner_colour(i)) for i, o in enumerate(self.owners)]
        return {"header": h, "owners": owners, "snaps": snaps}

    def write(self, path: str) -> int:
        """Write the page to ``path``; returns its size in bytes."""
        page = render_page(self.data())
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
        return len(page.encode())

    @classmethod
    def load(cls, history: str) -> "Recorder":
        """A recorder holding what a history file recorded (a cut-off last record is ignored)."""
        records: list[Any] = []
        with open(history, "rb") as f:
            try:
                records.extend(msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 31))
            except (msgpack.exceptions.UnpackException, ValueError):
                pass  # a record cut off (or spoilt) by a run that died while writing it: keep what came before
        rec = cls()
        for obj in records:
            if not isinstance(obj, dict):
                continue
            if obj.get("type") == "header":
                if obj.get("format") != FORMAT:
                    raise ValueError(f"{history} is in format {obj.get('format')}; this mmsim reads format {FORMAT}")
                rec.header = obj
                rec.title, rec.source = obj.get("title", ""), obj.get("source", "")
            elif obj.get("type") == "snap" and rec.header is not None:
                for o in obj.get("new_owners", []):
                    rec._owner_ix[(o["key"], o["pid"])] = len(rec.owners)
                    rec.owners.append(o)
                rec.snaps.append(obj)
        if rec.header is None:
            raise ValueError(f"{history} holds no recording")
        return rec


def render_page(data: dict[str, Any]) -> str:
    """The page: the template with its CSS, JavaScript and ``data`` inlined."""
    def read(name: str) -> str:
        with open(os.path.join(VIEWER_DIR, name), encoding="utf-8") as f:
            return f.read()

    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    title = html.escape(data["header"].get("title") or "mmsim view")
    parts = {"/*@CSS@*/": read("view.css"), "/*@JS@*/": read("view.js"), "@TITLE@": title, "@DATA@": payload}
    return re.sub("|".join(re.escape(m) for m in parts), lambda m: parts[m.group(0)], read("view.html"))


# ---- live systems ------------------------------------------------------------------------------

def live_moment(obs: Any, audit: bool) -> tuple[dict, dict, dict | None, str, dict | None]:
    """One moment of a running system through an ``Observer`` (as the operator): the kernel's hello,
    state, the mm's stats (or why not) and, if ``audit``, its audit (None if it refuses or is away)."""
    hello = obs.kernel_hello()
    st = _kernel_state(obs.kernel_call, hello)
    mstats, mm_error, rep = None, "", None
    try:
        mstats = obs.mm_call("stats")
    except (CallError, FileNotFoundError) as exc:
        mm_error = str(exc)
    if audit and mstats is not None:
        try:
            rep = _audit_of_report(obs.mm_call("audit"))
        except CallError as exc:
            if exc.name == "EPERM":
                obs.audit_refused = str(exc)
    return hello, st, mstats, mm_error, rep


class Recording:
    """Records a running system in the background (a thread with its own operator connections):
    a snapshot every ``interval`` seconds (or, when reading one takes longer than half of that, as
    long again as reading it took: at most half of a core) into ``RUN/view.history``, the mm's audit every
    ``audit_every`` seconds and at the end; ``stop()`` takes the last snapshot and writes
    ``RUN/view.html``. ``note()`` adds an event (a fault, a violation) to the next snapshot."""

    def __init__(self, run_dir: str, interval: float = 1.0, labels: dict[str, str] | None = None,
                 title: str | None = None, audit_every: float = 5.0) -> None:
        self.run_dir = run_dir
        self.interval = interval
        self.audit_every = audit_every
        self.labels = labels if labels is not None else {}
        self.recorder = Recorder(title=title or f"mmsim run {os.path.basename(os.path.abspath(run_dir))}",
                                 source=os.path.abspath(run_dir), history=os.path.join(run_dir, HISTORY),
                                 labels=self.labels)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self.errors: list[str] = []
        self.path: str | None = None

    def note(self, text: str, violation: bool = False) -> None:
        self.recorder.note(text, violation)

    def start(self) -> "Recording":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mmsim-view-recording", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from mmsim.picture import Observer

        try:
            obs = Observer(self.run_dir, timeout=2.0)
        except FileNotFoundError as exc:
            self.errors.append(f"cannot record: {exc}")
            return
        last_audit = -1e9
        with obs:
            while True:
                final = self._stop.is_set()
                now = time.monotonic()
                want_audit = final or now - last_audit >= self.audit_every
                self._take(obs, "end" if final else None, want_audit and not obs.audit_refused)
                if want_audit:
                    last_audit = now
                if final:
                    return
                took = time.monotonic() - now  # a big machine takes a while to read: then record less often
                self._stop.wait(max(0.05, self.interval - took, took))

    def _take(self, obs: Any, label: str | None, audit: bool) -> None:
        t = time.monotonic() - self._t0
        try:
            hello, st, mstats, mm_error, rep = live_moment(obs, audit)
            self.recorder.names.update(obs.names([p["key"] for p in st["kstats"].get("per_process", [])]))
        except (CallError, FileNotFoundError) as exc:
            self.recorder.note(f"the kernel did not answer: {exc}")
            return
        try:
            self.recorder.add(label or f"{t:.1f}s", t, hello, st, mm_stats=mstats, mm_error=mm_error, audit=rep)
        except (OSError, ValueError) as exc:
            self.errors.append(str(exc))

    def stop(self, write: bool = True) -> str | None:
        """Take the last snapshot, end the thread and (``write``) leave ``RUN/view.html``; returns its path
        (None if nothing was recorded)."""
        if self._thread is None:
            return self.path
        self._stop.set()
        self._thread.join(timeout=30)
        self._thread = None
        if write and self.recorder.snaps:
            self.path = os.path.join(self.run_dir, PAGE_NAME)
            try:
                self.recorder.write(self.path)
            except OSError as exc:
                self.errors.append(f"cannot write {self.path}: {exc}")
                self.path = None
        return self.path


# ---- the command -------------------------------------------------------------------------------

def _make_command() -> Callable[..., None]:
    import typer

    def view(
        run_dir: str = typer.Option("./mmsim-run", "--run-dir", help="Run directory of a running system or of a "
                                    "finished run (mmsim up / chaos leave RUN/view.history)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="The page to write (default: "
                                             "RUN/view.html from the history, RUN/view-now.html from a live system)."),
        history: bool = typer.Option(False, "--history", help="Use the recorded history even if the system "
                                     "is running."),
        samples: int = typer.Option(1, "--samples", min=1, max=3600, help="Live: snapshots to take."),
        interval: float = typer.Option(1.0, "--interval", min=0.05, max=60.0, help="Live: seconds between them."),
        timeout: float = typer.Option(2.0, "--timeout", min=0.1, max=60.0, help="Live: seconds to wait for "
                                      "an answer."),
    ) -> None:
        """Write one self-contained HTML page of the frames."""
        from protocol import rundir

        if not os.path.isdir(rundir.keys_dir(run_dir)):
            raise typer.BadParameter(f"{run_dir} has no keys/ directory: not a run directory", param_hint="--run-dir")
        hist = os.path.join(run_dir, HISTORY)
        rec: Recorder | None = None
        live_error = ""
        if not history:
            try:
                rec = _record_live(run_dir, samples, interval, timeout)
            except (CallError, FileNotFoundError) as exc:
                live_error = str(exc)
        if rec is None:
            if not os.path.exists(hist):
                why = f"the system is not answering ({live_error})" if live_error else "--history was given"
                typer.echo(f"view: {why}, and {hist} does not exist (mmsim up and mmsim chaos leave one)", err=True)
                raise typer.Exit(1)
            try:
                rec = Recorder.load(hist)
            except (OSError, ValueError) as exc:
                typer.echo(f"view: cannot read {hist}: {exc}", err=True)
                raise typer.Exit(1) from None
            if not rec.snaps:
                typer.echo(f"view: {hist} holds no snapshot", err=True)
                raise typer.Exit(1)
            out = output or os.path.join(run_dir, PAGE_NAME)
            what = f"{len(rec.snaps)} recorded snapshot(s) from {hist}"
        else:
            out = output or os.path.join(run_dir, "view-now.html")
            what = f"{len(rec.snaps)} snapshot(s) of the running system"
        try:
            size = rec.write(out)
        except OSError as exc:
            typer.echo(f"view: cannot write {out}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {out} ({size / 1024:,.0f} KiB): {what}")

    return view


def _record_live(run_dir: str, samples: int, interval: float, timeout: float) -> Recorder:
    from mmsim.picture import Observer

    rec = Recorder(title=f"mmsim {os.path.basename(os.path.abspath(run_dir))} (live)",
                   source=os.path.abspath(run_dir))
    with Observer(run_dir, timeout=timeout) as obs:
        t0 = time.monotonic()
        for i in range(samples):
            if i:
                time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
            t = time.monotonic() - t0
            hello, st, mstats, mm_error, rep = live_moment(obs, audit=not obs.audit_refused)
            rec.names.update(obs.names([p["key"] for p in st["kstats"].get("per_process", [])]))
            rec.add(time.strftime("%H:%M:%S") if samples == 1 else f"{t:.1f}s", t, hello, st, mm_stats=mstats,
                    mm_error=mm_error, audit=rep)
    return rec


view_cmd = _make_command()
