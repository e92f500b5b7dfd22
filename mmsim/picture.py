"""The frame picture: every frame, or group of frames, coloured by owner and state.

Pure parts, unit-tested on synthetic data: ``frame_classes`` turns the
kernel's ``frame_info`` segments and the large-mapping runs of its ``stats``
into one class code per frame; ``grid`` groups frames into cells (each shows
its majority class, with a glyph saying how pure it is); ``render`` draws a
``Snapshot`` with rich (the grid, counts per class, call rates, the mm's
watermark events, per-process usage); ``summary_line`` is the same in one line.

``Observer`` takes snapshots of a running system as the operator of its run
directory: it reads the kernel's frame table with the mm's key pair
(``frame_info`` is mm-only; read-only) and asks ``stats`` of the kernel and
the mm with an ``observer`` key pair that owns no process. Used by ``mmsim up``
(live view) and ``mmsim status`` (once, or saved as SVG).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from protocol import rundir
from protocol.connection import Connection
from protocol.errors import CallError

PAGE = 4096


class FrameClass(NamedTuple):
    code: int
    name: str
    label: str
    style: str


CLASSES: tuple[FrameClass, ...] = (
    FrameClass(0, "reserved", "reserved / not RAM", "grey30"),
    FrameClass(1, "kernel_free", "kernel free", "blue"),
    FrameClass(2, "kernel_used", "kernel used", "red"),
    FrameClass(3, "kernel_shared", "kernel shared (read-only)", "magenta"),
    FrameClass(4, "user_free", "user free", "green"),
    FrameClass(5, "user_mapped", "user mapped", "yellow"),
    FrameClass(6, "user_shared", "user shared (refcount > 1)", "dark_orange"),
    FrameClass(7, "user_large", "user large page", "cyan"),
)
RESERVED, KERNEL_FREE, KERNEL_USED, KERNEL_SHARED, USER_FREE, USER_MAPPED, USER_SHARED, USER_LARGE = range(8)
BY_NAME = {c.name: c for c in CLASSES}
_KERNEL_KINDS = {"none": RESERVED, "kernel_free": KERNEL_FREE, "kernel_used": KERNEL_USED,
                 "kernel_shared": KERNEL_SHARED}
PURE, MAJOR, MIXED = "█", "▓", "▒"  # a cell all of its class, more than half, or only the largest share


# ---- pure: classes and cells -----------------------------------------------------------

def frame_classes(n: int, segments: list[list[Any]], large_runs: list[list[int]] = ()) -> np.ndarray:
    """One class code per frame from ``frame_info`` segments ``[first, count, kind, refs]``;
    mapped user frames under a large mapping (``[first, count]`` runs) become USER_LARGE.
    Frames no segment names stay RESERVED."""
    out = np.zeros(n, dtype=np.uint8)
    for first, count, kind, refs in segments:
        if kind == "user":
            code = USER_FREE if refs == 0 else USER_MAPPED if refs == 1 else USER_SHARED
        else:
            code = _KERNEL_KINDS.get(kind, RESERVED)
        out[first:first + count] = code
    for first, count in large_runs:
        seg = out[first:first + count]
        seg[(seg == USER_MAPPED) | (seg == USER_SHARED)] = USER_LARGE
    return out


def class_counts(classes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(classes, minlength=len(CLASSES))
    return {c.name: int(counts[c.code]) for c in CLASSES}


@dataclass
class Grid:
    per: int  # frames per cell (the last cell may hold fewer)
    codes: np.ndarray  # majority class of each cell
    share: np.ndarray  # fraction of the cell's frames in that class (0..1]

    def glyph(self, i: int) -> str:
        s = float(self.share[i])
        return PURE if s >= 1.0 else MAJOR if s > 0.5 else MIXED


def grid(classes: np.ndarray, cells: int) -> Grid:
    """Group ``classes`` into at most ``cells`` cells of equal size (one frame per cell if it fits)."""
    n = int(classes.size)
    if n == 0:
        return Grid(1, np.zeros(0, dtype=np.uint8), np.zeros(0))
    per = -(-n // max(1, cells))
    m = -(-n // per)
    padded = np.full(m * per, len(CLASSES), dtype=np.uint8)  # padding is a class of its own, never counted
    padded[:n] = classes
    rows = padded.reshape(m, per)
    counts = np.stack([np.count_nonzero(rows == c.code, axis=1) for c in CLASSES], axis=1)
    sizes = np.count_nonzero(rows != len(CLASSES), axis=1)
    codes = counts.argmax(axis=1).astype(np.uint8)
    share = counts.max(axis=1) / sizes
    return Grid(per, codes, share)


# ---- snapshots -------------------------------------------------------------------------------

@dataclass
class Snapshot:
    at: float  # time.monotonic() when taken
    kstats: dict[str, Any]  # the kernel's stats reply
    classes: np.ndarray  # one class code per frame
    mstats: dict[str, Any] | None = None  # the mm's stats reply, None if the mm did not answer
    mm_error: str = ""
    names: dict[str, str] = field(default_factory=dict)  # public key -> key-pair name in the run dir
    labels: dict[str, str] = field(default_factory=dict)  # key-pair name -> what it runs (workload)

    def counts(self) -> dict[str, int]:
        return class_counts(self.classes)

    def name_of(self, key: str) -> str:
        name = self.names.get(key, key[:8] + "…")
        label = self.labels.get(name)
        return f"{name} ({label})" if label else name


def rates(snap: Snapshot, prev: Snapshot | None) -> dict[str, float | None]:
    """Kernel calls and mm requests per second between two snapshots (None if unknown or restarted)."""
    out: dict[str, float | None] = {"kernel_calls": None, "kernel_refused": None, "mm_requests": None}
    if prev is None or snap.at <= prev.at:
        return out
    dt = snap.at - prev.at

    def rate(now: Any, before: Any) -> float | None:
        if not isinstance(now, int) or not isinstance(before, int) or now < before:
            return None  # unknown, or the server restarted
        return (now - before) / dt

    out["kernel_calls"] = rate(snap.kstats.get("calls"), prev.kstats.get("calls"))
    out["kernel_refused"] = rate(snap.kstats.get("refused"), prev.kstats.get("refused"))
    if snap.mstats and prev.mstats:
        out["mm_requests"] = rate(snap.mstats["counters"]["requests"], prev.mstats["counters"]["requests"])
    return out


def _fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:,.0f}/s"


class Observer:
    """Takes snapshots of the system of a run directory (endpoints read from the run dir
    each time unless given, so a restarted mm on a new port is found again)."""

    def __init__(self, run_dir: str, kernel_endpoint: str | None = None, mm_endpoint: str | None = None,
                 timeout: float = 2.0, labels: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.kernel_endpoint, self.mm_endpoint = kernel_endpoint, mm_endpoint
        self.timeout = timeout
        self.labels = dict(labels or {})
        rundir.generate(run_dir, "observer")  # an identity with no process: asking never renews a lease
        self.observer = rundir.load_keypair(run_dir, "observer")
        self.operator = rundir.load_keypair(run_dir, "mm")  # frame_info is for the mm's key only
        self.kernel_key = rundir.public_key(run_dir, "kernel")
        self.mm_key = rundir.public_key(run_dir, "mm")
        self._conns: dict[str, tuple[str, Connection]] = {}
        self._names: dict[str, str] = {}

    def _conn(self, which: str) -> Connection:
        if which == "mm":
            endpoint = self.mm_endpoint or rundir.read_endpoint(self.run_dir, "mm")
            server, pair = self.mm_key, self.observer
        else:
            endpoint = self.kernel_endpoint or rundir.read_endpoint(self.run_dir, "kernel")
            server, pair = self.kernel_key, self.operator if which == "operator" else self.observer
        have = self._conns.get(which)
        if have is not None and have[0] == endpoint:
            return have[1]
        if have is not None:
            have[1].close()
        conn = Connection(endpoint, server, *pair, timeout=self.timeout, retries=0)
        self._conns[which] = (endpoint, conn)
        return conn

    def close(self) -> None:
        for _, conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def names(self, wanted: list[str]) -> dict[str, str]:
        """Public key -> key-pair name for the keys of the run directory (re-read for unknown keys)."""
        if any(k not in self._names for k in wanted):
            for name in rundir.names(self.run_dir):
                try:
                    self._names.setdefault(rundir.public_key(self.run_dir, name).decode(), name)
                except FileNotFoundError:
                    pass
        return self._names

    def frame_table(self, n: int, segments_per_call: int = 16384) -> list[list[Any]]:
        """All of the kernel's frame table as segments (several calls if needed)."""
        conn = self._conn("operator")
        out: list[list[Any]] = []
        todo: list[list[int]] = [[0, n]]
        while todo:
            r = conn.call("frame_info", {"frames": todo[:4096], "max_segments": segments_per_call})
            out.extend(r["segments"])
            todo = r["rest"] + todo[4096:]
        return out

    def snapshot(self) -> Snapshot:
        """Kernel stats and frame table (CallError if the kernel does not answer, FileNotFoundError if
        it never published an endpoint), and the mm's stats if it answers."""
        kstats = self._conn("kernel").call("stats")  # FileNotFoundError: no kernel endpoint in the run dir
        segments = self.frame_table(int(kstats["frames"]))
        at = time.monotonic()
        classes = frame_classes(int(kstats["frames"]), segments, kstats.get("large_mappings", []))
        mstats, mm_error = None, ""
        try:
            mstats = self._conn("mm").call("stats")
        except (CallError, FileNotFoundError) as exc:
            mm_error = str(exc)
        keys_seen = [p["key"] for p in kstats.get("per_process", [])]
        return Snapshot(at, kstats, classes, mstats, mm_error, dict(self.names(keys_seen)), self.labels)


