"""The terminal frame picture: every frame, or group of frames, by class, with the per-order figures.

Pure parts, unit-tested on synthetic data: ``frame_classes`` turns the
kernel's ``frame_info`` segments and the large-mapping runs of its ``stats``
into one class code per frame; ``cells`` groups frames into cells, each showing
the most notable class among its frames (so a single mapped frame among 63
free ones still shows), as a capital glyph if the whole cell is that class and
a small one if only part of it is; ``grid`` is the older majority grouping.
``render`` draws a ``Snapshot`` with rich: the cells, the classes with their
counts, the free blocks per order and the fragmentation index (the same
figures as the HTML view: ``mmsim.figures``), call rates, the mm's watermark
events and per-process charges. It fits the terminal it is drawn in (the
picture shrinks, the process table is cut with a count of the rest), and reads
without colour: every class has its own glyph. ``summary_line`` is the same in
one line.

``Observer`` takes snapshots of a running system with the run directory's
``operator`` key pair (the kernel and the mm admit it always; it may read what
the mm reads and change nothing): the kernel's ``stats`` with the per-process
listing, its frame table (``frame_info``), and the mm's ``stats``. Used by
``mmsim up`` (live view) and ``mmsim status`` (once, or saved as SVG); its
``kernel_call``/``mm_call`` also serve the HTML view's recorder (``mmsim.view``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmsim import figures as F
from mmsim.figures import (  # noqa: F401  (re-exported: the picture's classes)
    CLASSES,
    KERNEL_FREE,
    KERNEL_SHARED,
    KERNEL_USED,
    NOTABLE,
    RESERVED,
    USER_FREE,
    USER_LARGE,
    USER_MAPPED,
    USER_SHARED,
    FrameClass,
)
from protocol import PAGE_SIZE, rundir
from protocol.connection import Connection
from protocol.errors import CallError

PAGE = PAGE_SIZE
BY_NAME = {c.name: c for c in CLASSES}
_KERNEL_KINDS = {"none": RESERVED, "kernel_free": KERNEL_FREE, "kernel_used": KERNEL_USED,
                 "kernel_shared": KERNEL_SHARED}
PURE, MAJOR, MIXED = "█", "▓", "▒"  # (grid) a cell all of its class, more than half, or only the largest share
LISTING_PAGE = 1000  # processes per page of the kernel's listing


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
class Cells:
    per: int  # frames per cell (the last cell may hold fewer)
    codes: np.ndarray  # the most notable class of each cell
    whole: np.ndarray  # bool: every frame of the cell is of that class

    def glyph(self, i: int) -> str:
        c = CLASSES[int(self.codes[i])]
        return c.glyph if self.whole[i] else c.partial


def cells(classes: np.ndarray, count: int) -> Cells:
    """Group ``classes`` into at most ``count`` cells of a power of two frames each (so cells and rows
    start at round addresses and never straddle a large-page block unless they hold whole ones); each
    shows the most notable class among its frames (``figures.NOTABLE``: shared, large, mapped, kernel
    used, ...)."""
    n = int(classes.size)
    if n == 0:
        return Cells(1, np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=bool))
    per = 1 << max(0, (-(-n // max(1, count)) - 1).bit_length())
    m = -(-n // per)
    rank = np.empty(len(CLASSES) + 1, dtype=np.uint8)  # notable rank: 0 most notable; padding last
    for r, code in enumerate(NOTABLE):
        rank[code] = r
    rank[len(CLASSES)] = len(CLASSES)
    padded = np.full(m * per, len(CLASSES), dtype=np.uint8)
    padded[:n] = classes
    ranks = rank[padded].reshape(m, per)
    best = ranks.min(axis=1)
    codes = np.asarray(NOTABLE, dtype=np.uint8)[best]
    pad = ranks == len(CLASSES)
    whole = np.all((ranks == best[:, None]) | pad, axis=1)
    return Cells(per, codes, whole)


@dataclass
class Grid:
    per: int  # frames per cell (the last cell may hold fewer)
    codes: np.ndarray  # majority class of each cell
    share: np.ndarray  # fraction of the cell's frames in that class (0..1]

    def glyph(self, i: int) -> str:
        s = float(self.share[i])
        return PURE if s >= 1.0 else MAJOR if s > 0.5 else MIXED


def grid(classes: np.ndarray, cells: int) -> Grid:
    """Group ``classes`` into at most ``cells`` cells of equal size, each showing its majority class
    (one frame per cell if it fits). The picture draws ``cells()``; this is the plain majority."""
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
    kstats: dict[str, Any]  # the kernel's stats reply (with the per-process listing)
    classes: np.ndarray  # one class code per frame
    mstats: dict[str, Any] | None = None  # the mm's stats reply, None if the mm did not answer
    mm_error: str = ""
    names: dict[str, str] = field(default_factory=dict)  # public key -> key-pair name in the run dir
    labels: dict[str, str] = field(default_factory=dict)  # key-pair name -> what it runs (workload)
    large_page_sizes: tuple[int, ...] = (4 << 20,)  # the kernel's hello: sets the highest order shown

    def counts(self) -> dict[str, int]:
        return class_counts(self.classes)

    def name_of(self, key: str) -> str:
        name = self.names.get(key, key[:8] + "…")
        label = self.labels.get(name)
        return f"{name} ({label})" if label else name

    def free_blocks(self) -> dict[str, np.ndarray]:
        """Free blocks per order (``figures.free_blocks``) of user-free and kernel-free frames."""
        top = F.max_order(self.large_page_sizes)
        return {"user": F.free_blocks(self.classes == USER_FREE, top),
                "kernel": F.free_blocks(self.classes == KERNEL_FREE, top)}


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
    """Takes snapshots of the system of a run directory as its operator (endpoints read from the run
    dir each time unless given, so a restarted mm on a new port is found again)."""

    def __init__(self, run_dir: str, kernel_endpoint: str | None = None, mm_endpoint: str | None = None,
                 timeout: float = 2.0, labels: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.kernel_endpoint, self.mm_endpoint = kernel_endpoint, mm_endpoint
        self.timeout = timeout
        self.labels = dict(labels or {})
        self.operator = rundir.load_keypair(run_dir, "operator")  # FileNotFoundError: no operator key
        self.kernel_key = rundir.public_key(run_dir, "kernel")
        self.mm_key = rundir.public_key(run_dir, "mm")
        self._conns: dict[str, tuple[str, Connection]] = {}
        self._names: dict[str, str] = {}
        self.hello: dict[str, Any] | None = None
        self.audit_refused = ""  # why the mm refused this observer an audit (then it is not asked again)

    def _conn(self, which: str) -> Connection:
        if which == "mm":
            endpoint = self.mm_endpoint or rundir.read_endpoint(self.run_dir, "mm")
            server = self.mm_key
        else:
            endpoint = self.kernel_endpoint or rundir.read_endpoint(self.run_dir, "kernel")
            server = self.kernel_key
        have = self._conns.get(which)
        if have is not None and have[0] == endpoint:
            return have[1]
        if have is not None:
            have[1].close()
        conn = Connection(endpoint, server, *self.operator, timeout=self.timeout, retries=0)
        self._conns[which] = (endpoint, conn)
        return conn

    def _call(self, which: str, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
        conn = self._conn(which)
        try:
            return conn.call(name, args or {})
        except CallError as exc:
            if exc.code.name == "EIO":  # no answer: a fresh socket next time (the server may be back)
                conn.close()
                self._conns.pop(which, None)
            raise

    def kernel_call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """One kernel call as the operator (CallError if refused or unanswered)."""
        return self._call("kernel", name, args)

    def mm_call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call to the mm as the operator."""
        return self._call("mm", name, args)

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

    def kernel_hello(self) -> dict[str, Any]:
        if self.hello is None:
            self.hello = self.kernel_call("hello")
        return self.hello

    def kernel_stats(self) -> dict[str, Any]:
        """The kernel's stats with its whole per-process listing (all pages of it)."""
        return kernel_stats(self.kernel_call)

    def frame_table(self, n: int) -> list[list[Any]]:
        """All of the kernel's frame table as segments (several calls if needed)."""
        return frame_table(self.kernel_call, n)

    def snapshot(self) -> Snapshot:
        """Kernel stats and frame table (CallError if the kernel does not answer, FileNotFoundError if
        it never published an endpoint), and the mm's stats if it answers."""
        self.kernel_hello()
        snap = take_snapshot(self.kernel_call, self.mm_call, self.hello)
        snap.names = dict(self.names([p["key"] for p in snap.kstats.get("per_process", [])]))
        snap.labels = self.labels
        return snap


