"""The memory manager's own view of frame ownership, and the journal ops that change it.

Rules for this file: no sockets, clocks, randomness or I/O. The view is built
from the kernel's boot ``address_map`` and then changed only by ``apply(op)``,
with ``op`` a plain dict (the same dicts the journal stores), so replaying the
journal rebuilds exactly the view the mm had. Frame placement lives here too
(``pick``, ``pick_reclaim``; pure): each large-page-aligned block has an owner,
an owner's small pages and the kernel's donations gather in their own blocks,
and settled (long-lived) owners keep theirs, so aligned runs for large pages
survive churn (Linux's pageblock idea; the rules are in docs/large-pages.md).

Per frame (numpy): ``state`` (NONE / KERNEL / FREE / USED) and ``refs`` (the
mappings the mm made of that frame). Per block (numpy): ``bfree`` (free frames),
``bowner`` (owner tag) and ``never_whole``. Per client: its pid, its owner tag
and its mappings, keyed by virtual address.

``snapshot()`` is one op holding the whole view (the frame arrays compressed,
the clients with their mappings, the placement state, the pending intents);
applying it replaces everything, so a journal compacted to a snapshot and the
ops after it rebuilds exactly the view the full journal did.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import runs as R
from protocol.wire import MAX_RUNS

NONE, KERNEL, FREE, USED = 0, 1, 2, 3
FREE_BYTE = bytes([FREE])  # (``state`` is one byte per frame)
SNAPSHOT_VERSION = 1
STATE_NAMES = {NONE: "none", KERNEL: "kernel", FREE: "free", USED: "used"}
PAGE = 4096
KERNEL_TAG = 0  # the kernel's owner tag for blocks (donations); clients get 1, 2, ... in arrival order
VA_START = 0x40_0000  # first virtual address the mm hands out (4 MiB: keep page 0 unmapped)
SCALAR_SPOILT = 16  # up to this many never-whole blocks, placement's first tier is a plain Python loop


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
    owner: bool = True  # False: a share of another client's frames (not charged to this client)
    pending: bool = False  # an intent whose kernel call has not been confirmed


@dataclass
class ClientState:
    key: str
    pid: int
    tag: int = -1  # block owner tag (placement keeps a client's frames together)
    maps: dict[int, Mapping] = field(default_factory=dict)  # vaddr -> mapping
    starts: list[int] = field(default_factory=list)  # sorted vaddrs of maps
    charged: int = 0  # pages counted against the quota
    va_next: int = VA_START

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
        # blocks that hold something else at boot (holes, the kernel image, ...) can never be
        # a large page (unless the kernel gives all their frames back): small requests and
        # donations use them first
        self.never_whole = self.bfree < self.block
        self.never_whole_blocks = np.flatnonzero(self.never_whole)  # (constant, as never_whole)
        self.spoilt_list: list[int] = self.never_whole_blocks.tolist()
        self.clients: dict[str, ClientState] = {}
        self.by_pid: dict[int, str] = {}
        self.pending: dict[int, dict[str, Any]] = {}  # intent number -> op
        self.event_seq = 0
        self.bowner = np.full(nblocks, -1, dtype=np.int32)  # owner tag of each block (-1: none yet)
        self.next_tag = KERNEL_TAG + 1
        self.alive: set[int] = {KERNEL_TAG}  # tags of the owners that exist (the kernel and live clients)
        self.alive_tags = np.zeros(64, dtype=bool)  # the same as a lookup table by tag (grown as needed)
        self.alive_tags[KERNEL_TAG] = True
        self.last_intent = 0  # the highest intent number ever journaled (intent numbers are never reused)
        self.changes = 0  # bumped by every change of a frame's state (placement may differ afterwards)
        self.ram = int(np.count_nonzero(self.state))

    # ---- queries ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        st = self.state
        return {
            "ram": self.ram,
            "kernel": int(np.count_nonzero(st == KERNEL)),
            "free": int(np.count_nonzero(st == FREE)),
            "used": int(np.count_nonzero(st == USED)),
            "free_large_blocks": int(np.count_nonzero(self.bfree == self.block)),
        }

    def free_count(self) -> int:
        return int(self.bfree.sum())

    # ---- placement (pure: picks, does not change) ---------------------------

    def pick(self, n: int, *, below: int | None = None, large: bool = False, naive: bool = False,
             owner: int = -1) -> np.ndarray | None:
        """Choose ``n`` free frames, or None if there are not enough. Pure: changes nothing.

        ``large``: n is a multiple of the block and whole aligned free blocks are taken, lowest first.
        ``naive``: plain first fit (the lowest free frames), for comparison with the block policy.
        ``below``: only frames below this frame number (kernel-eligible ones, for donations).
        ``owner``: the tag of who gets them (a client's tag, or KERNEL_TAG for donations).

        Small requests and donations take blocks in this order (docs/large-pages.md):
        1. blocks that can never be a large page (a hole or boot data in them), fullest first;
        2. the owner's own blocks, fullest first, so an owner's pages gather in few blocks;
        3. whole free blocks, lowest first (a block broken becomes the owner's);
        4. other blocks, except those of settled owners, most free first (the owner takes a
           block over if its owner is gone or younger: see ``_may_take``);
        5. blocks of other settled owners (``_settled``), fullest first.
        """
        B = self.block
        top = self.n if below is None else min(below, self.n)
        if large:
            whole = np.flatnonzero(self.bfree[: top // B] == B)
            need = n // B
            if whole.size < need:
                return None
            return (whole[:need, None] * B + np.arange(B)).reshape(-1)
        if naive:
            free = np.flatnonzero(self.state[:top] == FREE)
            return free[:n] if free.size >= n else None
        bfree = self.bfree[: -(-top // B)]
        state = self.state
        if n > 0:
            # the first block in placement order usually has enough (a one-page request): no sort, and no
            # count of all free frames (it has at least n, then)
            b = self._first_block(bfree, owner)
            if b < 0:
                return None  # not one free frame
            lo = b * B
            if n == 1:  # the lowest free frame of the block, found in its bytes
                i = state[lo:min(lo + B, top)].tobytes().find(FREE_BYTE)
                if i >= 0:
                    return np.array([lo + i], dtype=np.int64)
            else:
                f = np.flatnonzero(state[lo:min(lo + B, top)] == FREE)
                if f.size >= n:
                    return f[:n] + lo
        if int(bfree.sum()) < n:  # (the last block may reach beyond ``top``: the walk below checks)
            return None
        keys = self._pick_keys(bfree, owner)
        out: list[np.ndarray] = []
        got = 0
        blocks = np.argsort(keys, kind="stable")[: int(np.count_nonzero(bfree))]
        for b in blocks.tolist():
            lo = b * B
            f = np.flatnonzero(state[lo:min(lo + B, top)] == FREE)[: n - got] + lo
            out.append(f)
            got += f.size
            if got >= n:
                return np.concatenate(out)
        return None

    def _first_block(self, bfree: np.ndarray, owner: int) -> int:
        """The first block of ``_pick_keys``' order, tier by tier (most requests stop at the first tier);
        -1 if no block has a free frame."""
        B = self.block
        nb = bfree.size
        if nb == self.bfree.size and len(self.spoilt_list) <= SCALAR_SPOILT:
            # the first tier in plain Python: a few blocks, read one by one, cost less than the array
            # operations (same answer: the fullest, the first in block order among equals)
            best, low = -1, B
            item = bfree.item
            for b in self.spoilt_list:
                v = item(b)
                if 0 < v < low:
                    best, low = b, v
            if best >= 0:
                return best
        else:
            spoilt = self.never_whole_blocks
            if nb < self.bfree.size:
                spoilt = spoilt[spoilt < nb]
            bf = bfree[spoilt]
            ok = (bf > 0) & (bf < B)
            if ok.any():
                return int(spoilt[ok][np.argmin(bf[ok])])
        has = bfree > 0
        whole = bfree == B
        nw = self.never_whole[:nb]
        broken = has & ~whole & ~nw
        bo = self.bowner[:nb]
        cand = np.flatnonzero(broken & (bo == owner))
        if cand.size:
            return int(cand[np.argmin(bfree[cand])])
        cand = np.flatnonzero(whole)
        if cand.size:
            return int(cand[0])
        rest = np.flatnonzero(broken & (bo != owner))
        settled = self._settled(bo[rest])
        cand = rest[~settled]
        if cand.size:  # most free first, the highest block among equals
            return int(cand[cand.size - 1 - np.argmax(bfree[cand][::-1])])
        cand = rest[settled]
        if not cand.size:
            return -1
        return int(cand[np.argmin(bfree[cand])])

    def _pick_keys(self, bfree: np.ndarray, owner: int) -> np.ndarray:
        """The placement order of ``pick`` as one sort key per block (smallest first; blocks with no
        free frame last): tier, then the order within the tier, then the block number."""
        B = self.block
        nb = bfree.size
        idx = np.arange(nb, dtype=np.int64)
        whole = bfree == B
        spoilt = self.never_whole[:nb] & ~whole
        bo = self.bowner[:nb]
        mine = bo == owner
        settled = ~mine & self._settled(bo)
        free = bfree.astype(np.int64)
        # tiers 0 (spoilt), 1 (mine), 4 (settled others): fullest first, lowest block first among equals;
        # 2 (whole): lowest first; 3 (the rest): most free first, highest block first among equals
        tier = np.where(spoilt, 0, np.where(whole, 2, np.where(mine, 1, np.where(settled, 4, 3))))
        within = np.where(tier == 3, (B - free) << 29 | (nb - 1 - idx), free << 29 | idx)
        within = np.where(tier == 2, idx, within)
        keys = tier.astype(np.int64) << 58 | within
        keys[bfree <= 0] = np.iinfo(np.int64).max
        return keys

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

    def _settled(self, owners: np.ndarray) -> np.ndarray:
        """Which owners are settled, that is likely to live long: the kernel, and live clients
        that have seen more clients arrive since they came than there are clients now. By
        Little's law that means they have outlived the mean client lifetime; a process that has
        lived long is likely to live long still (Harchol-Balter and Downey, 1997)."""
        young_limit = self.next_tag - (len(self.alive) - 1)  # tags at or above this are young
        return (owners == KERNEL_TAG) | (self._alive(owners) & (owners > KERNEL_TAG) & (owners < young_limit))

    def _may_take(self, owners: np.ndarray, owner: int) -> np.ndarray:
        """Which of these block owners a request by ``owner`` takes a block over from: owners
        that are gone, and owners younger than it (a larger tag; the kernel, tag 0, is the oldest
        owner of all). A block so ends up with the longest-lived owner that uses it."""
        return ~self._alive(owners) | ((owners > owner) & (owner >= 0))

    def pick_reclaim(self, kernel_free: np.ndarray, n: int, most: int | None = None) -> np.ndarray:
        """Of the kernel's free frames (as the kernel just reported them), the ones to take back:
        ``n`` of them, or up to ``most`` when that empties one more block of kernel frames.
        Sorted; pure. Blocks are taken in this order: those that are then entirely free (a
        large page again), then those left with the fewest frames not free; blocks that can
        never be a large page last."""
        B = self.block
        most = n if most is None else max(n, most)
        kf = np.unique(kernel_free)
        if kf.size == 0 or n <= 0:
            return kf[:0]
        blocks = kf // B
        ub, first, counts = np.unique(blocks, return_index=True, return_counts=True)
        left = B - self.bfree[ub] - counts  # frames still not free in each block afterwards
        left = np.where(self.never_whole[ub], B + 1, left)
        order = np.lexsort((counts, left))  # fewest left first; among equals, fewest frames to move
        parts = []
        total = 0
        for i in order.tolist():
            if total >= n:
                break
            k = int(counts[i]) if total + int(counts[i]) <= most else n - total
            parts.append(kf[first[i]:first[i] + k])
            total += k
        take = np.sort(np.concatenate(parts))
        runs = R.from_array(take)
        if len(runs) > MAX_RUNS:  # keep the request within the wire's run limit
            take = R.to_array(runs[:MAX_RUNS])
        return take

    # ---- changes (only through ops) -----------------------------------------

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
        else:
            np.add.at(self.bfree, blocks[old != FREE], 1)
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
        elif new == FREE:
            self.bfree[b] = self.bfree.item(b) + 1
        self.state[f] = new

    def _refs(self, frames: np.ndarray, delta: int, owner: int = -1) -> None:
        if frames.size == 1:
            self._ref1(int(frames[0]), delta, owner)
            return
        if frames.size == 0:
            return
        np.add.at(self.refs, frames, np.uint32(1) if delta > 0 else np.uint32(0xFFFFFFFF))
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
        if len(runs) == 1 and runs[0][1] == 1:  # one page: no array
            self._ref1(int(runs[0][0]), delta, owner)
        else:
            self._refs(R.to_array(runs), delta, owner)

    def _add_mapping(self, c: ClientState, m: Mapping) -> None:
        c.maps[m.vaddr] = m
        bisect.insort(c.starts, m.vaddr)
        if m.owner:
            c.charged += m.pages
        c.va_next = max(c.va_next, m.vaddr + m.pages * PAGE)
        self._refs_runs(m.frames, +1, c.tag)

    def _drop_mapping(self, c: ClientState, vaddr: int) -> Mapping:
        m = c.maps.pop(vaddr)
        c.starts.pop(bisect.bisect_left(c.starts, vaddr))
        if m.owner:
            c.charged -= m.pages
        self._refs_runs(m.frames, -1)
        return m

    def apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "client":
            old = self.clients.get(op["key"])
            if old is not None:
                self._set_alive(old.tag, False)
                if self.by_pid.get(old.pid) == old.key:
                    del self.by_pid[old.pid]
            self.clients[op["key"]] = ClientState(op["key"], op["pid"], tag=self.next_tag)
            self._set_alive(self.next_tag, True)
            self.next_tag += 1
            self.by_pid[op["pid"]] = op["key"]
        elif kind == "client_gone":
            c = self.clients.pop(op["key"], None)
            if c is not None:
                self._set_alive(c.tag, False)
                self.by_pid.pop(c.pid, None)
                for v in list(c.maps):
                    self._drop_mapping(c, v)
            for n, p in list(self.pending.items()):
                if p["key"] == op["key"]:
                    del self.pending[n]
        elif kind == "intent":
            c = self.clients[op["key"]]
            if op["do"] == "map":
                self._add_mapping(c, Mapping(op["vaddr"], op["pages"], op["prot"], op["large"], op["frames"],
                                             owner=op.get("owner", True), pending=True))
            else:  # unmap
                c.maps[op["vaddr"]].pending = True
            self.pending[op["n"]] = op
            self.last_intent = max(self.last_intent, op["n"])
        elif kind in ("done", "undo"):
            p = self.pending.pop(op["n"], None)
            if p is None:
                return
            c = self.clients.get(p["key"])
            if c is None:
                return
            if p["do"] == "map":
                if kind == "done":
                    c.maps[p["vaddr"]].pending = False
                else:
                    self._drop_mapping(c, p["vaddr"])
            else:
                if kind == "done":
                    self._drop_mapping(c, p["vaddr"])
                else:
                    c.maps[p["vaddr"]].pending = False
        elif kind == "donate":
            self._set(R.to_array(op["frames"]), KERNEL, KERNEL_TAG)
        elif kind == "reclaim":
            self._set(R.to_array(op["frames"]), FREE)
        elif kind == "events":
            self.event_seq = max(self.event_seq, op["seq"])
        elif kind == "reply":
            pass  # a journaled reply: the service's replay cache, not the view (MMService.restore)
        elif kind == "snapshot":
            self._load(op)
        elif kind == "repair":
            # set frames to a state after a reconciliation found the kernel disagreeing
            a = R.to_array(op["frames"])
            self._set(a, op["state"])
            self.refs[a] = op.get("refs", 0) if op["state"] == USED else 0
        else:
            raise ValueError(f"unknown journal op {kind!r}")

    # ---- snapshots (journal compaction) ------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole view as one journal op (see the module docstring). Its ``replies`` are the
        service's to fill (the view ignores them)."""
        pack = _pack_array
        return {
            "op": "snapshot", "v": SNAPSHOT_VERSION, "frames": self.n, "block": self.block,
            "state": pack(self.state), "refs": pack(self.refs), "bowner": pack(self.bowner),
            "next_tag": self.next_tag, "event_seq": self.event_seq, "last_intent": self.last_intent,
            "clients": [[c.key, c.pid, c.tag, c.va_next,
                         [[m.vaddr, m.pages, m.prot, m.large, m.frames, m.owner, m.pending] for m in c.maps.values()]]
                        for c in self.clients.values()],
            "pending": list(self.pending.values()),
            "replies": [],
        }

    def _load(self, op: dict[str, Any]) -> None:
        if op.get("v") != SNAPSHOT_VERSION or op["frames"] != self.n or op["block"] != self.block:
            raise ValueError(f"the journal's snapshot (version {op.get('v')}, {op['frames']} frames in blocks of "
                             f"{op['block']}) does not fit this machine ({self.n} frames in blocks of {self.block})")
        self.state = _unpack_array(op["state"], np.uint8)
        self.refs = _unpack_array(op["refs"], np.uint32)
        self.bowner = _unpack_array(op["bowner"], np.int32)
        B = self.block
        nblocks = self.bowner.size
        padded = np.zeros(nblocks * B, dtype=np.uint8)
        padded[: self.n] = self.state
        self.bfree = np.count_nonzero(padded.reshape(nblocks, B) == FREE, axis=1).astype(np.int32)
        self.next_tag = int(op["next_tag"])
        self.event_seq = int(op["event_seq"])
        self.last_intent = int(op["last_intent"])
        self.clients = {}
        self.by_pid = {}
        self.alive = set()
        self.alive_tags = np.zeros(max(64, self.next_tag), dtype=bool)
        self._set_alive(KERNEL_TAG, True)
        for key, pid, tag, va_next, maps in op["clients"]:
            c = ClientState(key, pid, tag=tag, va_next=va_next)
            for vaddr, pages, prot, large, frames, owner, pending in maps:
                c.maps[vaddr] = Mapping(vaddr, pages, prot, large, frames, owner=owner, pending=pending)
                if owner:
                    c.charged += pages
            c.starts = sorted(c.maps)
            self.clients[key] = c
            self.by_pid[pid] = key
            self._set_alive(tag, True)
        self.pending = {p["n"]: p for p in op["pending"]}
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