# ---- drawing -----------------------------------------------------------------------------------

def render(snap: Snapshot, prev: Snapshot | None = None, columns: int = 64, rows: int = 16,
           title: str = "mmsim: physical memory", footer: str = "") -> Any:
    """The picture as a rich renderable: the frame grid, its legend with counts, rates and events."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    g = grid(snap.classes, columns * rows)
    n = int(snap.classes.size)
    text = Text(no_wrap=True)
    for r in range(-(-g.codes.size // columns)):
        first_frame = r * columns * g.per
        text.append(f"{first_frame * PAGE >> 20:>7} MiB ", style="dim")
        for i in range(r * columns, min((r + 1) * columns, g.codes.size)):
            text.append(g.glyph(i), style=CLASSES[int(g.codes[i])].style)
        text.append("\n")
    text.append(f"{n} frames of {PAGE // 1024} KiB; one cell = {g.per} frame(s) "
                f"({PURE} all, {MAJOR} most, {MIXED} largest share of the cell)", style="dim")

    counts = snap.counts()
    legend = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    legend.add_column("")
    legend.add_column("class")
    legend.add_column("frames", justify="right")
    legend.add_column("MiB", justify="right")
    legend.add_column("%", justify="right")
    for c in CLASSES:
        k = counts[c.name]
        legend.add_row(Text(PURE * 2, style=c.style), c.label, f"{k:,}", f"{k * PAGE / (1 << 20):,.1f}",
                       f"{100 * k / max(1, n):.1f}")

    rt = rates(snap, prev)
    ks = snap.kstats
    calls = Table(box=None, pad_edge=False, show_header=False)
    calls.add_column(style="bold")
    calls.add_column(justify="right")
    calls.add_row("kernel calls", f"{ks.get('calls', '-'):,}" if isinstance(ks.get("calls"), int) else "-")
    calls.add_row("kernel calls/s", _fmt_rate(rt["kernel_calls"]))
    calls.add_row("kernel refused/s", _fmt_rate(rt["kernel_refused"]))
    calls.add_row("processes", str(ks.get("processes", "-")))
    calls.add_row("kernel pool free", f"{ks.get('kernel_free', 0):,}")
    ms = snap.mstats
    events_text = Text()
    if ms is not None:
        c = ms["counters"]
        calls.add_row("mm requests/s", _fmt_rate(rt["mm_requests"]))
        calls.add_row("mm refused", f"{c['refused']:,}")
        calls.add_row("mm clients", str(ms.get("clients", "-")))
        calls.add_row("donations", f"{c['donations']} ({c['donated_frames']:,} frames)")
        calls.add_row("reclaims", f"{c['reclaims']} ({c['reclaimed_frames']:,} frames)")
        calls.add_row("client deaths seen", str(c["deaths"]))
        wm = ms.get("watermarks", {})
        events_text.append(f"watermarks low {wm.get('low')} / target {wm.get('target')} / high {wm.get('high')}\n",
                           style="dim")
        for ev in ms.get("watermark_events", [])[-4:]:
            events_text.append(f"• {ev}\n")
        if not ms.get("watermark_events"):
            events_text.append("(no watermark events yet)\n", style="dim")
    else:
        calls.add_row("mm", Text("not answering", style="bold red"))
        events_text.append(f"mm: {snap.mm_error}\n", style="red")

    procs = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("process", "pid", "pages", "large", "tables", "threads", "endpoints"):
        procs.add_column(col, justify="left" if col == "process" else "right")
    per = sorted(ks.get("per_process", []), key=lambda p: p["pid"])
    for p in per[:12]:
        procs.add_row(snap.name_of(p["key"]), str(p["pid"]), str(p["pages"]), str(p["large_pages"]),
                      str(p["tables"]), str(p["threads"]), str(p["endpoints"]))
    if len(per) > 12:
        procs.add_row(f"… and {len(per) - 12} more", "", "", "", "", "", "")
    if not per:
        procs.add_row(Text("(no client processes)", style="dim"), "", "", "", "", "", "")

    side = Table.grid(padding=(0, 3))
    side.add_row(legend, calls)
    parts: list[Any] = [Panel(text, title=title, expand=False), side, events_text, procs]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def summary_line(snap: Snapshot, prev: Snapshot | None, elapsed: float | None = None) -> str:
    """The picture's numbers on one line (``mmsim up --no-live`` prints one a second)."""
    c = snap.counts()
    rt = rates(snap, prev)
    ks = snap.kstats
    head = f"[{elapsed:5.1f}s] " if elapsed is not None else ""
    mm = "mm away" if snap.mstats is None else (
        f"mm {_fmt_rate(rt['mm_requests'])} donations {snap.mstats['counters']['donations']} "
        f"reclaims {snap.mstats['counters']['reclaims']}")
    return (f"{head}kernel free {c['kernel_free']} used {c['kernel_used']} shared {c['kernel_shared']} | "
            f"user free {c['user_free']} mapped {c['user_mapped']} shared {c['user_shared']} "
            f"large {c['user_large']} | procs {ks.get('processes')} | kernel {_fmt_rate(rt['kernel_calls'])} | {mm}")
