"""The frame views: the shared palette and per-order figures, the terminal picture (fits its terminal,
reads without colour), the HTML view's recorder and data format, ``mmsim view``, and the page itself in
a real headless Chromium (panels show the state's figures, the scrubber moves, known frames have their
class's colour on screen, a 16 Mi-frame page does not hang)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from kernel_server.frames import KERNEL_FREE, KERNEL_USED, NONE, USER
from kernel_server.service import KernelService
from mm_service.policy import Config, MMCore, drive
from mmsim import colour as C
from mmsim import figures as F
from mmsim import picture as P
from mmsim import view as V
from protocol.calls import MM_CALLS, validate
from protocol.errors import Error
from support import mmsim

MM, OP = "M" * 40, "O" * 40
A, B, CC = "A" * 40, "B" * 40, "C" * 40


# ---- reference implementations (written independently of the module's) ------------------------------

def greedy_blocks(free: np.ndarray, top: int) -> list[int]:
    """A buddy allocator's free lists, built the slow way: walk the frames, and at each free frame
    take the largest aligned all-free block (at most 2^top) that starts there."""
    out = [0] * (top + 1)
    f, n = 0, len(free)
    while f < n:
        if not free[f]:
            f += 1
            continue
        k = 0
        while k < top and f % (1 << (k + 1)) == 0 and f + (1 << (k + 1)) <= n and all(free[f:f + (1 << (k + 1))]):
            k += 1
        out[k] += 1
        f += 1 << k
    return out


# ---- palette ----------------------------------------------------------------------------------------

def test_ciede2000_matches_published_test_pairs():
    # Sharma, Wu, Dalal (2005), table 1: pairs 1, 7, 17, 34
    assert C.ciede2000((50, 2.6772, -79.7751), (50, 0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert C.ciede2000((50, 0, 0), (50, -1, 2)) == pytest.approx(2.3669, abs=1e-4)
    assert C.ciede2000((50, 2.5, 0), (73, 25, -18)) == pytest.approx(27.1492, abs=1e-4)
    assert C.ciede2000((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514)) == pytest.approx(0.9082, abs=1e-4)
    assert C.lab("#FFFFFF") == pytest.approx([100, 0, 0], abs=1e-3)


@pytest.mark.parametrize("kind", [None, "protanopia", "deuteranopia", "tritanopia"])
@pytest.mark.parametrize("palette", ["terminal", "html"])
def test_no_two_classes_look_alike_for_any_colour_vision(kind, palette):
    colours = F.TERMINAL_COLOURS if palette == "terminal" else F.HTML_COLOURS
    d, a, b = C.min_distance(colours, kind)
    assert d >= 11, f"{a} and {b} are only {d:.1f} apart (CIEDE2000) for {kind or 'normal vision'}"


def test_cvd_simulation_merges_what_it_should():
    # a brown and an olive, well apart for normal vision, nearly one colour for deuteranopes (and close
    # for protanopes); the check above is only worth something if the simulation does this
    assert C.ciede2000(C.lab("#B35900"), C.lab("#6E7F00")) > 30
    assert C.ciede2000(C.lab("#B35900", "deuteranopia"), C.lab("#6E7F00", "deuteranopia")) < 3
    assert C.ciede2000(C.lab("#B35900", "protanopia"), C.lab("#6E7F00", "protanopia")) < 8
    assert list(C.simulate("#777777", "deuteranopia")) == pytest.approx(list(C.rgb("#777777")), abs=0.01)  # greys stay


def test_every_class_has_its_own_glyph():
    glyphs = [c.glyph for c in F.CLASSES]
    assert len(set(glyphs)) == len(glyphs)
    partial = [c.partial for c in F.CLASSES if c.partial != c.glyph]
    assert not set(partial) & set(glyphs) and len(set(partial)) == len(partial)
    html_glyphs = [g for g in F.CODE_GLYPHS.values() if g]
    assert len(set(html_glyphs)) == len(html_glyphs)
    assert F.owner_tag(0) == "1" and F.owner_tag(35) == "10" and len({F.owner_tag(i) for i in range(2000)}) == 2000
    assert not set(html_glyphs) & {F.owner_tag(i) for i in range(2000)}


# ---- per-order figures --------------------------------------------------------------------------------

@given(st.lists(st.booleans(), min_size=1, max_size=300), st.integers(0, 6))
def test_free_blocks_are_a_buddy_allocators_free_lists(bits, top):
    free = np.array(bits, dtype=bool)
    blocks = F.free_blocks(free, top)
    assert blocks.tolist() == greedy_blocks(bits, top)
    assert sum(int(b) << k for k, b in enumerate(blocks)) == int(free.sum())


def test_free_blocks_examples():
    free = np.zeros(32, dtype=bool)
    free[0:4] = True  # one order-2 block
    free[5:8] = True  # 5 (order 0), 6-7 (order 1)
    free[16:32] = True  # order 4, capped at top 3: two order-3 blocks
    assert F.free_blocks(free, 3).tolist() == [1, 1, 1, 2]
    assert F.free_blocks(free, 4).tolist() == [1, 1, 1, 0, 1]


def test_fragmentation_index_as_linux_computes_it():
    # 4 free order-0 frames, nothing bigger: an order-1 request fails by fragmentation:
    # 1000 - (1000 + 4*1000/2) / 4 = 250
    assert F.extfrag_index([4, 0, 0], 1) == 250
    assert F.extfrag_index([4, 0, 0], 2) == 1000 - (1000 + 1000) // 4  # 500
    assert F.extfrag_index([4, 0, 0], 0) == -1000  # it would succeed
    assert F.extfrag_index([0, 0, 0], 1) == 0  # nothing free: index 0
    assert F.extfrag_index([0, 1, 0], 2) == 1000 - (1000 + 500) // 1  # one free pair, a request of 4: -500
    assert F.extfrag_index([2, 0, 1], 2) == -1000
    assert [F.fmt_extfrag(v) for v in (-1000, 0, 250, 1000, 7)] == ["-1.000", "0.000", "0.250", "1.000", "0.007"]
    assert F.order_size(0) == "4K" and F.order_size(9) == "2M" and F.order_size(18) == "1G"
    assert F.max_order([2 << 20, 1 << 30]) == 18 and F.pageblock_order([2 << 20, 1 << 30]) == 9
    assert F.max_order([4 << 20]) == 10 and F.max_order([]) == 10


# ---- the terminal picture -------------------------------------------------------------------------------

def kernel_with_clients(n_clients: int = 3, memory: int = 64 << 20) -> KernelService:
    svc = KernelService.boot(arch="i686", memory=memory, mm_key=MM, operator_key=OP, kernel_pool_frames=256)
    free = np.flatnonzero((svc.core.frames.kind == USER) & (svc.core.frames.refs == 0))
    for i in range(n_clients):
        pid = svc.call(MM, "proc_create", {"key": f"{i:040d}", "kernel_quota": 8})["pid"]
        for j, f in enumerate(free[i * 500:(i + 1) * 500:50].tolist()):
            assert not isinstance(svc.call(MM, "map", {"pid": pid, "vaddr": 0x1000_0000 + j * 4096,
                                                       "frames": [[f, 1]], "prot": 3}), Error)
    return svc


def picture_of(svc: KernelService) -> P.Snapshot:
    kcall = V.inprocess_call(svc)
    return P.take_snapshot(kcall, None, kcall("hello", {}))


def test_cells_show_a_lone_mapped_frame_among_free_ones():
    classes = np.full(4096, P.USER_FREE, dtype=np.uint8)
    classes[100] = P.USER_MAPPED  # one frame in the second cell of 64
    classes[0:64] = P.KERNEL_USED  # the first cell, whole
    classes[200:256] = P.RESERVED  # most of the fourth cell; the rest is user free
    cs = P.cells(classes, 64)
    assert cs.per == 64
    assert [cs.glyph(i) for i in range(4)] == ["K", "m", "·", "·"]
    assert cs.codes[3] == P.USER_FREE and not cs.whole[3]
    assert P.cells(classes, 50).per == 128  # cells are a power of two frames


def _lines(text: str) -> list[str]:
    return re.sub(r"\x1b\[[0-9;]*m", "", text).split("\n")


def test_live_picture_fits_an_80x24_terminal_and_keeps_the_run_directory_and_processes():
    svc = kernel_with_clients(n_clients=20)
    snap = picture_of(svc)
    out = io.StringIO()
    console = Console(file=out, width=80, height=24, force_terminal=True, color_system="truecolor")
    console.print(P.render(snap, None, columns=64, rows=16, footer="3.0s of 20s. Run directory /tmp/mmsim-run-x"))
    lines = [line for line in _lines(out.getvalue()) if line]
    assert len(lines) <= 23, "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "Run directory /tmp/mmsim-run-x" in text
    assert "process" in text and "pid" in text and "more" in text  # the table, cut with a count of the rest
    assert "free blocks" in text and "user free" in text and "fragmentation index" in text
    for c in P.CLASSES:
        assert c.label in text, c.label
    wide = io.StringIO()
    Console(file=wide, width=160, height=60, force_terminal=True).print(P.render(snap, None, columns=128, rows=16))
    assert max(len(line) for line in _lines(wide.getvalue())) > 100  # a bigger terminal gets a bigger picture


@pytest.mark.parametrize("how", ["NO_COLOR", "redirected"])
def test_picture_reads_without_colour(how, monkeypatch):
    svc = kernel_with_clients()
    snap = picture_of(svc)
    out = io.StringIO()
    if how == "NO_COLOR":
        monkeypatch.setenv("NO_COLOR", "1")
        console = Console(file=out, width=100, height=40, force_terminal=True)
    else:
        console = Console(file=out, width=100)  # not a terminal: no styles at all
    console.print(P.render(snap, None, columns=64, rows=16))
    text = out.getvalue()
    assert "\x1b[3" not in text and "\x1b[4" not in text  # no colour codes
    grid = [line for line in _lines(text) if " MiB " in line and "│" in line]
    assert grid
    cells = "".join(line.split(" MiB ", 1)[1] for line in grid)
    counts = snap.counts()
    for c in P.CLASSES:  # every class present shows with its own glyph (capital or small)
        if counts[c.name]:
            assert c.glyph in cells or c.partial in cells, c.name
    assert len(set(cells) - {" ", "│"}) >= 5


def test_summary_line_counts_free_large_pages():
    svc = kernel_with_clients()
    snap = picture_of(svc)
    pb = F.pageblock_order(snap.large_page_sizes)
    expected = greedy_blocks((snap.classes == P.USER_FREE).tolist(), pb)[pb]
    assert f"free large pages {expected} " in P.summary_line(snap, None)


# ---- the recorder --------------------------------------------------------------------------------------

class World:
    """A kernel service with an operator key and a real mm core (no journal), driven in-process."""

    def __init__(self, memory: int = 64 << 20, arch: str = "i686") -> None:
        self.kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, operator_key=OP, kernel_pool_frames=256)
        self.mm = MMCore(self.kernel.call(MM, "address_map"), self.kernel.call(MM, "hello"),
                         Config(low=16, target=64, high=256, room=4))
        self.run(self.mm.refresh())

    def run(self, gen):
        return drive(gen, lambda c, a: self.kernel.call(MM, c, a), lambda ops: None)

    def req(self, key: str, call: str, **args):
        model = validate(MM_CALLS, call, args)
        assert not isinstance(model, Error), model
        r = self.run(self.mm.request(key, call, model))
        assert not isinstance(r, Error), r
        self.run(self.mm.maintain())
        return r

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.kernel.core.frames.kind.copy(), self.kernel.core.frames.refs.copy()

    def snap(self, rec: V.Recorder, label: str, t: float, **kw) -> tuple[np.ndarray, np.ndarray]:
        rec.snapshot(label, t, self.kernel, mm_view=self.mm.view, mm_stats=self.mm.stats(), **kw)
        return self.arrays()


def scenario(history: str | None = None) -> tuple[World, V.Recorder, dict]:
    """Four snapshots: boot; three clients allocate (two adjacent large pages for B); frames of A mapped
    into C behind the mm's back (the views disagree: a violation); A freed and the stray mapping gone."""
    w = World()
    rec = V.Recorder(title="test scenario", history=history, names={A: "client-a", B: "client-b", CC: "client-c"},
                     labels={"client-a": "steady"})
    states = [w.snap(rec, "boot", 0.0)]
    ra = w.req(A, "alloc", pages=8, prot=3)
    rb = w.req(B, "alloc", pages=2048, prot=3, large=True)
    rc = w.req(CC, "alloc", pages=3, prot=3)
    states.append(w.snap(rec, "allocs", 1.0, events=["three clients allocate"]))
    pid_c = w.mm.view.clients[CC].pid
    f0 = ra["frames"][0][0]
    assert not isinstance(w.kernel.call(MM, "map", {"pid": pid_c, "vaddr": 0x3000_0000, "frames": [[f0, 2]],
                                                    "prot": 1}), Error)
    rec.note("a stray map of two of A's frames into C")
    states.append(w.snap(rec, "behind the mm's back", 2.0, violation="I8: the views disagree"))
    w.kernel.call(MM, "unmap", {"pid": pid_c, "vaddr": 0x3000_0000, "pages": 2})
    w.req(A, "free", vaddr=ra["vaddr"], pages=8)
    states.append(w.snap(rec, "A freed", 3.0))
    return w, rec, {"ra": ra, "rb": rb, "rc": rc, "states": states, "pid_c": pid_c}