Call = Any  # call(name, args) -> reply dict; raises CallError (an Observer's kernel_call, or in-process)


def kernel_stats(kcall: Call) -> dict[str, Any]:
    """The kernel's stats with its whole per-process listing (every page of it) and large mappings."""
    st = kcall("stats", {"from_pid": 0, "limit": LISTING_PAGE})
    procs = list(st.get("per_process", []))
    nxt = st.get("next_pid")
    while nxt is not None:
        more = kcall("stats", {"from_pid": nxt, "limit": LISTING_PAGE})
        procs.extend(more.get("per_process", []))
        nxt = more.get("next_pid")
    st["per_process"] = procs
    st.pop("next_pid", None)
    return st


def frame_table(kcall: Call, n: int, segments_per_call: int = 16384) -> list[list[Any]]:
    """The kernel's whole frame table as ``frame_info`` segments (as many calls as it takes)."""
    out: list[list[Any]] = []
    todo: list[list[int]] = [[0, n]]
    while todo:
        r = kcall("frame_info", {"frames": todo[:1024], "max_segments": segments_per_call})
        out.extend(r["segments"])
        todo = r["rest"] + todo[1024:]
    return out


def take_snapshot(kcall: Call, mcall: Call | None, hello: dict[str, Any]) -> Snapshot:
    """A snapshot through these calls (the kernel's: CallError if it does not answer; the mm's
    stats if it answers)."""
    kstats = kernel_stats(kcall)
    segments = frame_table(kcall, int(kstats["frames"]))
    at = time.monotonic()
    classes = frame_classes(int(kstats["frames"]), segments, kstats.get("large_mappings", []))
    mstats, mm_error = None, "no mm"
    if mcall is not None:
        try:
            mstats, mm_error = mcall("stats", {}), ""
        except (CallError, FileNotFoundError) as exc:
            mm_error = str(exc)
    return Snapshot(at, kstats, classes, mstats, mm_error, large_page_sizes=tuple(hello.get("large_page_sizes") or ()))


