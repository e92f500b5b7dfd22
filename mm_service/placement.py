"""Frame placement: which free frames a request, a donation or a reclaim takes. Pure functions of a view.

Rules for this file: no sockets, clocks, randomness or I/O, and no changes:
every function reads a ``View`` and returns frame numbers; the caller turns
its choice into a journal record (``View.apply`` makes the change), so the
choice of a replayed view is the choice of the live one.

Each large-page-aligned block has an owner (``View.bowner``): an owner's small
pages and the kernel's donations gather in their own blocks, and settled
(long-lived) owners keep theirs, so aligned runs for large pages survive
churn (Linux's pageblock idea; the rules are in docs/large-pages.md). The
view keeps the state these rules read (free frames per block, block owners,
which owners are alive) and the rule of who takes a block over when frames
leave it (``View._may_take``), since every state change applies it.
"""

from __future__ import annotations

import numpy as np

from mm_service.view import FREE, FREE_BYTE, KERNEL_TAG, SCALAR_SPOILT, View
from protocol import runs as R
from protocol.wire import MAX_RUNS


def pick(view: View, n: int, *, below: int | None = None, large: bool = False, naive: bool = False,
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
    B = view.block
    top = view.n if below is None else min(below, view.n)
    if large:
        whole = np.flatnonzero(view.bfree[: top // B] == B)
        need = n // B
        if whole.size < need:
            return None
        return (whole[:need, None] * B + np.arange(B)).reshape(-1)
    if naive:
        free = np.flatnonzero(view.state[:top] == FREE)
        return free[:n] if free.size >= n else None
    bfree = view.bfree[: -(-top // B)]
    state = view.state
    if n > 0:
        # the first block in placement order usually has enough (a one-page request): no sort, and no
        # count of all free frames (it has at least n, then)
        b = first_block(view, bfree, owner)
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
    keys = pick_keys(view, bfree, owner)
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

def runs_of(frames: np.ndarray) -> list[list[int]]:
    """``protocol.runs.from_array`` (consecutive ascending frames merge), in a plain loop for the few frames
    of a usual request (its numpy passes cost more than the loop up to about a hundred frames)."""
    if frames.size > 64:
        return R.from_array(frames)
    out: list[list[int]] = []
    last = 0
    for f in frames.tolist():
        if out and f == last + 1:
            out[-1][1] += 1
        else:
            out.append([f, 1])
        last = f
    return out


def pick_one(view: View, owner: int) -> int:
    """``pick(view, 1, owner=owner)``'s one frame as an int (-1: no free frame), without arrays: the
    one-page request. The same choice (the lowest free frame of the first block in placement order)."""
    b = first_block(view, view.bfree, owner)
    if b < 0:
        return -1
    lo = b * view.block
    i = view.state[lo:lo + view.block].tobytes().find(FREE_BYTE)
    if i >= 0:
        return lo + i
    got = pick(view, 1, owner=owner)  # (the block's count said free, its bytes did not: pick decides)
    return -1 if got is None else int(got[0])


def first_block(view: View, bfree: np.ndarray, owner: int) -> int:
    """The first block of ``_pick_keys``' order, tier by tier (most requests stop at the first tier);
    -1 if no block has a free frame."""
    B = view.block
    nb = bfree.size
    if nb == view.bfree.size and len(view.spoilt_list) <= SCALAR_SPOILT:
        # the first tier in plain Python: a few blocks, read one by one, cost less than the array
        # operations (same answer: the fullest, the first in block order among equals)
        best, low = -1, B
        item = bfree.item
        for b in view.spoilt_list:
            v = item(b)
            if 0 < v < low:
                best, low = b, v
        if best >= 0:
            return best
    else:
        spoilt = view.never_whole_blocks
        if nb < view.bfree.size:
            spoilt = spoilt[spoilt < nb]
        bf = bfree[spoilt]
        ok = (bf > 0) & (bf < B)
        if ok.any():
            return int(spoilt[ok][np.argmin(bf[ok])])
    has = bfree > 0
    whole = bfree == B
    nw = view.never_whole[:nb]
    broken = has & ~whole & ~nw
    bo = view.bowner[:nb]
    cand = np.flatnonzero(broken & (bo == owner))
    if cand.size:
        return int(cand[np.argmin(bfree[cand])])
    cand = np.flatnonzero(whole)
    if cand.size:
        return int(cand[0])
    rest = np.flatnonzero(broken & (bo != owner))
    settled = settled_owners(view, bo[rest])
    cand = rest[~settled]
    if cand.size:  # most free first, the highest block among equals
        return int(cand[cand.size - 1 - np.argmax(bfree[cand][::-1])])
    cand = rest[settled]
    if not cand.size:
        return -1
    return int(cand[np.argmin(bfree[cand])])

def pick_keys(view: View, bfree: np.ndarray, owner: int) -> np.ndarray:
    """The placement order of ``pick`` as one sort key per block (smallest first; blocks with no
    free frame last): tier, then the order within the tier, then the block number."""
    B = view.block
    nb = bfree.size
    idx = np.arange(nb, dtype=np.int64)
    whole = bfree == B
    spoilt = view.never_whole[:nb] & ~whole
    bo = view.bowner[:nb]
    mine = bo == owner
    settled = ~mine & settled_owners(view, bo)
    free = bfree.astype(np.int64)
    # tiers 0 (spoilt), 1 (mine), 4 (settled others): fullest first, lowest block first among equals;
    # 2 (whole): lowest first; 3 (the rest): most free first, highest block first among equals
    tier = np.where(spoilt, 0, np.where(whole, 2, np.where(mine, 1, np.where(settled, 4, 3))))
    within = np.where(tier == 3, (B - free) << 29 | (nb - 1 - idx), free << 29 | idx)
    within = np.where(tier == 2, idx, within)
    keys = tier.astype(np.int64) << 58 | within
    keys[bfree <= 0] = np.iinfo(np.int64).max
    return keys


def settled_owners(view: View, owners: np.ndarray) -> np.ndarray:
    """Which owners are settled, that is likely to live long: the kernel, and live clients
    that have seen more clients arrive since they came than there are clients now. By
    Little's law that means they have outlived the mean client lifetime; a process that has
    lived long is likely to live long still (Harchol-Balter and Downey, 1997)."""
    young_limit = view.next_tag - (len(view.alive) - 1)  # tags at or above this are young
    return (owners == KERNEL_TAG) | (view._alive(owners) & (owners > KERNEL_TAG) & (owners < young_limit))


def pick_reclaim(view: View, kernel_free: np.ndarray, n: int, most: int | None = None) -> np.ndarray:
    """Of the kernel's free frames (as the kernel just reported them), the ones to take back:
    ``n`` of them, or up to ``most`` when that empties one more block of kernel frames.
    Sorted; pure. Blocks are taken in this order: those that are then entirely free (a
    large page again), then those left with the fewest frames not free; blocks that can
    never be a large page last."""
    B = view.block
    most = n if most is None else max(n, most)
    kf = np.unique(kernel_free)
    if kf.size == 0 or n <= 0:
        return kf[:0]
    blocks = kf // B
    ub, first, counts = np.unique(blocks, return_index=True, return_counts=True)
    left = B - view.bfree[ub] - counts  # frames still not free in each block afterwards
    left = np.where(view.never_whole[ub], B + 1, left)
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