def replay(rec: V.Recorder) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each snapshot's (who, refs) arrays, rebuilt from the records as the page does."""
    n = rec.header["frames"]
    who, refs = np.zeros(n, dtype=np.uint16), np.zeros(n, dtype=np.uint8)
    out = []
    for s in rec.snaps:
        V.apply_xor(who, s["who"])
        V.apply_xor(refs, s["refs"])
        out.append((who.copy(), refs.copy()))
    for s in reversed(rec.snaps[1:]):  # and back again: XOR records undo themselves
        V.apply_xor(who, s["who"])
        V.apply_xor(refs, s["refs"])
    assert (who == out[0][0]).all() and (refs == out[0][1]).all()
    return out


def test_recording_changes_nothing_in_the_kernel():
    w = World()
    w.req(A, "alloc", pages=5, prot=3)
    before = (w.kernel.call(MM, "stats", {"from_pid": 0}), *w.arrays(), w.kernel.calls, w.kernel.refused)
    V.Recorder().snapshot("x", 0.0, w.kernel, mm_view=w.mm.view)
    after = (w.kernel.call(MM, "stats", {"from_pid": 0}), *w.arrays(), w.kernel.calls, w.kernel.refused)
    assert before[0] == {**after[0], "calls": before[0]["calls"]}
    assert after[0]["calls"] == before[0]["calls"] + 1  # only the stats call just made
    assert (before[1] == after[1]).all() and (before[2] == after[2]).all()
    assert after[3] == before[3] + 1 and after[4] == before[4]