# ---- drawing -----------------------------------------------------------------------------------

def _cell_style(c: FrameClass) -> str:
    """The class's fill with a readable glyph colour on it (user free has no fill: see figures)."""
    return c.style if not c.style.startswith("on ") else f"{F.text_colour(c.colour)} {c.style}"


def _num(v: int, width: int) -> str:
    """``v`` in at most ``width`` characters (12345 -> 12k when it does not fit)."""
    s = str(v)
    if len(s) <= width:
        return s
    for unit, div in (("k", 1000), ("M", 1000 ** 2), ("G", 1000 ** 3)):
        s = f"{v // div}{unit}"
        if len(s) <= width:
            return s
    return s


def order_lines(snap: Snapshot, width: int) -> list[str]:
    """The free blocks per order (buddyinfo) of user-free and kernel-free frames, and the
    fragmentation index at the large-page order, in lines of at most ``width`` characters."""
    blocks = snap.free_blocks()
    top = len(blocks["user"]) - 1
    label = 13
    col = 6
    shown = top + 1
    while shown > 1 and label + shown * col > width:
        if col > 5:
            col -= 1
        else:
            shown -= 1
    head = "free blocks".ljust(label) + "".join(F.order_size(k).rjust(col) for k in range(shown))
    lines = [head]
    for who, title in (("user", "  user free"), ("kernel", "  kernel free")):
        lines.append(title.ljust(label) + "".join(_num(int(v), col - 1).rjust(col) for v in blocks[who][:shown]))
    if shown < top + 1:
        lines[0] += f"  (+{top + 1 - shown} orders)"
    pb = F.pageblock_order(snap.large_page_sizes)
    fu = F.fmt_extfrag(F.extfrag_index(blocks["user"], pb))
    fk = F.fmt_extfrag(F.extfrag_index(blocks["kernel"], pb))
    line = f"fragmentation index, order {pb} ({F.order_size(pb)}): user {fu}, kernel {fk}"
    note = " (-1: fits; near 1: fails by fragmentation)"
    lines.append(line + note if len(line + note) <= width else line)
    return lines


