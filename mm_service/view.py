"""The memory manager's own view of frame ownership, changed only by journal records.

Rules for this file: no sockets, clocks, randomness or I/O. The view is built
from the kernel's boot ``address_map`` and then changed only by
``apply(record)`` (``mm_service.records``: the same records the journal
stores), so replaying the journal rebuilds exactly the view the mm had.
Which frames a request takes is decided in ``mm_service.placement`` (pure,
reading this view); the view keeps the state placement reads.

Per frame (numpy): ``state`` (NONE / KERNEL / FREE / USED) and ``refs`` (the
mappings the mm made of that frame). Per block (numpy): ``bfree`` (free frames),
``bowner`` (owner tag) and ``never_whole``. Per client: its pid, its owner tag,
the quotas it was granted (user pages, kernel frames), what is charged to it
(the pages of every mapping it has: its own allocations and the offers it
accepted), and its mappings, keyed by virtual address. Per offer: who offers
which allocation to whom, and whether an accept of it is being settled.

``snapshot()`` is one record holding the whole view (the frame arrays
compressed, the clients with their mappings, the offers, the placement
state, the pending intents); applying it replaces everything, so a journal
compacted to a snapshot and the records after it rebuilds exactly the view
the full journal did.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mm_service import records as J
from mm_service.observe import NO_OBSERVER, MMObserver
from protocol import runs as R

NONE, KERNEL, FREE, USED = 0, 1, 2, 3
FREE_BYTE = bytes([FREE])  # (``state`` is one byte per frame)
SNAPSHOT_VERSION = 2
STATE_NAMES = {NONE: "none", KERNEL: "kernel", FREE: "free", USED: "used"}
PAGE = 4096
KERNEL_TAG = 0  # the kernel's owner tag for blocks (donations); clients get 1, 2, ... in arrival order
VA_START = 0x40_0000  # first virtual address the mm hands out (4 MiB: keep page 0 unmapped)
SCALAR_SPOILT = 16  # up to this many never-whole blocks, placement's first tier is a plain Python loop
SCALAR_REFS = 32  # a mapping of up to this many frames has its reference counts changed frame by frame


def _pack_array(a: np.ndarray) -> dict[str, Any]:
    """A per-frame (or per-block) array for a snapshot: as runs of equal values (a few numpy passes,
    small for the long runs memory has), or compressed whole when it is too fragmented for runs."""
    starts = np.flatnonzero(a[1:] != a[:-1]) + 1
    if starts.size < a.size // 16:
        starts = np.concatenate(([0], starts)).astype(np.int64)
        return {"n": int(a.size), "starts": zlib.compress(starts.tobytes(), 1),
                "values": zlib.compress(a[starts].tobytes(), 1)}
    return {"n": int(a.size), "raw": zlib.compress(a.tobytes(), 1)}


def _unpack_array(d: dict[str, Any], dtype: Any) -> np.ndarray:
    if "raw" in d:
        out = np.frombuffer(zlib.decompress(d["raw"]), dtype=dtype).copy()
    else:
        starts = np.frombuffer(zlib.decompress(d["starts"]), dtype=np.int64)
        values = np.frombuffer(zlib.decompress(d["values"]), dtype=dtype)
        out = np.repeat(values, np.diff(np.append(starts, d["n"])))
    if out.size != d["n"]:
        raise ValueError(f"a snapshot array holds {out.size} values, not {d['n']}")
    return out


@dataclass
class Mapping:
    vaddr: int
    pages: int
    prot: int
    large: bool
    frames: list[list[int]]  # runs
    offer: int = 0  # the offer it accepted (0: an allocation of the client's own)
    pending: bool = False  # an intent whose kernel call has not been settled


@dataclass
class Offer:
    offer: int
    key: str  # who offers
    vaddr: int  # its allocation
    pages: int
    prot: int
    peer: str  # who may accept
    taken: int = 0  # the intent of an accept being settled (0: none)


@dataclass
class ClientState:
    key: str
    pid: int
    tag: int = -1  # block owner tag (placement keeps a client's frames together)
    quota: int = 0  # user pages granted
    kernel_quota: int = 0  # kernel frames granted
    maps: dict[int, Mapping] = field(default_factory=dict)  # vaddr -> mapping
    starts: list[int] = field(default_factory=list)  # sorted vaddrs of maps
    charged: int = 0  # pages of its mappings (each mapper is charged for the frames it maps)
    va_next: int = VA_START
    offers_out: set[int] = field(default_factory=set)  # offers it made that are still open
    offers_in: set[int] = field(default_factory=set)  # offers made to it that are still open

    def overlaps(self, vaddr: int, pages: int) -> Mapping | None:
        end = vaddr + pages * PAGE
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i >= 0:
            m = self.maps[self.starts[i]]
            if m.vaddr + m.pages * PAGE > vaddr:
                return m
        if i + 1 < len(self.starts) and self.starts[i + 1] < end:
            return self.maps[self.starts[i + 1]]
        return None


class View:
    def __init__(self, address_map: dict[str, Any], large_frames: int) -> None:
        n = int(address_map["frames"])
        self.n = n
        self.kernel_limit = n if address_map.get("kernel_limit") is None else min(n, int(address_map["kernel_limit"]))
        self.block = max(1, int(large_frames))  # frames per large page: the unit kept intact
        self.state = np.zeros(n, dtype=np.uint8)
        self.refs = np.zeros(n, dtype=np.uint32)
        for e in address_map["entries"]:
            owner = e["owner"]
            s = KERNEL if owner == "kernel" else FREE if owner == "user" else NONE
            self.state[e["first"]:e["first"] + e["count"]] = s
        nblocks = -(-n // self.block)
        padded = np.zeros(nblocks * self.block, dtype=np.uint8)
        padded[:n] = self.state
        self.bfree = np.count_nonzero(padded.reshape(nblocks, self.block) == FREE, axis=1).astype(np.int32)
        self.nfree = int(self.bfree.sum())  # the sum of ``bfree``, kept by every change of it
        # blocks that hold something else at boot (holes, the kernel image, ...) can never be
        # a large page (unless the kernel gives all their frames back): small requests and
        # donations use them first
        self.never_whole = self.bfree < self.block
        self.never_whole_blocks = np.flatnonzero(self.never_whole)  # (constant, as never_whole)
        self.spoilt_list: list[int] = self.never_whole_blocks.tolist()
        self.clients: dict[str, ClientState] = {}
        self.by_pid: dict[int, str] = {}
        self.pending: dict[int, J.Intent] = {}  # intent number -> intent, in journal order
        self.offers: dict[int, Offer] = {}  # open offers by number
        self.last_offer = 0  # the highest offer number ever made (never reused)
        self.granted_user = 0  # user pages granted to the clients (their quotas)
        self.granted_kernel = 0  # kernel frames granted to them
        self.event_seq = 0
        self.bowner = np.full(nblocks, -1, dtype=np.int32)  # owner tag of each block (-1: none yet)
        self.next_tag = KERNEL_TAG + 1
        self.alive: set[int] = {KERNEL_TAG}  # tags of the owners that exist (the kernel and live clients)
        self.alive_tags = np.zeros(64, dtype=bool)  # the same as a lookup table by tag (grown as needed)
        self.alive_tags[KERNEL_TAG] = True
        self.last_intent = 0  # the highest intent number ever journaled (intent numbers are never reused)
        self.changes = 0  # bumped by every change of a frame's state (placement may differ afterwards)
        self.ram = int(np.count_nonzero(self.state))
        self.count = np.bincount(self.state, minlength=4).tolist()  # frames in each state, kept as they change
        self.observer: MMObserver = NO_OBSERVER  # told of every record applied (``mm_service.observe``)
        self._watched = False

    def set_observer(self, observer: MMObserver | None) -> None:
        """Tell ``observer`` of every record applied from now on (None: nobody)."""
        self.observer = observer if observer is not None else NO_OBSERVER
        self._watched = self.observer is not NO_OBSERVER

    # ---- queries ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Frames by state (kept as they change: anyone's ``stats`` costs the same on any RAM size)."""
        c = self.count
        return {
            "ram": self.ram,
            "kernel": c[KERNEL],
            "free": c[FREE],
            "used": c[USED],
            "free_large_blocks": int(np.count_nonzero(self.bfree == self.block)),
        }

    def free_count(self) -> int:
        return self.nfree

    def _alive(self, owners: np.ndarray) -> np.ndarray:
        t = self.alive_tags
        return t.take(owners, mode="clip") & (owners >= 0) & (owners < t.size)

    def _set_alive(self, tag: int, alive: bool) -> None:
        if alive:
            self.alive.add(tag)
            if tag >= self.alive_tags.size:
                grown = np.zeros(max(2 * self.alive_tags.size, tag + 1), dtype=bool)
                grown[: self.alive_tags.size] = self.alive_tags
                self.alive_tags = grown
        else:
            self.alive.discard(tag)
        if tag < self.alive_tags.size:
            self.alive_tags[tag] = alive

    def _may_take(self, owners: np.ndarray, owner: int) -> np.ndarray:
        """Which of these block owners a request by ``owner`` takes a block over from: owners
        that are gone, and owners younger than it (a larger tag; the kernel, tag 0, is the oldest
        owner of all). A block so ends up with the longest-lived owner that uses it."""
        return ~self._alive(owners) | ((owners > owner) & (owner >= 0))

    # ---- changes (only through records) -----------------------------------------

    def _set(self, frames: np.ndarray, new: int, owner: int = -1) -> None:
        if frames.size == 1:
            self._set1(int(frames[0]), new, owner)
            return
        if frames.size == 0:
            return
        self.changes += 1
        old = self.state[frames]
        blocks = frames // self.block
        leaving = blocks[old == FREE]
        if leaving.size and new != FREE and owner >= 0:
            # who breaks a whole block owns it; an older owner (or anyone, once the owner is
            # gone) takes a broken block over by taking frames from it
            ub = np.unique(leaving)
            bo = self.bowner[ub]
            whole = self.bfree[ub] == self.block
            take = whole | (~self.never_whole[ub] & (bo != owner) & self._may_take(bo, owner))
            self.bowner[ub[take]] = owner
        if new != FREE:
            np.add.at(self.bfree, leaving, -1)
            self.nfree -= int(leaving.size)
        else:
            back = blocks[old != FREE]
            np.add.at(self.bfree, back, 1)
            self.nfree += int(back.size)
        c = self.count
        for state, n in enumerate(np.bincount(old, minlength=4).tolist()):
            c[state] -= n
        c[new] += int(frames.size)
        self.state[frames] = new

    def _set1(self, f: int, new: int, owner: int = -1) -> None:
        """``_set`` of one frame, without the array machinery (the one-page request path)."""
        old = self.state.item(f)
        if old == new:
            return
        self.changes += 1
        b = f // self.block
        if old == FREE:
            free = self.bfree.item(b)
            if owner >= 0:
                bo = self.bowner.item(b)
                if free == self.block or (not self.never_whole.item(b) and bo != owner and (
                        not (0 <= bo < self.alive_tags.size and self.alive_tags.item(bo)) or bo > owner)):
                    self.bowner[b] = owner
            self.bfree[b] = free - 1
            self.nfree -= 1
        elif new == FREE:
            self.bfree[b] = self.bfree.item(b) + 1
            self.nfree += 1
        self.count[old] -= 1
        self.count[new] += 1
        self.state[f] = new

    def _refs(self, frames: np.ndarray, delta: int, owner: int = -1, run: bool = False) -> None:
        """Each of ``frames`` gains (``delta`` > 0) or loses a reference (repeats count each time); a
        frame with references becomes USED (``owner`` taking its block as ``_set`` says), one with none
        FREE. ``run``: the frames are one run, ascending (no repeats: a slice)."""
        if frames.size == 1:
            self._ref1(int(frames[0]), delta, owner)
            return
        if frames.size == 0:
            return
        one = np.uint32(1) if delta > 0 else np.uint32(0xFFFFFFFF)
        if run:
            self.refs[int(frames[0]):int(frames[0]) + frames.size] += one
            uniq = frames
        else:
            np.add.at(self.refs, frames, one)
            uniq = np.unique(frames)
        r = self.refs[uniq]
        self._set(uniq[(r > 0) & (self.state[uniq] != USED)], USED, owner)
        self._set(uniq[(r == 0) & (self.state[uniq] == USED)], FREE)

    def _ref1(self, f: int, delta: int, owner: int = -1) -> None:
        """``_refs`` of one frame (the one-page request path)."""
        r = (self.refs.item(f) + (1 if delta > 0 else -1)) & 0xFFFFFFFF
        self.refs[f] = r
        st = self.state.item(f)
        if r > 0 and st != USED:
            self._set1(f, USED, owner)
        elif r == 0 and st == USED:
            self._set1(f, FREE)

    def _refs_runs(self, runs: list[list[int]], delta: int, owner: int = -1) -> None:
        """``_refs`` of the frames of ``runs``: up to SCALAR_REFS of them frame by frame, in order (the same
        counts, states and block owners: each frame's change decides as the array's would, and ten times
        cheaper than its array operations for a few frames), else with arrays."""
        if len(runs) == 1:
            first, count = runs[0]
            if count == 1:  # one page
                self._ref1(int(first), delta, owner)
            elif count <= SCALAR_REFS:
                ref1 = self._ref1
                for f in range(int(first), int(first) + count):
                    ref1(f, delta, owner)
            else:
                self._refs(np.arange(first, first + count, dtype=np.int64), delta, owner, run=True)
        elif sum(c for _, c in runs) <= SCALAR_REFS:
            ref1 = self._ref1
            for first, count in runs:
                for f in range(int(first), int(first) + count):
                    ref1(f, delta, owner)
        else:
            self._refs(R.to_array(runs), delta, owner)

    def _add_mapping(self, c: ClientState, m: Mapping) -> None:
        c.maps[m.vaddr] = m
        bisect.insort(c.starts, m.vaddr)
        c.charged += m.pages
        c.va_next = max(c.va_next, m.vaddr + m.pages * PAGE)
        self._refs_runs(m.frames, +1, c.tag)

    def _drop_mapping(self, c: ClientState, vaddr: int) -> Mapping:
        m = c.maps.pop(vaddr)
        c.starts.pop(bisect.bisect_left(c.starts, vaddr))
        c.charged -= m.pages
        self._refs_runs(m.frames, -1)
        if c.offers_out:
            self._close_offers_of(c, vaddr)
        return m

    def _close_offer(self, o: int) -> None:
        off = self.offers.pop(o, None)
        if off is None:
            return
        for key, side in ((off.key, "offers_out"), (off.peer, "offers_in")):
            c = self.clients.get(key)
            if c is not None:
                getattr(c, side).discard(o)

    def _close_offers_of(self, c: ClientState, vaddr: int) -> None:
        """An allocation is being freed (or is gone): the offers of it die."""
        for o in [o for o in c.offers_out if self.offers[o].vaddr == vaddr]:
            if self._watched:
                self.observer.probe("mm.offer.withdrawn")
            self._close_offer(o)

    def apply(self, rec: J.Record) -> None:
        """Apply one journal record (``mm_service.records``): the only way the view changes (an observer
        hears of each, after it is applied)."""
        self._apply[type(rec)](self, rec)
        if self._watched:
            self.observer.applied(rec)

    def _new_client(self, rec: J.NewClient) -> None:
        if rec.key in self.clients:  # (a process the view had lost track of: the old one is gone)
            self._client_gone(J.ClientGone(rec.key))
        self.clients[rec.key] = ClientState(rec.key, rec.pid, tag=self.next_tag, quota=rec.quota,
                                            kernel_quota=rec.kernel_quota)
        self.granted_user += rec.quota
        self.granted_kernel += rec.kernel_quota
        self._set_alive(self.next_tag, True)
        self.next_tag += 1
        self.by_pid[rec.pid] = rec.key

    def _client_gone(self, rec: J.ClientGone) -> None:
        c = self.clients.get(rec.key)
        if c is not None:
            for n in [n for n, p in self.pending.items() if p.key == rec.key]:
                self._settle(n, False)  # its intents settle with its death (undone: nothing is left)
            for o in list(c.offers_out) + list(c.offers_in):
                self._close_offer(o)
            for v in list(c.maps):
                self._drop_mapping(c, v)
            del self.clients[rec.key]
            self.granted_user -= c.quota
            self.granted_kernel -= c.kernel_quota
            self._set_alive(c.tag, False)
            if self.by_pid.get(c.pid) == rec.key:
                del self.by_pid[c.pid]

    def _intent(self, rec: J.Intent) -> None:
        c = self.clients[rec.key]
        if rec.do == "map":
            self._add_mapping(c, Mapping(rec.vaddr, rec.pages, rec.prot, rec.large, rec.frames, offer=rec.offer,
                                         pending=True))
            off = self.offers.get(rec.offer) if rec.offer else None
            if off is not None:
                off.taken = rec.n
        else:  # unmap
            c.maps[rec.vaddr].pending = True
            if c.offers_out:
                self._close_offers_of(c, rec.vaddr)
        self.pending[rec.n] = rec
        self.last_intent = max(self.last_intent, rec.n)

    def _settle(self, n: int, done: bool) -> None:
        p = self.pending.pop(n, None)
        if p is None:
            return
        c = self.clients.get(p.key)
        if p.offer:
            off = self.offers.get(p.offer)
            if off is not None and off.taken == n:
                if done:
                    self._close_offer(p.offer)  # an offer is accepted once
                else:
                    off.taken = 0  # the accept failed: the peer may try again
        if c is None or p.vaddr not in c.maps:
            return
        if (p.do == "map") != done:  # an undone map, a done unmap: the mapping goes
            self._drop_mapping(c, p.vaddr)
        else:
            c.maps[p.vaddr].pending = False

    def _done(self, rec: J.Done) -> None:
        self._settle(rec.n, True)

    def _undo(self, rec: J.Undo) -> None:
        self._settle(rec.n, False)

    def _offered(self, rec: J.Offered) -> None:
        self.offers[rec.offer] = Offer(rec.offer, rec.key, rec.vaddr, rec.pages, rec.prot, rec.peer)
        self.clients[rec.key].offers_out.add(rec.offer)
        self.clients[rec.peer].offers_in.add(rec.offer)
        self.last_offer = max(self.last_offer, rec.offer)

    def _donate(self, rec: J.Donate) -> None:
        self._set(R.to_array(rec.frames), KERNEL, KERNEL_TAG)

    def _reclaim(self, rec: J.Reclaim) -> None:
        self._set(R.to_array(rec.frames), FREE)

    def _events(self, rec: J.EventsRead) -> None:
        self.event_seq = max(self.event_seq, rec.seq)

    def _reply(self, rec: J.Reply) -> None:
        pass  # a journaled reply: the service's replay cache, not the view (MMService.restore)

    def _repair(self, rec: J.Repair) -> None:
        """Frames set to a state after recovery found the kernel disagreeing."""
        a = R.to_array(rec.frames)
        self._set(a, rec.state)
        self.refs[a] = rec.refs if rec.state == USED else 0

    def _repair_mapping(self, rec: J.RepairMapping) -> None:
        """An allocation replaced by what the kernel really maps in its range (recovery)."""
        c = self.clients.get(rec.key)
        if c is None:
            return
        if rec.vaddr in c.maps:
            self._drop_mapping(c, rec.vaddr)
        for vaddr, pages, first, prot, large in rec.segments:
            self._add_mapping(c, Mapping(vaddr, pages, prot, bool(large), [[first, pages]]))

    _apply = {J.NewClient: _new_client, J.ClientGone: _client_gone, J.Intent: _intent, J.Done: _done,
              J.Undo: _undo, J.Offered: _offered, J.Donate: _donate, J.Reclaim: _reclaim, J.EventsRead: _events,
              J.Reply: _reply, J.Repair: _repair, J.RepairMapping: _repair_mapping,
              J.Snapshot: lambda self, rec: self._load(rec.body)}

    # ---- snapshots (journal compaction) ------------------------------------------

    def snapshot(self) -> J.Snapshot:
        """The whole view as one record (see the module docstring). Its ``replies`` are the service's
        to fill (the view ignores them)."""
        pack = _pack_array
        return J.Snapshot({
            "v": SNAPSHOT_VERSION, "frames": self.n, "block": self.block,
            "state": pack(self.state), "refs": pack(self.refs), "bowner": pack(self.bowner),
            "next_tag": self.next_tag, "event_seq": self.event_seq, "last_intent": self.last_intent,
            "last_offer": self.last_offer,
            "clients": [[c.key, c.pid, c.tag, c.quota, c.kernel_quota, c.va_next,
                         [[m.vaddr, m.pages, m.prot, m.large, m.frames, m.offer, m.pending] for m in c.maps.values()]]
                        for c in self.clients.values()],
            "offers": [[o.offer, o.key, o.vaddr, o.pages, o.prot, o.peer, o.taken] for o in self.offers.values()],
            "pending": [J.encode(p) for p in self.pending.values()],
            "replies": [],
        })

    def _load(self, body: dict[str, Any]) -> None:
        if body.get("v") != SNAPSHOT_VERSION or body["frames"] != self.n or body["block"] != self.block:
            raise ValueError(f"the journal's snapshot (version {body.get('v')}, {body['frames']} frames in blocks of "
                             f"{body['block']}) does not fit this machine ({self.n} frames in blocks of {self.block})")
        self.state = _unpack_array(body["state"], np.uint8)
        self.count = np.bincount(self.state, minlength=4).tolist()
        self.refs = _unpack_array(body["refs"], np.uint32)
        self.bowner = _unpack_array(body["bowner"], np.int32)
        B = self.block
        nblocks = self.bowner.size
        padded = np.zeros(nblocks * B, dtype=np.uint8)
        padded[: self.n] = self.state
        self.bfree = np.count_nonzero(padded.reshape(nblocks, B) == FREE, axis=1).astype(np.int32)
        self.nfree = int(self.bfree.sum())
        self.next_tag = int(body["next_tag"])
        self.event_seq = int(body["event_seq"])
        self.last_intent = int(body["last_intent"])
        self.last_offer = int(body["last_offer"])
        self.clients = {}
        self.by_pid = {}
        self.alive = set()
        self.alive_tags = np.zeros(max(64, self.next_tag), dtype=bool)
        self._set_alive(KERNEL_TAG, True)
        self.granted_user = self.granted_kernel = 0
        for key, pid, tag, quota, kquota, va_next, maps in body["clients"]:
            c = ClientState(key, pid, tag=tag, quota=quota, kernel_quota=kquota, va_next=va_next)
            for vaddr, pages, prot, large, frames, offer, pending in maps:
                c.maps[vaddr] = Mapping(vaddr, pages, prot, large, frames, offer=offer, pending=pending)
                c.charged += pages
            c.starts = sorted(c.maps)
            self.clients[key] = c
            self.by_pid[pid] = key
            self.granted_user += quota
            self.granted_kernel += kquota
            self._set_alive(tag, True)
        self.offers = {}
        for o, key, vaddr, pages, prot, peer, taken in body["offers"]:
            self.offers[o] = Offer(o, key, vaddr, pages, prot, peer, taken)
            self.clients[key].offers_out.add(o)
            self.clients[peer].offers_in.add(o)
        self.pending = {}
        for item in body["pending"]:
            p = J.decode(item)
            self.pending[p.n] = p
        self.changes += 1

    # ---- comparison with the kernel (audit / recovery) ------------------------

    def compare(self, kinds: np.ndarray, refs: np.ndarray) -> dict[str, Any]:
        """Compare with the kernel's per-frame kind names coded as 0 none, 1 kernel, 2 user;
        and the kernel's refcounts. Returns counts and the divergent frames by class."""
        st = self.state
        view_kernel = st == KERNEL
        k_kernel = kinds == 1
        k_user = kinds == 2
        k_none = kinds == 0
        free_but_kernel = np.flatnonzero((st == FREE) & k_kernel)
        kernel_but_user = np.flatnonzero(view_kernel & k_user)
        owner_other = np.flatnonzero(((st == NONE) != k_none) | ((st == USED) & k_kernel))
        free_but_mapped = np.flatnonzero((st == FREE) & k_user & (refs > 0))
        refs_differ = np.flatnonzero((st == USED) & k_user & (refs != self.refs))
        classes = {
            "free_but_kernel": free_but_kernel,
            "kernel_but_user": kernel_but_user,
            "owner_mismatch": owner_other,
            "free_but_mapped": free_but_mapped,
            "refs_differ": refs_differ,
        }
        return {
            "divergences": int(sum(a.size for a in classes.values())),
            "classes": {k: R.from_array(v)[:32] for k, v in classes.items() if v.size},
            "class_counts": {k: int(v.size) for k, v in classes.items()},
            "arrays": classes,
        }