def test_recorder_records_owners_large_pages_shares_and_disagreements():
    w, rec, s = scenario()
    arrays = replay(rec)
    core = w.kernel.core
    owners = {o["name"]: i for i, o in enumerate(rec.owners)}
    assert set(owners) == {"client-a", "client-b", "client-c"}
    assert rec.owners[owners["client-a"]]["label"] == "steady"
    who1, refs1 = arrays[1]
    kind1, krefs1 = s["states"][1]
    # every frame's code follows the kernel's kind, and mapped user frames name their mapper
    assert ((who1 == F.K_USED) == (kind1 == KERNEL_USED)).all()
    assert ((who1 == F.K_FREE) == (kind1 == KERNEL_FREE)).all()
    assert ((who1 == F.NOT_RAM) == (kind1 == NONE)).all()
    assert (refs1 == np.minimum(krefs1, 255)).all()
    for key, r in (("client-a", s["ra"]), ("client-b", s["rb"]), ("client-c", s["rc"])):
        for first, count in r["frames"]:
            assert (who1[first:first + count] == F.OWNER_BASE + owners[key]).all(), key
    assert ((who1 >= F.OWNER_BASE) == ((kind1 == USER) & (krefs1 > 0))).all()
    # B's two large pages are listed one by one (adjacent, never merged)
    first_b = s["rb"]["frames"][0][0]
    lp = core.profile.pages_at(0)
    snap1 = rec.snaps[1]
    assert snap1["large"] == [[first_b, lp, owners["client-b"]], [first_b + lp, lp, owners["client-b"]]]
    assert {p["owner"]: p["frames"] for p in snap1["procs"]}[owners["client-b"]] == 2 * lp
    # the stray map: C also maps two of A's frames; the mm does not know (refs differ), a violation
    snap2 = rec.snaps[2]
    f0 = s["ra"]["frames"][0][0]
    assert snap2["sharers"] == [[f0, 2, owners["client-c"]]]
    assert snap2["disagree"] == [[f0, 2, V.DISAGREE_CLASSES.index("refs_differ")]]
    assert snap2["audit"]["divergences"] == 2 and snap2["violation"] == "I8: the views disagree"
    assert "a stray map of two of A's frames into C" in snap2["events"]
    assert rec.snaps[1]["disagree"] == [] and rec.snaps[3]["disagree"] == []
    # A freed: its frames are user free again
    who3 = arrays[3][0]
    for first, count in s["ra"]["frames"]:
        assert (who3[first:first + count] == F.U_FREE).all()
    assert any("is gone" not in e and "kernel:" in e for e in rec.snaps[3]["events"])
    # the figures: counts and free blocks per order as the kernel's arrays give them
    for snap, (kind, refs) in zip(rec.snaps, s["states"]):
        user_free = (kind == USER) & (refs == 0)
        top = rec.header["max_order"]
        assert snap["buddy"]["user"] == greedy_blocks(user_free.tolist(), top)
        assert snap["buddy"]["kernel"] == greedy_blocks((kind == KERNEL_FREE).tolist(), top)
        assert snap["extfrag"]["user"] == [F.extfrag_index(snap["buddy"]["user"], k) for k in range(top + 1)]
        assert snap["counts"]["user_free"] == int(user_free.sum())