class Picture:
    """The picture as a rich renderable that fits the console it is drawn in: on a terminal, its
    height too (the cells shrink, the process table is cut); elsewhere (a file, an SVG) only its width."""

    def __init__(self, snap: Snapshot, prev: Snapshot | None, columns: int, rows: int, title: str,
                 footer: str) -> None:
        self.snap, self.prev = snap, prev
        self.columns, self.rows = columns, rows
        self.title, self.footer = title, footer

    def __rich_console__(self, console: Any, options: Any) -> Any:
        width = options.max_width
        height = (options.height or console.size.height) - 1 if console.is_terminal else None
        yield from self.parts(width, height)

    def parts(self, width: int, height: int | None) -> list[Any]:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        snap = self.snap
        n = int(snap.classes.size)
        label_w = 10
        columns = max(8, min(self.columns, width - 4 - label_w))
        counts = snap.counts()
        ks = snap.kstats
        ms = snap.mstats
        rt = rates(snap, self.prev)

        # legend: one class a line when there is room, else two a line
        compact = height is not None and height < 60
        legend_lines: list[Text] = []
        if compact:
            per_line = 2 if width >= 70 else 1
            entries = []
            for c in CLASSES:
                k = counts[c.name]
                t = Text()
                t.append(c.glyph, style=_cell_style(c))
                t.append(f" {c.label} {k:,} ({100 * k / max(1, n):.1f}%)")
                entries.append(t)
            cell_w = max(len(e.plain) for e in entries) + 2
            for i in range(0, len(entries), per_line):
                line = Text()
                for e in entries[i:i + per_line]:
                    line.append_text(e)
                    line.append(" " * (cell_w - len(e.plain)))
                legend_lines.append(line)
        stats_items = [("kernel calls/s", _fmt_rate(rt["kernel_calls"])),
                       ("refused/s", _fmt_rate(rt["kernel_refused"])),
                       ("processes", str(ks.get("processes", "-"))),
                       ("pool free", f"{ks.get('kernel_free', 0):,}"),
                       ("reserved", f"{ks.get('kernel_reserved', 0):,}")]
        if ms is not None:
            c = ms["counters"]
            stats_items += [("mm requests/s", _fmt_rate(rt["mm_requests"])), ("mm refused", f"{c['refused']:,}"),
                            ("donations", f"{c['donations']} ({c['donated_frames']:,} frames)"),
                            ("reclaims", f"{c['reclaims']} ({c['reclaimed_frames']:,} frames)"),
                            ("client deaths seen", str(c["deaths"]))]
        events: list[Text] = []
        if ms is not None:
            wm = ms.get("watermarks", {})
            events.append(Text(f"watermarks low {wm.get('low')} / target {wm.get('target')} / high "
                               f"{wm.get('high')} (on the unreserved pool)", style="dim"))
            for ev in ms.get("watermark_events", [])[-4:]:
                events.append(Text(f"• {ev}"))
            if not ms.get("watermark_events"):
                events.append(Text("(no watermark events yet)", style="dim"))
        else:
            events.append(Text(f"mm not answering: {snap.mm_error}", style="bold red"))
        orders = order_lines(snap, width)
        per = sorted(ks.get("per_process", []), key=lambda p: p["pid"])
        compact_stats = [Text(f"kernel {_fmt_rate(rt['kernel_calls'])} ({_fmt_rate(rt['kernel_refused'])} refused) | "
                              f"{ks.get('processes', '-')} processes | pool free {ks.get('kernel_free', 0):,}, "
                              f"reserved {ks.get('kernel_reserved', 0):,}", no_wrap=True, overflow="ellipsis")]
        if ms is not None:
            c, wm = ms["counters"], ms.get("watermarks", {})
            compact_stats.append(Text(
                f"mm {_fmt_rate(rt['mm_requests'])} ({c['refused']:,} refused) | donated {c['donated_frames']:,} in "
                f"{c['donations']} | reclaimed {c['reclaimed_frames']:,} in {c['reclaims']} | deaths {c['deaths']} | "
                f"watermarks {wm.get('low')}/{wm.get('target')}/{wm.get('high')}", no_wrap=True, overflow="ellipsis"))
        if compact:  # the watermarks are on the stats line: only what happened
            events = events[1:] if ms is not None else events
            events = [e for e in events if not e.plain.startswith("(no watermark")]

        # how many rows of cells and of processes fit
        rows, procs_shown = self.rows, min(len(per), 12)
        if compact:
            fixed = ((1 if self.footer else 0) + 3 + len(legend_lines) + len(compact_stats) + len(orders)
                     + min(1, len(events)))  # 3: the panel's borders and the note; then the first event line
            room = height - fixed
            procs_min = 1 + (min(len(per), 2) + (1 if len(per) > 2 else 0) if per else 1)
            rows = max(2, min(self.rows, room - procs_min))
            left = room - rows
            if not per:
                left -= 2
            elif len(per) + 1 <= left:
                procs_shown = len(per)
                left -= len(per) + 1
            else:
                procs_shown = max(0, left - 2)
                left -= procs_shown + 2
            events = events[:min(1, len(events)) + max(0, left)]
        cs = cells(snap.classes, columns * rows)
        grid_text = Text(no_wrap=True, overflow="crop")
        nrows = -(-cs.codes.size // columns)
        for r in range(nrows):
            first_frame = r * columns * cs.per
            grid_text.append(f"{first_frame * PAGE >> 20:>6} MiB ", style="dim")
            for i in range(r * columns, min((r + 1) * columns, cs.codes.size)):
                c = CLASSES[int(cs.codes[i])]
                grid_text.append(cs.glyph(i), style=_cell_style(c))
            if r < nrows - 1:
                grid_text.append("\n")
        note = (f"{n:,} frames of {PAGE // 1024} KiB; a cell is {cs.per:,} frame(s) and shows the most notable "
                "class in it: a capital if the whole cell is that class, small if part")
        out: list[Any] = []
        if self.footer and compact:
            out.append(Text(self.footer, style="dim", no_wrap=True, overflow="ellipsis"))
        out.append(Panel(grid_text, title=self.title, subtitle=None, expand=False, padding=(0, 1)))
        out.append(Text(note, style="dim", no_wrap=compact, overflow="ellipsis"))
        if compact:
            out.extend(legend_lines)
            out.extend(compact_stats)
        else:
            legend = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
            for col, just in (("", "left"), ("class", "left"), ("frames", "right"), ("MiB", "right"),
                              ("%", "right")):
                legend.add_column(col, justify=just)
            for c in CLASSES:
                k = counts[c.name]
                legend.add_row(Text(c.glyph * 2, style=_cell_style(c)), c.label, f"{k:,}",
                               f"{k * PAGE / (1 << 20):,.1f}", f"{100 * k / max(1, n):.1f}")
            calls = Table(box=None, pad_edge=False, show_header=False)
            calls.add_column(style="bold")
            calls.add_column(justify="right")
            calls.add_row("kernel calls", f"{ks['calls']:,}" if isinstance(ks.get("calls"), int) else "-")
            for k, v in stats_items:
                calls.add_row(k, v)
            side = Table.grid(padding=(0, 3))
            side.add_row(legend, calls)
            out.append(side)
        out.extend(Text(line, no_wrap=True, overflow="crop") for line in orders)
        out.extend(events)
        procs = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("process", "pid", "pages", "large", "tables", "threads", "endpoints", "kernel", "quota"):
            procs.add_column(col, justify="left" if col == "process" else "right",
                             no_wrap=True, overflow="ellipsis", max_width=24 if col == "process" else None)
        for p in per[:procs_shown]:
            procs.add_row(snap.name_of(p["key"]), str(p["pid"]), str(p["pages"]), str(p["large_pages"]),
                          str(p["tables"]), str(p["threads"]), str(p["endpoints"]),
                          f"{p.get('kernel_used', '-')}/{p.get('kernel_limit', '-')}", str(p.get("user_quota", "-")))
        if len(per) > procs_shown:
            procs.add_row(f"… and {len(per) - procs_shown} more", *[""] * 8)
        if not per:
            procs.add_row(Text("(no client processes)", style="dim"), *[""] * 8)
        out.append(procs)
        if self.footer and not compact:
            out.append(Text(self.footer, style="dim"))
        return out


def render(snap: Snapshot, prev: Snapshot | None = None, columns: int = 64, rows: int = 16,
           title: str = "mmsim: physical memory", footer: str = "") -> Any:
    """The picture as a rich renderable: at most ``columns`` x ``rows`` cells, fewer where the console
    is narrower or (on a terminal) shorter; then the classes, per-order figures, rates and processes."""
    return Picture(snap, prev, columns, rows, title, footer)


def summary_line(snap: Snapshot, prev: Snapshot | None, elapsed: float | None = None) -> str:
    """The picture's numbers on one line (``mmsim up --no-live`` prints one a second)."""
    c = snap.counts()
    rt = rates(snap, prev)
    ks = snap.kstats
    head = f"[{elapsed:5.1f}s] " if elapsed is not None else ""
    mm = "mm away" if snap.mstats is None else (
        f"mm {_fmt_rate(rt['mm_requests'])} donations {snap.mstats['counters']['donations']} "
        f"reclaims {snap.mstats['counters']['reclaims']}")
    pb = F.pageblock_order(snap.large_page_sizes)
    free_large = int(F.free_blocks(snap.classes == USER_FREE, pb)[pb])
    return (f"{head}kernel free {c['kernel_free']} used {c['kernel_used']} shared {c['kernel_shared']} | "
            f"user free {c['user_free']} mapped {c['user_mapped']} shared {c['user_shared']} "
            f"large {c['user_large']} | free large pages {free_large} | procs {ks.get('processes')} | "
            f"kernel {_fmt_rate(rt['kernel_calls'])} | {mm}")
