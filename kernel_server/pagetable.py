"""A process's page-table tree (``AddressSpace``) and the shape of the tree for a profile (``Geometry``).

Rules for this file: no sockets, clocks, randomness or I/O. The tree never takes kernel frames
itself: the kernel hands it the frames of new tables (``add_tables``) and takes back the frames
of tables that became empty (``drop_entries``), so the kernel charges them. Reads never change
anything; writes (``add_*``, ``write_*``, ``clear``, ``drop_*``) cannot fail: the kernel checked
everything first.

Layout, as a page-table tree keeps it:

- every table is ``tables[(level, tag)] = [frame, used]``: ``used`` counts its entries in use
  (child tables and mappings). ``ROOT = (0, 0)`` is the root; its frame is -1 when the root is no
  frame of its own (with PAE the PDPT lives in the process's object frame). The table of level
  ``lv >= 1`` on the way to virtual page ``vp`` has tag ``vp >> geo.shift[lv]``.
- each leaf table (the last level: 4 KiB mappings) also has its entries in ``leaves[tag]``, a
  flat int32 array of ``geo.leaf_entries`` slots, each ``EMPTY`` or
  ``frame << ENTRY_SHIFT | CLIENT_MADE? | prot``. ``small_pages`` counts the entries in use.
- large mappings are few and live in a dict: ``large[base vpage] = (level, first frame, prot)``;
  one counts as one entry of the table of its level.

A mapping belongs to whoever made it: the ``CLIENT_MADE`` bit marks the 4 KiB read-only maps of
kernel-shared frames a client made itself; every other mapping (and every large one) is the
memory manager's. Emptied leaf arrays are kept for reuse in a list of spares (making one costs
as much as filling it); every spare is all ``EMPTY``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, Profile

ROOT = (0, 0)  # the key of the root table
EMPTY = -1  # a leaf entry that maps nothing
ENTRY_SHIFT = 4  # a leaf entry is frame << ENTRY_SHIFT | CLIENT_MADE? | prot (prot: 3 bits)
CLIENT_MADE = 8  # leaf entry bit: the client made this mapping itself (not the mm)
PROT_MASK = 7
SPARE_LEAVES = 64  # emptied leaf entry arrays kept for reuse
_MADE_BY = np.array(["mm", "client"], dtype=object)  # CLIENT_MADE bit -> who made the mapping

Key = tuple[int, int]
Span = tuple[int, int, int]  # (leaf tag, first index, end index): a stretch of one leaf table


class Geometry:
    """The tree's shape for a profile: levels, tag shifts, the leaf table's size."""

    __slots__ = ("profile", "levels", "leaf", "shift", "leaf_bits", "leaf_entries", "leaf_mask", "large_levels",
                 "pages_at")

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.levels = profile.levels
        self.leaf = self.levels - 1  # the level of the tables that map 4 KiB pages
        # shift[lv]: vpage >> shift[lv] is the tag of the level-lv table on the way to that page
        self.shift = (0,) + tuple(profile.entry_shifts[lv - 1] - PAGE_SHIFT for lv in range(1, self.levels))
        self.leaf_bits = self.shift[self.leaf]
        self.leaf_entries = 1 << self.leaf_bits
        self.leaf_mask = self.leaf_entries - 1
        self.large_levels = profile.large_levels
        self.pages_at = tuple(profile.pages_at(lv) for lv in range(self.levels))  # 4 KiB pages an entry covers

    def parent(self, key: Key) -> Key:
        """The key of the table holding the entry that points to table ``key``."""
        lv, tag = key
        if lv == 1:
            return ROOT
        return lv - 1, tag >> (self.shift[lv - 1] - self.shift[lv])

    def table_of(self, level: int, vp: int) -> Key:
        """The table whose entry maps (or points on to) page ``vp`` at ``level``."""
        return ROOT if level == 0 else (level, vp >> self.shift[level])

    def leaf_spans(self, lo: int, hi: int) -> list[Span]:
        """(tag, first index, end index) in each leaf table that pages lo..hi-1 fall in, in order."""
        bits, size = self.leaf_bits, self.leaf_entries
        out = []
        for tag in range(lo >> bits, ((hi - 1) >> bits) + 1):
            base = tag << bits
            out.append((tag, max(lo, base) - base, min(hi, base + size) - base))
        return out


class AddressSpace:
    """One process's page tables, leaf entries and large mappings (see the module docstring)."""

    __slots__ = ("geo", "tables", "leaves", "small_pages", "large")

    def __init__(self, geo: Geometry, root_frame: int) -> None:
        self.geo = geo
        self.tables: dict[Key, list[int]] = {ROOT: [root_frame, 0]}  # (level, tag) -> [frame, used]
        self.leaves: dict[int, np.ndarray] = {}  # leaf table tag -> its entries (int32)
        self.small_pages = 0  # 4 KiB mappings: non-empty leaf entries
        self.large: dict[int, tuple[int, int, int]] = {}  # base vpage -> (level, first frame, prot)

    # ---- reads ---------------------------------------------------------------------------------

    def table_frames(self) -> list[int]:
        """The frames of its page tables (the root's too, when it is a frame of its own)."""
        return [t[0] for t in self.tables.values() if t[0] >= 0]

    def large_at(self, vp: int) -> tuple[int, int, int, int] | None:
        """The large mapping covering page ``vp``: (base, level, frame, prot), or None."""
        pages_at = self.geo.pages_at
        for lv in self.geo.large_levels:
            n = pages_at[lv]
            base = vp - vp % n
            m = self.large.get(base)
            if m is not None and vp < base + pages_at[m[0]]:
                return base, m[0], m[1], m[2]
        return None

    def first_large_in(self, lo: int, hi: int) -> int | None:
        """The base of the first large mapping overlapping pages lo..hi-1, or None. Looks at the fewer
        of: the large-page slots of the range, the process's large mappings."""
        large = self.large
        if not large:
            return None
        pages_at = self.geo.pages_at
        levels = self.geo.large_levels
        found: list[int] = []
        if sum((hi - lo) // pages_at[lv] + 1 for lv in levels) <= len(large):
            for lv in levels:
                n = pages_at[lv]
                for b in range(lo - lo % n, hi, n):
                    m = large.get(b)
                    if m is not None and b + pages_at[m[0]] > lo:
                        found.append(b)
                        break
        else:
            found = [b for b, (lv, _f, _p) in large.items() if b < hi and b + pages_at[lv] > lo]
        return min(found) if found else None

    def first_small(self, lo: int, hi: int) -> int | None:
        """The first page in lo..hi-1 with a 4 KiB mapping, or None."""
        leaves = self.leaves
        if not leaves:
            return None
        geo = self.geo
        bits = geo.leaf_bits
        if hi - lo == 1:
            e = leaves.get(lo >> bits)
            return lo if e is not None and e[lo & geo.leaf_mask] != EMPTY else None
        t0, t1 = lo >> bits, (hi - 1) >> bits
        for tag in (range(t0, t1 + 1) if t1 - t0 < len(leaves) else sorted(t for t in leaves if t0 <= t <= t1)):
            e = leaves.get(tag)
            if e is None:
                continue
            base = tag << bits
            i = max(lo, base) - base
            mapped = e[i:min(hi, base + geo.leaf_entries) - base] != EMPTY
            k = int(mapped.argmax())  # the first True, or 0 when there is none
            if mapped[k]:
                return base + i + k
        return None

    def missing(self, lo: int, hi: int, down_to: int) -> list[Key]:
        """Table keys (level, tag) of levels 1..down_to that pages lo..hi-1 need and lack, parents first."""
        out = []
        tables = self.tables
        shift = self.geo.shift
        if hi - lo == 1:  # one page: one table per level
            for lv in range(1, down_to + 1):
                key = (lv, lo >> shift[lv])
                if key not in tables:
                    out.append(key)
            return out
        for lv in range(1, down_to + 1):
            s = shift[lv]
            for tag in range(lo >> s, ((hi - 1) >> s) + 1):
                if (lv, tag) not in tables:
                    out.append((lv, tag))
        return out

    def count_missing(self, lo: int, hi: int, down_to: int) -> int:
        """``len(self.missing(lo, hi, down_to))`` by arithmetic: per level, the tables the range spans
        less those it has there (counted over the fewer of the two)."""
        shift = self.geo.shift
        out = 0
        for lv in range(1, down_to + 1):
            s = shift[lv]
            t0, t1 = lo >> s, (hi - 1) >> s
            span = t1 - t0 + 1
            if span <= len(self.tables):
                have = sum(1 for t in range(t0, t1 + 1) if (lv, t) in self.tables)
            else:
                have = sum(1 for (l2, t) in self.tables if l2 == lv and t0 <= t <= t1)
            out += span - have
        return out

    def scan(self, lo: int, hi: int) -> tuple[list[Span], list[int]] | tuple[str, int]:
        """What unmapping pages lo..hi-1 takes: (mapped leaf stretches, bases of large mappings),
        or ("hole", page) for the first page that maps nothing, or ("cuts_large", base) for a
        large mapping the range covers only in part. Stops at the first problem: it looks at no
        more than the range's mappings."""
        spans: list[Span] = []
        large: list[int] = []
        leaves = self.leaves
        tables = self.tables
        geo = self.geo
        bits, mask, leaf = geo.leaf_bits, geo.leaf_mask, geo.leaf
        vp = lo
        while vp < hi:
            e = leaves.get(vp >> bits)
            if e is not None:
                i = vp & mask
                j = min(mask + 1, i + hi - vp)
                if j - i == 1:
                    k = 1 if e.item(i) != EMPTY else 0
                elif tables[leaf, vp >> bits][1] == mask + 1:  # every entry of the table is in use: no hole
                    k = j - i
                else:
                    seg = e[i:j]
                    k = int(seg.argmin())  # EMPTY (-1) is the least entry: the first hole, if any
                    if seg[k] != EMPTY:
                        k = j - i
                if k:
                    spans.append((vp >> bits, i, i + k))
                    vp += k
                    continue
            hit = self.large_at(vp) if self.large else None
            if hit is None:
                return "hole", vp
            base, lv = hit[0], hit[1]
            end = base + geo.pages_at[lv]
            if base < lo or end > hi:
                return "cuts_large", base
            large.append(base)
            vp = end
        return spans, large

    def first_made_by_mm(self, spans: list[Span], large: list[int]) -> int | None:
        """The first page of the stretches ``spans`` and large pages ``large`` that the mm mapped, or None.
        (A client makes only 4 KiB read-only maps of kernel-shared frames; every large page is the mm's.)"""
        bits = self.geo.leaf_bits
        for tag, i, j in spans:
            theirs = (self.leaves[tag][i:j] & CLIENT_MADE) == 0
            k = int(theirs.argmax())
            if theirs[k]:
                first = (tag << bits) + i + k
                return min([first] + large[:1])
        return large[0] if large else None

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(vpages, leaf entries) of every 4 KiB mapping, in virtual address order (int64 arrays)."""
        vps: list[np.ndarray] = []
        ents: list[np.ndarray] = []
        bits = self.geo.leaf_bits
        for tag in sorted(self.leaves):
            e = self.leaves[tag]
            idx = np.flatnonzero(e != EMPTY)
            vps.append((tag << bits) + idx)
            ents.append(e[idx].astype(np.int64))
        if not vps:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(vps), np.concatenate(ents)

    @property
    def pages(self) -> dict[int, int]:
        """vpage -> frame << 3 | prot of every 4 KiB mapping (built on demand: for tests and debugging)."""
        vps, ents = self.entries()
        return dict(zip(vps.tolist(), (((ents >> ENTRY_SHIFT) << 3) | (ents & PROT_MASK)).tolist()))

    def mapped_frames(self) -> np.ndarray:
        """The frame of every mapping, once per 4 KiB page (a large mapping: each frame it covers)."""
        parts = [e[e != EMPTY].astype(np.int64) >> ENTRY_SHIFT for e in self.leaves.values()]
        pages_at = self.geo.pages_at
        parts.extend(np.arange(f, f + pages_at[lv], dtype=np.int64) for lv, f, _prot in self.large.values())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def segments(self, lo: int, hi: int, limit: int) -> tuple[list[list[Any]], int | None]:
        """The mappings of pages lo..hi-1 in virtual address order, as segments ``[vaddr, pages, first
        frame, prot, made_by ("mm" or "client"), page_size]``: consecutive pages mapping consecutive
        frames with the same protection, maker and page size. At most ``limit`` of them, and the
        virtual address to continue from (None: the range is covered). Looks at no more leaf tables
        than the process has, and stops once ``limit`` segments are made."""
        geo = self.geo
        bits, size = geo.leaf_bits, geo.leaf_entries
        t0, t1 = lo >> bits, (hi - 1) >> bits
        leaves = self.leaves
        tags = range(t0, t1 + 1) if t1 - t0 < len(leaves) else sorted(t for t in leaves if t0 <= t <= t1)
        larges = sorted((b, m) for b, m in self.large.items() if b < hi and b + geo.pages_at[m[0]] > lo)
        li = 0
        segments: list[list[Any]] = []

        def add(row: list[Any]) -> bool:
            """Append ``row`` (or extend the last segment with it); False once there is one beyond ``limit``."""
            last = segments[-1] if segments else None
            if (last is not None and row[5] == PAGE_SIZE and last[5] == PAGE_SIZE
                    and last[0] + (last[1] << PAGE_SHIFT) == row[0] and last[2] + last[1] == row[2]
                    and last[3] == row[3] and last[4] == row[4]):
                last[1] += row[1]
                return True
            segments.append(row)
            return len(segments) <= limit

        def large_row(b: int, lv: int, f: int, prot: int) -> list[Any]:
            return [b << PAGE_SHIFT, geo.pages_at[lv], f, prot, "mm", geo.pages_at[lv] << PAGE_SHIFT]

        for tag in tags:
            e = leaves.get(tag)
            if e is None:
                continue
            base = tag << bits
            while li < len(larges) and larges[li][0] < base:  # large mappings before this leaf table
                b, (lv, f, prot) = larges[li]
                li += 1
                if not add(large_row(b, lv, f, prot)):
                    return segments[:limit], segments[limit][0]
            a, z = max(lo, base) - base, min(hi, base + size) - base
            idx = np.flatnonzero(e[a:z] != EMPTY)
            if not idx.size:
                continue
            ents = e[a:z][idx].astype(np.int64)
            cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(ents) != (1 << ENTRY_SHIFT))) + 1
            room = limit + 2 - len(segments)  # (the first may join the last one; one beyond tells where to go on)
            starts = np.concatenate(([0], cut))[:room]
            ends = np.concatenate((cut, [idx.size]))[:room]
            heads = ents[starts]
            made_by = _MADE_BY[((heads & CLIENT_MADE) != 0).astype(np.intp)]
            rows = list(map(list, zip(((base + a + idx[starts]) << PAGE_SHIFT).tolist(), (ends - starts).tolist(),
                                      (heads >> ENTRY_SHIFT).tolist(), (heads & PROT_MASK).tolist(),
                                      made_by.tolist(), [PAGE_SIZE] * len(heads))))
            if not add(rows[0]):  # a leaf's segments are maximal but the first may continue the last one
                return segments[:limit], segments[limit][0]
            segments.extend(rows[1:])
            if len(segments) > limit:
                return segments[:limit], segments[limit][0]
        for b, (lv, f, prot) in larges[li:]:
            if not add(large_row(b, lv, f, prot)):
                return segments[:limit], segments[limit][0]
        return segments, None

    # ---- writes (commit: the kernel checked everything) --------------------------------------------

    def add_tables(self, keys: list[Key], frames: list[int], spares: list[np.ndarray]) -> None:
        """Hang the new tables ``keys`` (parents first) in their parents, in the given ``frames``."""
        geo = self.geo
        leaf = geo.leaf
        tables = self.tables
        if len(keys) == 1 and keys[0][0] == leaf:  # one page table (its parent exists)
            key = keys[0]
            tables[key] = [frames[0], 0]
            self.leaves[key[1]] = spares.pop() if spares else np.full(geo.leaf_entries, EMPTY, dtype=np.int32)
            tables[geo.parent(key)][1] += 1
            return
        for key, frame in zip(keys, frames):
            tables[key] = [frame, 0]
            if key[0] == leaf:
                self.leaves[key[1]] = spares.pop() if spares else np.full(geo.leaf_entries, EMPTY, dtype=np.int32)
            tables[geo.parent(key)][1] += 1

    def write_one(self, vp: int, frame: int, bits: int) -> None:
        """Map page ``vp`` to ``frame`` with entry bits ``bits`` (its leaf table exists)."""
        geo = self.geo
        tag = vp >> geo.leaf_bits
        self.leaves[tag][vp & geo.leaf_mask] = (frame << ENTRY_SHIFT) | bits
        self.tables[geo.leaf, tag][1] += 1
        self.small_pages += 1

    def write_small(self, vp0: int, frames: np.ndarray | None, first: int, count: int, bits: int) -> None:
        """Map pages vp0.. as 4 KiB pages with entry bits ``bits``: the frames ``frames``, or, when
        it is None, the run first..first+count-1 (the leaf tables exist)."""
        if frames is None:  # the entries of a run, in one pass
            entries = np.arange((first << ENTRY_SHIFT) | bits, ((first + count) << ENTRY_SHIFT) | bits,
                                1 << ENTRY_SHIFT, dtype=np.int32)
        else:
            entries = (frames << ENTRY_SHIFT) | bits
        leaf = self.geo.leaf
        i = 0
        for tag, lo, hi in self.geo.leaf_spans(vp0, vp0 + count):
            self.leaves[tag][lo:hi] = entries[i:i + hi - lo]
            self.tables[(leaf, tag)][1] += hi - lo
            i += hi - lo
        self.small_pages += count

    def add_large(self, vp0: int, level: int, firsts: list[int], prot: int) -> None:
        """Map one large page of ``level`` per first frame of ``firsts``, at pages vp0, vp0 + step, ..."""
        step = self.geo.pages_at[level]
        tables = self.tables
        for i, f in enumerate(firsts):
            b = vp0 + i * step
            self.large[b] = (level, f, prot)
            tables[self.geo.table_of(level, b)][1] += 1

    def clear(self, spans: list[Span], large: list[int]) -> tuple[list[np.ndarray], dict[Key, int]]:
        """Empty the stretches ``spans`` and remove the large mappings at ``large``: the frames they
        mapped (in virtual address order) and the entries cleared per table (for ``drop_entries``)."""
        geo = self.geo
        leaf = geo.leaf
        parts: list[np.ndarray] = []
        drops: dict[Key, int] = {}
        small = 0
        for tag, i, j in spans:
            e = self.leaves[tag]
            parts.append(e[i:j] >> ENTRY_SHIFT)  # (int32 throughout: frame numbers are below 2^25)
            e[i:j] = EMPTY
            key = (leaf, tag)
            drops[key] = drops.get(key, 0) + j - i
            small += j - i
        self.small_pages -= small
        for base in large:
            lv, f, _ = self.large.pop(base)
            parts.append(np.arange(f, f + geo.pages_at[lv], dtype=np.int32))
            key = geo.table_of(lv, base)
            drops[key] = drops.get(key, 0) + 1
        return parts, drops

    def clear_one(self, tag: int, i: int) -> int:
        """Empty entry ``i`` of leaf table ``tag``; the frame it mapped."""
        e = self.leaves[tag]
        f = e.item(i) >> ENTRY_SHIFT
        e[i] = EMPTY
        self.small_pages -= 1
        return f

    def drop_entries(self, entries: dict[Key, int], spares: list[np.ndarray]) -> list[int]:
        """Take ``entries[key]`` entries off each table's count; tables that become empty go,
        bottom-up (an emptied leaf array joins ``spares``). The frames of the tables that went."""
        geo = self.geo
        tables = self.tables
        freed: list[int] = []
        for lv in range(geo.levels - 1, 0, -1):
            keys = list(entries) if lv == geo.leaf else [k for k in entries if k[0] == lv]
            for key in keys:
                if key[0] != lv:
                    continue
                t = tables[key]
                t[1] -= entries.pop(key)
                if t[1] == 0:
                    del tables[key]
                    if lv == geo.leaf:
                        emptied = self.leaves.pop(key[1])
                        if len(spares) < SPARE_LEAVES:
                            spares.append(emptied)
                    freed.append(t[0])
                    parent = geo.parent(key)
                    entries[parent] = entries.get(parent, 0) + 1
        if ROOT in entries:
            tables[ROOT][1] -= entries.pop(ROOT)
        return freed

    def drop_one(self, tag: int, spares: list[np.ndarray]) -> list[int]:
        """``drop_entries({(leaf, tag): 1})`` with scalars: the table's count goes down by one; a table that
        becomes empty goes, and so, one level up at a time, do the parents it leaves empty."""
        geo = self.geo
        lv = geo.leaf
        t = self.tables[lv, tag]
        if t[1] > 1:
            t[1] -= 1
            return []
        freed: list[int] = []
        tables = self.tables
        key = (lv, tag)
        while True:  # ``t`` is the table of ``key``, at level lv >= 1, losing its last entry
            t[1] -= 1
            if t[1]:
                return freed
            del tables[key]
            if lv == geo.leaf:
                emptied = self.leaves.pop(key[1])
                if len(spares) < SPARE_LEAVES:
                    spares.append(emptied)
            freed.append(t[0])
            key = geo.parent(key)
            if key == ROOT:
                tables[ROOT][1] -= 1
                return freed
            lv = key[0]
            t = tables[key]

    def state(self) -> tuple[Any, ...]:
        """Everything in the tree, as plain values (for digests and comparisons)."""
        return (sorted(self.tables.items()), self.small_pages, sorted(self.large.items()),
                [(tag, self.leaves[tag].tobytes()) for tag in sorted(self.leaves)])