def test_history_file_rebuilds_the_same_page_and_survives_a_cut_off_end(tmp_path):
    hist = str(tmp_path / "view.history")
    _, rec, _ = scenario(history=hist)
    again = V.Recorder.load(hist)
    assert again.data() == rec.data()
    with open(hist, "ab") as f:  # a run killed while writing its last record
        f.write(msgpack.packb({"type": "snap", "label": "cut", "who": b"x" * 100})[:30])
    cut = V.Recorder.load(hist)
    assert len(cut.snaps) == 4
    with open(str(tmp_path / "empty.history"), "wb"):
        pass
    with pytest.raises(ValueError, match="holds no recording"):
        V.Recorder.load(str(tmp_path / "empty.history"))
    with open(str(tmp_path / "future.history"), "wb") as f:
        f.write(msgpack.packb({"type": "header", "format": V.FORMAT + 1}))
    with pytest.raises(ValueError, match=f"format {V.FORMAT + 1}"):
        V.Recorder.load(str(tmp_path / "future.history"))


@given(st.lists(st.lists(st.integers(0, 5), min_size=64, max_size=64), min_size=1, max_size=5),
       st.integers(1, 40))
def test_xor_records_step_forward_and_back(arrays, gap):
    prev = np.zeros(64, dtype=np.uint16)
    blobs = []
    for a in arrays:
        new = np.array(a, dtype=np.uint16)
        blobs.append(V.xor_ranges(prev, new, gap=gap))
        prev = new
    cur = np.zeros(64, dtype=np.uint16)
    for blob, a in zip(blobs, arrays):
        V.apply_xor(cur, blob)
        assert cur.tolist() == a
    for blob, a in zip(reversed(blobs), [[0] * 64] + arrays[:-1][::-1]):
        V.apply_xor(cur, blob)
    assert not cur.any()


def test_page_is_self_contained_and_escapes_names(tmp_path):
    w = World()
    rec = V.Recorder(title="<b>title</b>", names={A: "</script><script>alert(1)</script>"})
    w.req(A, "alloc", pages=2, prot=3)
    w.snap(rec, "one", 0.0)
    path = str(tmp_path / "p.html")
    size = rec.write(path)
    page = open(path, encoding="utf-8").read()
    assert size == len(page.encode())
    assert "</script><script>alert" not in page and "<b>title</b>" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "@import" not in page and "url(" not in page
    data = json.loads(re.search(r'<script type="application/json" id="mmview-data">(.*?)</script>', page,
                                re.S).group(1))
    assert data["owners"][0]["name"] == "</script><script>alert(1)</script>"


def test_file_size_of_a_long_256mib_recording_stays_small():
    rec, _ = synthetic("i686", 256 << 20, snapshots=30, churn=200)
    size = len(V.render_page(rec.data()).encode())
    assert size < 400 * 1024, size  # 30 snapshots of 65,536 frames with 200 frames changing each time


def synthetic(arch: str, memory: int, snapshots: int, clients: int = 6, churn: int = 200, seed: int = 1):
    """A recording of a kernel whose clients map scattered frames and a few large pages, then churn."""
    rng = np.random.default_rng(seed)
    svc = KernelService.boot(arch=arch, memory=memory, mm_key=MM, operator_key=OP, kernel_pool_frames=2048)
    core = svc.core
    lp = core.profile.pages_at(core.profile.large_levels[0])
    keys = [f"{i:040d}" for i in range(clients)]
    pids = [svc.call(MM, "proc_create", {"key": k, "kernel_quota": 200})["pid"] for k in keys]
    rec = V.Recorder(title=f"synthetic {arch}", names={k: f"client-{i}" for i, k in enumerate(keys)})
    mapped: dict[int, list[int]] = {p: [] for p in pids}
    va = dict.fromkeys(pids, 0x1000_0000)

    def map_some(pid: int, n: int) -> None:
        free = np.flatnonzero((core.frames.kind == USER) & (core.frames.refs == 0))
        for f in np.sort(rng.choice(free[: n * 20], size=n, replace=False)).tolist():
            assert not isinstance(svc.call(MM, "map", {"pid": pid, "vaddr": va[pid], "frames": [[f, 1]], "prot": 3}),
                                  Error)
            mapped[pid].append(va[pid])
            va[pid] += 4096

    for p in pids:
        map_some(p, 1000)
    free = np.flatnonzero((core.frames.kind == USER) & (core.frames.refs == 0))
    whole = np.flatnonzero(np.bincount(free // lp, minlength=core.frames.n // lp + 1) == lp)
    for i, b in enumerate(whole[-4:].tolist()):
        svc.call(MM, "map", {"pid": pids[i % clients], "vaddr": 0x8000_0000 + i * lp * 4096, "frames": [[b * lp, lp]],
                             "prot": 3, "large": True})
    for s in range(snapshots):
        rec.snapshot(f"step {s}", float(s), svc)
        for p in pids:
            for _ in range(churn // clients):
                v = mapped[p].pop(int(rng.integers(len(mapped[p]))))
                svc.call(MM, "unmap", {"pid": p, "vaddr": v, "pages": 1})
            map_some(p, churn // clients)
    return rec, svc


# ---- mmsim view ------------------------------------------------------------------------------------------

def test_view_command_refuses_what_it_cannot_use(run_dir):
    r = mmsim("view", "--run-dir", os.path.join(run_dir, "nothing"))
    assert r.returncode == 2 and "not a run directory" in r.stderr
    from protocol import rundir

    rundir.init(run_dir, clients=0)
    r = mmsim("view", "--run-dir", run_dir, "--timeout", "0.3")
    assert r.returncode == 1 and "view.history does not exist" in r.stderr
    with open(os.path.join(run_dir, V.HISTORY), "wb") as f:
        f.write(b"\x93garbage")
    r = mmsim("view", "--run-dir", run_dir, "--history")
    assert r.returncode == 1 and "cannot read" in r.stderr and "holds no recording" in r.stderr


def test_view_of_a_running_system_and_of_its_recorded_history(run_dir):
    """The kernel as its own process; this test plays the mm (with the mm's key pair) to create
    processes and map frames; the recording and ``mmsim view`` read it as the operator."""
    from mmsim.system import System
    from protocol import rundir
    from protocol.connection import Connection

    system = System(run_dir, lease=60.0, clients=2)
    rundir.admit(run_dir, "observer")  # System's readiness pings use this key (the operator's would do)
    try:
        system.start_kernel()
        recording = V.Recording(run_dir, interval=0.2).start()
        mm = Connection(rundir.read_endpoint(run_dir, "kernel"), rundir.public_key(run_dir, "kernel"),
                        *rundir.load_keypair(run_dir, "mm"), timeout=5.0)
        with mm:
            segs = mm.call("frame_info", {"frames": [[0, 65536]], "max_segments": 16384})["segments"]
            free = [s for s in segs if s[2] == "user" and s[1] >= 4096]
            first = free[0][0]
            lp = 1024
            big = -(-(first + 8) // lp) * lp  # a 4 MiB-aligned block above the small pages
            pids = {}
            for name in ("client-0", "client-1"):
                key = rundir.public_key(run_dir, name).decode()
                pids[name] = mm.call("proc_create", {"key": key, "kernel_quota": 8})["pid"]
            mm.call("map", {"pid": pids["client-0"], "vaddr": 0x1000_0000, "frames": [[first, 5]], "prot": 3})
            mm.call("map", {"pid": pids["client-1"], "vaddr": 0x4000_0000, "frames": [[big, lp]], "prot": 3,
                            "large": True})
            r = mmsim("view", "--run-dir", run_dir, "--samples", "2", "--interval", "0.2")
            assert r.returncode == 0, r.stderr
            assert "2 snapshot(s) of the running system" in r.stdout
            data = page_data(os.path.join(run_dir, "view-now.html"))
            names = {o["name"]: i for i, o in enumerate(data["owners"])}
            assert {"client-0", "client-1"} <= set(names)
            snap = data["snaps"][-1]
            assert snap["large"] == [[big, lp, names["client-1"]]]
            procs = {p["owner"]: p for p in snap["procs"]}
            assert procs[names["client-0"]]["frames"] == 5 and procs[names["client-0"]]["pages"] == 5
            assert snap["mm"] is None and snap["mm_error"]  # no mm in this system: said, not hidden
            time.sleep(0.5)
            mm.call("unmap", {"pid": pids["client-0"], "vaddr": 0x1000_0000, "pages": 5})
            recording.note("client-0 unmapped its pages", violation=True)
            time.sleep(0.5)
        path = recording.stop()
        assert path == os.path.join(run_dir, V.PAGE_NAME) and os.path.exists(path) and not recording.errors
        data = page_data(path)
        snaps = data["snaps"]
        assert len(snaps) >= 3 and snaps[-1]["label"] == "end"
        marked = [s for s in snaps if s["violation"]]
        assert marked and "client-0 unmapped its pages" in marked[0]["events"]
        assert [p["frames"] for p in snaps[-1]["procs"]] == [0, lp]
    finally:
        system.stop()
    os.remove(os.path.join(run_dir, V.PAGE_NAME))
    r = mmsim("view", "--run-dir", run_dir, "--timeout", "0.3")  # the system is gone: from the history
    assert r.returncode == 0, r.stderr
    assert "recorded snapshot(s)" in r.stdout
    assert page_data(os.path.join(run_dir, V.PAGE_NAME))["snaps"][-1]["label"] == "end"


def page_data(path: str) -> dict:
    page = open(path, encoding="utf-8").read()
    return json.loads(re.search(r'id="mmview-data">(.*?)</script>', page, re.S).group(1))


# ---- in a real browser -----------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) driven by selenium through Debian's chromedriver; offline."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {', '.join(missing)} (.ci/run installs them)")
        pytest.skip(f"browser tests need {', '.join(missing)}")
    profile = tempfile.mkdtemp(prefix="mmsim-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
              "--force-device-scale-factor=1", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def scenario_page(tmp_path_factory):
    w, rec, s = scenario()
    path = str(tmp_path_factory.mktemp("view") / "scenario.html")
    rec.write(path)
    return path, w, rec, s


def open_page(d, path: str, timeout: float = 20.0) -> None:
    d.get("file://" + path)
    wait(d, "document.body.dataset.ready === '1'", timeout)
    d.get_log("browser")


def wait(d, condition: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = d.execute_script(f"return {condition}")
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {condition}")
        time.sleep(0.05)


def show(d, i: int) -> None:
    d.execute_script(f"mmview.goto({i})")
    wait(d, f"document.body.dataset.snap === '{i}' && mmview.current() === {i}")


def errors(d) -> list:
    return [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]


def pixel(d, f: int, dx: int = 1, dy: int = 2) -> tuple[int, int, int]:
    """The colour on screen inside frame ``f``'s cell (near its corner, away from its glyph)."""
    from PIL import Image

    x, y, w, h = d.execute_script(f"return mmview.frameBox({f})")
    assert w >= 8, "zoom in first"
    img = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")
    return img.getpixel((int(x) + dx, int(y) + dy))


def near(rgb: tuple[int, int, int], hex_colour: str, tol: int = 3) -> bool:
    want = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


def test_page_panels_show_the_states_figures(browser, scenario_page):
    path, w, rec, s = scenario_page
    d = browser
    open_page(d, path)
    top = rec.header["max_order"]
    for i in (1, 2):
        show(d, i)
        kind, refs = s["states"][i]
        user = greedy_blocks(((kind == USER) & (refs == 0)).tolist(), top)
        kernel = greedy_blocks((kind == KERNEL_FREE).tolist(), top)
        for k in range(top + 1):
            assert d.find_element("id", f"buddy-user-{k}").text == str(user[k]), (i, k)
            assert d.find_element("id", f"buddy-kernel-{k}").text == str(kernel[k]), (i, k)
            assert d.find_element("id", f"extfrag-user-{k}").text == F.fmt_extfrag(F.extfrag_index(user, k))
        pb = rec.header["pageblock_order"]
        assert d.find_element("id", "large-free-count").text == str(sum(user[k] << (k - pb) for k in range(pb, top + 1)))
        assert d.find_element("id", "count-user-free").text == f"{int(((kind == USER) & (refs == 0)).sum()):,}"
    procs = d.find_element("id", "procs").text
    assert "client-b" in procs and "2,048" in procs and "client-a (steady)" in procs
    assert "2 frame(s) disagree" in d.find_element("id", "audit").text
    assert "a stray map" in d.find_element("id", "events").text
    assert "VIOLATION" in d.find_element("id", "snap-label").text
    assert not errors(d)


def test_scrubber_steps_and_frames_change_owner_on_screen(browser, scenario_page):
    path, w, rec, s = scenario_page
    d = browser
    open_page(d, path)
    label = d.find_element("id", "snap-label")
    assert "snapshot 1 of 4: boot" in label.text
    a_frame = s["ra"]["frames"][0][0] + 3
    d.execute_script(f"mmview.centreOn({a_frame}, 16)")
    assert near(pixel(d, a_frame), F.USER_FREE_COLOUR)  # boot: nobody has it
    d.find_element("id", "btn-next").click()
    wait(d, "document.body.dataset.snap === '1'")
    assert "snapshot 2 of 4: allocs" in label.text
    assert d.find_element("id", "scrub").get_attribute("value") == "1"
    assert near(pixel(d, a_frame), F.CLIENT_COLOURS[0])  # client-a, the first owner seen
    d.find_element("id", "btn-last").click()
    wait(d, "document.body.dataset.snap === '3'")
    assert "A freed" in label.text and near(pixel(d, a_frame), F.USER_FREE_COLOUR)
    d.find_element("id", "btn-violation").click()  # back to the first violation
    wait(d, "document.body.dataset.snap === '2'")
    assert "VIOLATION" in label.text
    f0 = s["ra"]["frames"][0][0]
    assert near(pixel(d, f0, 1, 5), F.DISAGREE_COLOUR, tol=40)  # the overlay's box around the frame
    d.find_element("id", "btn-prev").click()
    wait(d, "document.body.dataset.snap === '1'")
    assert not near(pixel(d, f0, 1, 5), F.DISAGREE_COLOUR, tol=40)
    d.find_element("id", "btn-play").click()  # plays to the end
    wait(d, "document.body.dataset.snap === '3'", timeout=10)
    assert not errors(d)


def test_known_frames_have_their_class_colour_on_screen(browser, scenario_page):
    path, w, rec, s = scenario_page
    d = browser
    open_page(d, path)
    show(d, 1)
    kind, refs = s["states"][1]
    first = {name: int(np.flatnonzero(kind == code)[0]) for name, code in
             (("used", KERNEL_USED), ("free", KERNEL_FREE), ("none", NONE))}
    first["user"] = int(np.flatnonzero((kind == USER) & (refs == 0))[-1])
    first["b"] = s["rb"]["frames"][0][0] + 5000 % 2048
    expected = {"used": F.KERNEL_USED_COLOUR, "free": F.KERNEL_FREE_COLOUR, "none": F.NOT_RAM_COLOUR,
                "user": F.USER_FREE_COLOUR, "b": F.CLIENT_COLOURS[1]}
    for name, f in first.items():
        d.execute_script(f"mmview.centreOn({f}, 16)")
        got = pixel(d, f)
        assert near(got, expected[name]), (name, f, got, expected[name])
    # colour by reference count: the same client frame takes the refs colour instead
    d.execute_script("const s = document.getElementById('colour-by'); s.value = 'refs'; s.dispatchEvent(new Event('change'))")
    assert near(pixel(d, first["b"]), "#FFE945")  # one reference
    assert not errors(d)


def test_a_16_mi_frame_page_loads_and_zooms_without_hanging(browser, tmp_path):
    svc = KernelService.boot(arch="i686-pae", memory=64 << 30, mm_key=MM, operator_key=OP, kernel_pool_frames=1024)
    assert svc.core.frames.n >= 1 << 24
    pid = svc.call(MM, "proc_create", {"key": A, "kernel_quota": 8})["pid"]
    rec = V.Recorder(title="64 GiB", names={A: "client-a"})
    rec.snapshot("empty", 0.0, svc)
    last = int(np.flatnonzero(svc.core.frames.kind == USER)[-1])
    assert not isinstance(svc.call(MM, "map", {"pid": pid, "vaddr": 0x1000_0000, "frames": [[last, 1]], "prot": 3}),
                          Error)
    rec.snapshot("one frame at the top", 1.0, svc)
    path = str(tmp_path / "big.html")
    size = rec.write(path)
    assert size < 1 << 20
    d = browser
    open_page(d, path, timeout=30)
    show(d, 1)
    assert d.execute_script(f"return mmview.code({last})") == F.OWNER_BASE
    d.find_element("id", "zoom-in").click()
    d.find_element("id", "zoom-fit").click()
    d.execute_script(f"mmview.centreOn({last}, 16)")
    assert near(pixel(d, last), F.CLIENT_COLOURS[0])
    assert not errors(d)


def test_hover_names_the_frame_and_an_owner_can_be_picked_out(browser, scenario_page):
    from selenium.webdriver.common.action_chains import ActionChains

    path, w, rec, s = scenario_page
    d = browser
    open_page(d, path)
    show(d, 2)
    f0 = s["ra"]["frames"][0][0]
    big = s["rb"]["frames"][0][0] + 1500  # in B's second large page

    def hover(f: int) -> str:
        d.execute_script(f"mmview.centreOn({f}, 16)")
        x, y, size, _ = d.execute_script(f"return mmview.frameBox({f})")
        left, top, cw, ch = d.execute_script(
            "const r = document.getElementById('grid').getBoundingClientRect(); return [r.left, r.top, r.width, r.height]")
        # offsets are from the canvas's centre
        ActionChains(d).move_to_element_with_offset(d.find_element("id", "grid"), int(x + size / 2 - left - cw / 2),
                                                    int(y + size / 2 - top - ch / 2)).perform()
        return d.find_element("id", "hover").text

    text = hover(f0)
    assert f"frame {f0:,}" in text and "mapped by client-a (steady)" in text and "refs 2" in text
    assert "also mapped by client-c" in text and "DISAGREE: reference counts differ" in text
    text = hover(big)
    assert "mapped by client-b" in text and "in a large page of 4M" in text
    used = int(np.flatnonzero(s["states"][2][0] == KERNEL_USED)[0])
    d.execute_script(f"mmview.centreOn({used}, 16)")
    assert near(pixel(d, used), F.KERNEL_USED_COLOUR)
    d.find_element("css selector", f"#legend tr[data-code='{F.OWNER_BASE + 1}']").click()  # client-b
    assert not near(pixel(d, used), F.KERNEL_USED_COLOUR, tol=20)  # everyone else fades
    d.execute_script(f"mmview.centreOn({big}, 16)")
    assert near(pixel(d, big), F.CLIENT_COLOURS[1])
    d.find_element("css selector", f"#legend tr[data-code='{F.OWNER_BASE + 1}']").click()  # and back
    d.execute_script(f"mmview.centreOn({used}, 16)")
    assert near(pixel(d, used), F.KERNEL_USED_COLOUR)
    assert not errors(d)
